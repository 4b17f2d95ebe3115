"""Image transforms and flow densities: exact log-determinants, inverses, shapes, devices.

Every transform runs in float64 with every parameter redrawn at random, far from its (identity)
initialisation, and is checked against ``torch.autograd.functional.jacobian`` of the flattened
map, image by image.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.infer import Trace_ELBO
from torch.autograd.functional import jacobian

from pyro_dgm.models.image_flow import ImageFlow, glow, real_nvp
from pyro_dgm.transforms.image_actnorm import ActNorm, act_norm
from pyro_dgm.transforms.image_conv1x1 import InvertibleConv1x1, invertible_conv1x1
from pyro_dgm.transforms.image_coupling import (
    ConditionedMaskedAffineCoupling2d,
    MaskedAffineCoupling2d,
    conditional_masked_affine_coupling2d,
    masked_affine_coupling2d,
)
from pyro_dgm.transforms.image_logit import LogitPreprocessing, logit_preprocessing
from pyro_dgm.transforms.image_multiscale import FactorOut, Squeeze2d

B = 3  # batch size
SHAPE = (2, 4, 4)  # (C, H, W) of the single transforms
FLOW_SHAPE = (1, 4, 4)  # of the whole flows
HIDDEN = 8  # coupling networks' width
CONTEXT = 3  # channels of the conditional couplings' context

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _coupling(channels: int, mask: str, invert: bool = False) -> MaskedAffineCoupling2d:
    return masked_affine_coupling2d(channels, mask, invert, hidden_channels=HIDDEN)


def _conditional_coupling(channels: int, mask: str, invert: bool = False):
    return conditional_masked_affine_coupling2d(channels, CONTEXT, mask, invert,
                                                hidden_channels=HIDDEN)


# name -> (builder, image shape)
CASES = {
    "act-norm": (lambda: act_norm(2), SHAPE),
    "conv1x1": (lambda: invertible_conv1x1(2, torch.Generator().manual_seed(1)), SHAPE),
    "coupling-checkerboard": (lambda: _coupling(2, "checkerboard"), SHAPE),
    "coupling-checkerboard-inverted": (lambda: _coupling(2, "checkerboard", True), SHAPE),
    "coupling-channel": (lambda: _coupling(2, "channel"), SHAPE),
    "coupling-channel-inverted": (lambda: _coupling(2, "channel", True), SHAPE),
    # conditioned by _transform on a fixed context (F, H, W), shared by every image
    "conditional-coupling-checkerboard": (lambda: _conditional_coupling(2, "checkerboard"),
                                          SHAPE),
    "conditional-coupling-channel-inverted": (
        lambda: _conditional_coupling(2, "channel", True), SHAPE),
    "squeeze": (lambda: Squeeze2d(), SHAPE),
    "unsqueeze": (lambda: Squeeze2d().inv, (8, 2, 2)),
    "logit": (lambda: logit_preprocessing(0.05), SHAPE),
    "factor-out": (
        lambda: FactorOut(1, ComposeTransformModule(
            [_coupling(1, "checkerboard"), Squeeze2d(), invertible_conv1x1(4), Squeeze2d().inv]
        )),
        SHAPE,
    ),
    "real-nvp": (lambda: real_nvp(FLOW_SHAPE, num_scales=2, hidden_channels=HIDDEN).transform,
                 FLOW_SHAPE),
    "glow": (lambda: glow(FLOW_SHAPE, num_levels=2, num_steps=2, hidden_channels=HIDDEN,
                          generator=torch.Generator().manual_seed(2)).transform, FLOW_SHAPE),
}


def _randomize(module: object, seed: int = 0, std: float = 0.5) -> None:
    """Redraw every parameter from N(0, std^2) (log-scales from N(0, (0.4 std)^2), convolution
    weights from N(0, 1 / fan_in)), and mark every
    ActNorm initialised, so that no map is near the identity."""
    if not isinstance(module, torch.nn.Module):
        return
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("weight"):  # convolutions: gain about 1 per layer
                scale = parameter[0].numel() ** -0.5
            else:
                scale = 0.4 * std if "log" in name else std
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.copy_(scale * noise)
        for submodule in module.modules():
            if isinstance(submodule, ActNorm):
                submodule.initialized.fill_(True)


def _transform(built: object, seed: int = 0):
    """A case's transform: ``built`` itself, or a conditional module conditioned on a context
    ``(CONTEXT, H, W)`` drawn from ``seed``, in the dtype and on the device of its parameters."""
    if not isinstance(built, ConditionalTransformModule):
        return built
    like = built.log_scale_factor
    generator = torch.Generator().manual_seed(seed + 200)
    context = torch.randn(CONTEXT, *SHAPE[1:], generator=generator, dtype=torch.float64,
                          device="cpu")
    return built.condition(context.to(like))


def _build(name: str, seed: int = 0):
    """The transform of a case in float64, randomised."""
    torch.manual_seed(seed)
    transform = CASES[name][0]()
    if isinstance(transform, torch.nn.Module):
        transform.double()
    _randomize(transform, seed)
    return _transform(transform, seed)


def _inputs(shape: tuple[int, ...], seed: int = 0, batch: tuple[int, ...] = (B,)) -> torch.Tensor:
    """Images with entries in (0.05, 0.95): inside every case's domain (the logit's too)."""
    generator = torch.Generator().manual_seed(seed + 100)
    return 0.05 + 0.9 * torch.rand(*batch, *shape, generator=generator, dtype=torch.float64)


def _flat_jacobian_logdet(transform, x: torch.Tensor) -> torch.Tensor:
    """log|det| of the Jacobian of the flattened map, image by image, for x (B, C, H, W)."""
    logdets = []
    shape = x.shape[1:]
    for image in x:
        matrix = jacobian(lambda v: transform(v.view(shape)).flatten(), image.flatten())
        logdets.append(torch.linalg.slogdet(matrix).logabsdet)
    return torch.stack(logdets)


# ---------------------------------------------------------------------------------------------
# Every transform: log-determinant, inverse, shapes, devices


@pytest.mark.parametrize("name", CASES)
def test_log_abs_det_jacobian_matches_autograd(name):
    transform = _build(name)
    x = _inputs(CASES[name][1])
    y = transform(x)
    ladj = transform.log_abs_det_jacobian(x, y)
    assert ladj.shape == (B,)
    expected = _flat_jacobian_logdet(transform, x)
    torch.testing.assert_close(ladj, expected, rtol=0, atol=1e-8)
    # new tensor objects miss every cache: the log-determinant computed from scratch
    torch.testing.assert_close(transform.log_abs_det_jacobian(x.clone(), y.clone()), ladj,
                               rtol=0, atol=1e-12)
    # far from the identity: the check above could fail
    if name not in ("squeeze", "unsqueeze"):
        assert expected.abs().min() > 1e-3


@pytest.mark.parametrize("name", CASES)
def test_inverse_round_trip(name):
    transform = _build(name)
    x = _inputs(CASES[name][1])
    y = transform(x)
    # clones: a cached transform would hand back its input without computing the inverse
    x_again = transform.inv(y.clone())
    torch.testing.assert_close(x_again, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(transform(x_again.clone()), y, rtol=1e-10, atol=1e-10)
    # the inverse's log-determinant is minus the forward one
    inverse_ladj = transform.inv.log_abs_det_jacobian(y, x_again)
    torch.testing.assert_close(inverse_ladj, -transform.log_abs_det_jacobian(x, y),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_batch_and_sample_shapes(name):
    transform = _build(name)
    shape = CASES[name][1]
    x = _inputs(shape, batch=(2, B))  # (sample, batch, C, H, W)
    y = transform(x)
    assert y.shape == transform.forward_shape(x.shape)
    assert transform.inverse_shape(y.shape) == x.shape
    assert transform.log_abs_det_jacobian(x, y).shape == (2, B)
    # one unbatched image gives the same values as inside the batch
    single = x[1, 2].clone()
    y_single = transform(single)
    torch.testing.assert_close(y_single, y[1, 2], rtol=0, atol=1e-12)
    ladj_single = transform.log_abs_det_jacobian(single, y_single)
    assert ladj_single.shape == ()
    torch.testing.assert_close(ladj_single, transform.log_abs_det_jacobian(x, y)[1, 2],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_construction_and_forward_on_meta_device(name):
    with torch.device("meta"):
        built = CASES[name][0]()
        transform = _transform(built)
    if isinstance(built, torch.nn.Module):
        assert all(p.is_meta for p in built.parameters())
    x = torch.empty(2, B, *CASES[name][1], device="meta")
    y = transform(x)
    assert y.is_meta and y.shape == transform.forward_shape(x.shape)
    ladj = transform.log_abs_det_jacobian(x, y)
    assert ladj.is_meta and ladj.shape == (2, B)
    assert transform.inv(torch.empty_like(y)).shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["act-norm", "conv1x1", "coupling-checkerboard", "factor-out",
                                  "glow", "real-nvp"])
def test_device_matches_cpu(name, device):
    transform = _build(name)
    x = _inputs(CASES[name][1])
    y = transform(x)
    ladj = transform.log_abs_det_jacobian(x, y)
    moved = _build(name)
    if isinstance(moved, torch.nn.Module):
        moved.to(device)
    x_device = x.to(device)
    y_device = moved(x_device)
    assert y_device.device.type == device
    torch.testing.assert_close(y_device.cpu(), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(moved.log_abs_det_jacobian(x_device, y_device).cpu(), ladj,
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(moved.inv(y_device.clone()).cpu(), x, rtol=0, atol=1e-10)


def test_image_transforms_declare_event_dim_three():
    for name, (builder, _) in CASES.items():
        transform = _transform(builder())
        assert transform.domain.event_dim == 3, name
        assert transform.codomain.event_dim == 3, name
        assert transform.bijective, name


# ---------------------------------------------------------------------------------------------
# ActNorm


def test_act_norm_initialises_from_first_forward_batch():
    norm = ActNorm(3).double()
    x = 2.0 + 5.0 * torch.randn(4, 3, 5, 5, dtype=torch.float64)
    x = x * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)[:, None, None]
    assert not norm.initialized
    y = norm(x)
    assert norm.initialized
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(y.var((0, 2, 3), correction=0),
                               torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-5)
    # later batches do not initialise again
    bias, log_scale = norm.bias.detach().clone(), norm.log_scale.detach().clone()
    norm(torch.randn(4, 3, 5, 5, dtype=torch.float64))
    assert torch.equal(norm.bias, bias) and torch.equal(norm.log_scale, log_scale)


def test_act_norm_inverse_does_not_initialise():
    norm = ActNorm(2).double()
    y = 3.0 + torch.randn(4, 2, 3, 3, dtype=torch.float64)
    assert torch.equal(norm.inv(y), y)  # the identity until initialised
    assert not norm.initialized


def test_act_norm_state_dict_round_trip_keeps_initialisation():
    norm = ActNorm(2).double()
    norm(5.0 + 3.0 * torch.randn(8, 2, 3, 3, dtype=torch.float64))
    restored = ActNorm(2).double()
    restored.load_state_dict(norm.state_dict())
    assert restored.initialized
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)  # another batch: must not initialise
    torch.testing.assert_close(restored(x), norm(x.clone()), rtol=0, atol=0)
    # and an uninitialised state makes an initialised module initialise again
    restored.load_state_dict(ActNorm(2).double().state_dict())
    assert not restored.initialized
    y = restored(x.clone())  # a new object: the cached output of x is the old one
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(2, dtype=torch.float64),
                               rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Invertible 1x1 convolution


def test_conv1x1_initial_weight_is_a_seeded_rotation():
    first = InvertibleConv1x1(5, torch.Generator().manual_seed(3))
    second = InvertibleConv1x1(5, torch.Generator().manual_seed(3))
    other = InvertibleConv1x1(5, torch.Generator().manual_seed(4))
    assert torch.equal(first.weight, second.weight)
    assert not torch.allclose(first.weight, other.weight)
    torch.testing.assert_close(first.weight @ first.weight.T, torch.eye(5), rtol=0, atol=1e-6)
    torch.manual_seed(5)
    from_global = InvertibleConv1x1(5).weight
    torch.manual_seed(5)
    torch.testing.assert_close(InvertibleConv1x1(5).weight, from_global, rtol=0, atol=0)


def test_conv1x1_is_a_channel_mixing_matrix():
    conv = _build("conv1x1")
    x = _inputs(SHAPE)
    expected = torch.nn.functional.conv2d(x, conv.weight[:, :, None, None])
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-12)
    height, width = SHAPE[1:]
    torch.testing.assert_close(
        conv.log_abs_det_jacobian(x, conv(x))[0],
        height * width * torch.linalg.slogdet(conv.weight).logabsdet, rtol=0, atol=1e-12,
    )


# ---------------------------------------------------------------------------------------------
# Affine coupling


@pytest.mark.parametrize("mask", ["checkerboard", "channel"])
def test_coupling_starts_as_the_identity(mask):
    coupling = _coupling(2, mask).double()
    x = _inputs(SHAPE)
    y = coupling(x)
    assert torch.equal(y, x)
    assert torch.equal(coupling.log_abs_det_jacobian(x, y), torch.zeros(B, dtype=torch.float64))


def test_coupling_masks():
    x = torch.zeros(4, 2, 3)
    checkerboard = _coupling(4, "checkerboard").mask(x)
    assert checkerboard.shape == (1, 2, 3)
    assert checkerboard[0].tolist() == [[1, 0, 1], [0, 1, 0]]
    assert torch.equal(_coupling(4, "checkerboard", True).mask(x), 1 - checkerboard)
    channel = _coupling(4, "channel").mask(x)
    assert channel.flatten().tolist() == [1, 1, 0, 0]
    assert _coupling(4, "channel", True).mask(x).flatten().tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("name", ["coupling-checkerboard", "coupling-channel-inverted"])
def test_coupling_keeps_the_conditioning_entries_and_calls_its_network_once(name):
    coupling = _build(name)
    calls = []
    coupling.hypernet.register_forward_hook(lambda *args: calls.append(1))
    x = _inputs(SHAPE)
    y = coupling(x)
    coupling.log_abs_det_jacobian(x, y)
    assert len(calls) == 1
    mask = coupling.mask(x)
    assert torch.equal(mask * y, mask * x)
    assert not torch.allclose((1 - mask) * y, (1 - mask) * x)


@pytest.mark.parametrize("mask", ["checkerboard", "channel"])
def test_conditional_coupling_with_a_context_it_ignores_is_the_plain_coupling(mask):
    # one map for the triple: the conditional coupling's network reading the context through
    # zero weights, and otherwise the plain coupling's weights, gives the plain coupling
    plain = _build("coupling-checkerboard" if mask == "checkerboard" else "coupling-channel")
    assert isinstance(plain, ConditionedMaskedAffineCoupling2d)
    conditional = _conditional_coupling(2, mask).double()
    with torch.no_grad():
        conditional.log_scale_factor.copy_(plain.log_scale_factor)
        for mine, theirs in zip(conditional.hypernet.net, plain.hypernet):
            if isinstance(mine, torch.nn.Conv2d):
                mine.weight.zero_()
                mine.weight[:, :theirs.in_channels].copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
    context = torch.randn(B, CONTEXT, *SHAPE[1:], dtype=torch.float64)
    conditioned = conditional.condition(context)
    x = _inputs(SHAPE)
    y = plain(x)
    assert not torch.allclose(y, x)
    torch.testing.assert_close(conditioned(x.clone()), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(conditioned.log_abs_det_jacobian(x.clone(), y),
                               plain.log_abs_det_jacobian(x, y), rtol=0, atol=1e-12)
    torch.testing.assert_close(conditioned.inv(y.clone()), x, rtol=0, atol=1e-12)
    # the context is read: another context changes the map
    moved = _conditional_coupling(2, mask).double()
    moved.load_state_dict(conditional.state_dict())
    with torch.no_grad():
        moved.hypernet.net[0].weight[:, 2:].normal_()
    assert not torch.allclose(moved.condition(context)(x.clone()), y)


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="mask"):
        masked_affine_coupling2d(2, "stripes")
    with pytest.raises(ValueError, match="channels"):
        masked_affine_coupling2d(1, "channel")
    with pytest.raises(ValueError, match="mask"):
        conditional_masked_affine_coupling2d(2, CONTEXT, "stripes")
    with pytest.raises(ValueError, match="channels"):
        ConditionedMaskedAffineCoupling2d(1, torch.nn.Identity(), "channel")
    with pytest.raises(ValueError, match="channels"):
        _conditional_coupling(2, "checkerboard").condition(torch.zeros(CONTEXT, 4, 4))(
            torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        ActNorm(0)
    with pytest.raises(ValueError, match="channels"):
        ActNorm(2)(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="alpha"):
        LogitPreprocessing(0.5)
    with pytest.raises(ValueError, match="divisible"):
        Squeeze2d()(torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="kept_channels"):
        FactorOut(2, Squeeze2d())(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="keep the shape"):
        FactorOut(1, Squeeze2d()).forward_shape(torch.Size((2, 4, 4)))
    with pytest.raises(ValueError, match="image_shape"):
        glow((1, 28, 28), num_levels=3)
    with pytest.raises(ValueError, match="image_shape"):
        real_nvp((28, 28))
    with pytest.raises(ValueError, match="temperature"):
        real_nvp(FLOW_SHAPE, hidden_channels=HIDDEN)(temperature=0.0)


# ---------------------------------------------------------------------------------------------
# Squeeze, factor-out, logit


def test_squeeze_moves_each_block_into_channels():
    x = torch.arange(2 * 4 * 4.0).view(2, 4, 4)
    y = Squeeze2d()(x)
    assert y.shape == (8, 2, 2)
    # channel c * 4 + i * 2 + j holds the pixels at offset (i, j) of channel c's 2x2 blocks
    assert torch.equal(y[4 + 1 * 2 + 0], x[1, 1::2, 0::2])


def test_factor_out_passes_the_factored_channels_through():
    transform = _build("factor-out")
    x = _inputs(SHAPE)
    y = transform(x)
    assert torch.equal(y[:, 1:], x[:, 1:])
    torch.testing.assert_close(y[:, :1], transform.transform(x[:, :1].clone()), rtol=0, atol=0)


def test_logit_preprocessing_values():
    logit = LogitPreprocessing(0.05)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 2)
    expected = torch.tensor([math.log(0.05 / 0.95), math.log(0.95 / 0.05)], dtype=torch.float64)
    torch.testing.assert_close(logit(ends).flatten(), expected, rtol=0, atol=1e-14)
    # 0 and 1 lie inside the domain; the domain's ends map to -inf and +inf
    assert logit.domain.check(ends).all()
    lower, upper = -0.05 / 0.9, 0.95 / 0.9
    assert logit(torch.tensor([[[lower, upper]]], dtype=torch.float64)).isinf().all()
    flat = LogitPreprocessing(0.05, event_dim=1)
    x = _inputs((5,))
    torch.testing.assert_close(flat.log_abs_det_jacobian(x, flat(x)),
                               _flat_jacobian_logdet(flat, x), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Flow densities


FLOWS = {
    "real-nvp": lambda: real_nvp(FLOW_SHAPE, num_scales=2, hidden_channels=HIDDEN),
    "glow": lambda: glow(FLOW_SHAPE, num_levels=2, num_steps=2, hidden_channels=HIDDEN,
                         generator=torch.Generator().manual_seed(2)),
    "glow-without-logit": lambda: glow(FLOW_SHAPE, num_levels=1, num_steps=3,
                                       hidden_channels=HIDDEN, alpha=None),
}


def _flow(name: str, seed: int = 0) -> ImageFlow:
    """The flow in float64, randomised less than the single transforms: whole random flows
    map some base draws past the range where the logit's inverse can be told from 0 or 1."""
    torch.manual_seed(seed)
    flow = FLOWS[name]().double()
    _randomize(flow, seed, std=0.2)
    return flow


@pytest.mark.parametrize("name", FLOWS)
def test_log_prob_is_the_change_of_variables(name):
    flow = _flow(name)
    x = _inputs(FLOW_SHAPE)
    for temperature in (1.0, 0.6):
        density = flow(temperature)
        latent = flow.transform(x.clone())
        base = torch.distributions.Normal(torch.zeros_like(latent), temperature)
        expected = (base.log_prob(latent).sum((-3, -2, -1))
                    + _flat_jacobian_logdet(flow.transform, x))
        torch.testing.assert_close(density.log_prob(x), expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", FLOWS)
def test_flow_shapes_and_samples(name):
    flow = _flow(name)
    density = flow()
    assert density.event_shape == FLOW_SHAPE and density.batch_shape == ()
    assert density.has_rsample
    samples = density.rsample((5, 2))
    assert samples.shape == (5, 2, *FLOW_SHAPE)
    assert density.sample().shape == FLOW_SHAPE
    assert density.log_prob(samples).shape == (5, 2)
    assert density.expand((2,)).log_prob(samples).shape == (5, 2)
    # reparameterized: the samples' gradient reaches the flow's parameters
    samples.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
    if name != "glow-without-logit":
        assert density.support.check(samples).all()


@pytest.mark.parametrize("name", FLOWS)
def test_temperature_scales_the_latent(name):
    flow = _flow(name)
    torch.manual_seed(7)
    cold = flow(temperature=0.5).sample((4,))
    torch.manual_seed(7)
    warm = flow().sample((4,))
    torch.testing.assert_close(flow.transform(cold), 0.5 * flow.transform(warm),
                               rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", FLOWS)
def test_trace_elbo_of_an_observed_flow_is_minus_log_prob(name):
    flow = _flow(name)
    x = _inputs(FLOW_SHAPE)

    def model(images):
        pyro.module("flow", flow)
        with pyro.plate("data", images.shape[0]):
            pyro.sample("x", flow(), obs=images)

    def guide(images):
        pass

    pyro.clear_param_store()
    loss = Trace_ELBO().differentiable_loss(model, guide, x)
    expected = -flow().log_prob(x).sum()  # flow() empties the caches: a graph of its own
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-10)
    parameters = list(flow.parameters())
    grads = torch.autograd.grad(loss, parameters)
    expected_grads = torch.autograd.grad(expected, parameters)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10)
    assert abs(Trace_ELBO().loss(model, guide, x) - expected.item()) < 1e-10
    pyro.clear_param_store()


def test_first_log_prob_initialises_act_norms_and_sampling_does_not():
    flow = glow(FLOW_SHAPE, num_levels=2, num_steps=2, hidden_channels=HIDDEN).double()
    norms = [m for m in flow.modules() if isinstance(m, ActNorm)]
    assert len(norms) == 4
    flow().sample((3,))
    assert not any(norm.initialized for norm in norms)
    x = _inputs(FLOW_SHAPE, batch=(16,))
    flow().log_prob(x)
    assert all(norm.initialized for norm in norms)
    # the first ActNorm standardised what it saw: the squeezed, preprocessed data
    seen = Squeeze2d()(LogitPreprocessing(0.05)(x))
    normalised = norms[0](seen)
    torch.testing.assert_close(normalised.mean((0, 2, 3)), torch.zeros(4, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_flow_buffers_and_parameters_follow_the_module():
    flow = real_nvp(FLOW_SHAPE, hidden_channels=HIDDEN)
    assert {name for name, _ in flow.named_buffers()} >= {"base_loc", "base_scale"}
    flow.double()
    base = flow().base_dist.base_dist
    assert base.loc.dtype == base.scale.dtype == torch.float64
    state = flow.state_dict()
    assert all(value.dtype == torch.float64
               for value in state.values() if value.is_floating_point())
    # 10 couplings of 7 parameters (3 convolutions and the log-scale factor)
    assert len(list(flow.parameters())) == 10 * 7


def test_flow_on_meta_device():
    with torch.device("meta"):
        flow = glow(FLOW_SHAPE, num_levels=2, num_steps=2, hidden_channels=HIDDEN)
    assert flow.base_loc.is_meta
    density = flow(validate_args=False)
    x = torch.empty(2, B, *FLOW_SHAPE, device="meta")
    log_prob = density.log_prob(x)
    assert log_prob.is_meta and log_prob.shape == (2, B)
    samples = density.rsample((5,))
    assert samples.is_meta and samples.shape == (5, *FLOW_SHAPE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FLOWS)
def test_flow_log_prob_and_sample_on_device(name, device):
    flow = _flow(name)
    x = _inputs(FLOW_SHAPE)
    expected = flow().log_prob(x)
    flow.to(device)
    density = flow(temperature=0.8)
    assert density.base_dist.base_dist.scale.device.type == device
    torch.testing.assert_close(flow().log_prob(x.to(device)).cpu(), expected,
                               rtol=0, atol=1e-9)
    samples = density.rsample((4,))
    assert samples.device.type == device and samples.shape == (4, *FLOW_SHAPE)


def test_training_steps_on_one_batch_see_the_new_parameters():
    flow = _flow("glow")
    x = _inputs(FLOW_SHAPE)
    optimizer = torch.optim.SGD(flow.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):  # the same batch object each step: stale caches would break this
        optimizer.zero_grad()
        loss = -flow().log_prob(x).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0]
    torch.testing.assert_close(-flow().log_prob(x.clone()).sum(),
                               -flow().log_prob(x).sum(), rtol=0, atol=0)
