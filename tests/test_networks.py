"""Gated layers (``pyro_dgm.models.networks``) and the PixelCNN decoder
(``pyro_dgm.models.pixelcnn``).

Exactness: the autoregressive property is checked on autograd Jacobians in float64, where a
masked dependency must be exactly zero (no tolerance); the sampler's logits are compared with a
full forward pass in float64 to 1e-12 (the windows it runs on differ from the full image only in
the order of floating-point sums). The sampler's distribution is checked against the exact
joint probabilities of a 2x2 image by a multinomial goodness-of-fit test (fixed seed, p-value
above 1e-3).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from pyro.distributions.testing.gof import multinomial_goodness_of_fit
from torch import nn

from pyro_dgm.models.networks import GatedConv2d, GatedDense, GatedMLP
from pyro_dgm.models.pixelcnn import GatedMaskedConv2d, MaskedConv2d, PixelCNNDecoder

F64 = torch.float64
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def decoder64(context_dim=3, image_shape=(1, 6, 6), seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("channels", 4)
    kwargs.setdefault("num_layers", 3)
    return PixelCNNDecoder(context_dim, image_shape, dtype=F64, **kwargs)


def random_images(shape, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full(shape, 0.4, dtype=F64), generator=generator)


def raster_masks(rows, columns):
    """The expected masks, written from the definition: keep kernel position (r, c) iff it
    precedes the centre in raster order (type A), or precedes or is the centre (type B)."""
    centre = (rows // 2) * columns + columns // 2
    index = torch.arange(rows * columns).reshape(rows, columns)
    return {"A": (index < centre).to(F64), "B": (index <= centre).to(F64)}


# Masks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel_size", [1, 3, 5, (3, 5), (5, 1)])
@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_mask_is_raster_order(kernel_size, mask_type):
    conv = MaskedConv2d(2, 3, kernel_size, mask_type, dtype=F64)
    rows, columns = conv.kernel_size
    assert torch.equal(conv.mask, raster_masks(rows, columns)[mask_type])
    assert conv.padding == (rows // 2, columns // 2)
    assert conv.reach == (rows // 2, columns // 2)


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_conv_dependencies(mask_type):
    """d output(p) / d input(q): zero exactly where the mask says, for every channel pair; the
    masked weights get zero gradient."""
    torch.manual_seed(0)
    conv = MaskedConv2d(2, 3, 3, mask_type, dtype=F64)
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    jacobian = torch.autograd.functional.jacobian(
        lambda inp: conv(inp.reshape(1, 2, 5, 5)).reshape(3, 25), x.reshape(-1)
    ).reshape(3, 25, 2, 25)
    depends = (jacobian != 0).any(dim=0).any(dim=1)  # (output pixel, input pixel)
    for p, q in itertools.product(range(25), repeat=2):
        (pr, pc), (qr, qc) = divmod(p, 5), divmod(q, 5)
        in_kernel = abs(qc - pc) <= 1 and 0 <= pr - qr <= 1
        allowed = in_kernel and (q < p or (mask_type == "B" and q == p))
        assert depends[p, q] == allowed, (p, q)
    conv(x).sum().backward()
    assert torch.all(conv.weight.grad[..., conv.mask == 0] == 0)
    assert torch.all(conv.weight.grad[..., conv.mask == 1] != 0)


def test_masked_conv_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mask_type"):
        MaskedConv2d(1, 1, 3, "C")
    with pytest.raises(ValueError, match="kernel_size"):
        MaskedConv2d(1, 1, 4)
    with pytest.raises(ValueError, match="kernel_size"):
        MaskedConv2d(1, 1, (3, 2))
    with pytest.raises(ValueError, match="residual"):
        GatedMaskedConv2d(4, 4, 3, "A", residual=True)
    with pytest.raises(ValueError, match="residual"):
        GatedMaskedConv2d(4, 8, 3, "B", residual=True)


def test_gated_masked_conv_formula_and_residual():
    """y = tanh(f) * sigmoid(g) [+ x] with [f, g] = masked conv(x) + V * s, from the weights."""
    torch.manual_seed(0)
    layer = GatedMaskedConv2d(3, 3, 3, "B", context_channels=2, dtype=F64)
    assert layer.residual
    x, s = torch.randn(2, 3, 5, 5, dtype=F64), torch.randn(2, 2, 5, 5, dtype=F64)
    hidden = (F.conv2d(x, layer.conv.weight * layer.conv.mask, layer.conv.bias, padding=1)
              + F.conv2d(s, layer.context_projection.weight))
    expected = x + hidden[:, :3].tanh() * hidden[:, 3:].sigmoid()
    torch.testing.assert_close(layer(x, s), expected, rtol=0, atol=1e-14)
    assert not GatedMaskedConv2d(3, 3, 3, "A").residual
    assert not GatedMaskedConv2d(3, 4, 3, "B").residual


def test_zero_context_map_is_unconditioned_layer():
    """A zero context map adds nothing (the projection has no bias): the output equals that of
    an unconditioned layer with the same convolution."""
    torch.manual_seed(0)
    conditioned = GatedMaskedConv2d(2, 4, 3, "A", context_channels=2, dtype=F64)
    plain = GatedMaskedConv2d(2, 4, 3, "A", dtype=F64)
    plain.conv.load_state_dict(conditioned.conv.state_dict())
    x = torch.randn(3, 2, 5, 5, dtype=F64)
    assert torch.equal(conditioned(x, torch.zeros(3, 2, 5, 5, dtype=F64)), plain(x))
    assert not torch.equal(conditioned(x, torch.ones(3, 2, 5, 5, dtype=F64)), plain(x))
    with pytest.raises(ValueError, match="context"):
        conditioned(x)
    with pytest.raises(ValueError, match="context"):
        plain(x, torch.zeros(3, 2, 5, 5, dtype=F64))
    with pytest.raises(ValueError, match="context"):
        conditioned(x, torch.zeros(3, 1, 5, 5, dtype=F64))


# The decoder's autoregressive property -------------------------------------------------------

@pytest.mark.parametrize("image_shape,kwargs", [
    ((1, 6, 6), {}),
    ((1, 6, 6), {"first_kernel_size": 5, "kernel_size": (3, 5)}),
    ((2, 5, 5), {"num_layers": 2}),
    ((1, 6, 6), {"context_dim": 0}),
])
def test_decoder_jacobian_is_strictly_lower_triangular(image_shape, kwargs):
    """d logit(c, i) / d x(c', j) == 0 exactly for every raster index j >= i and all channels;
    also zero outside the reach; and non-zero for the left and upper neighbours."""
    context_dim = kwargs.pop("context_dim", 3)
    decoder = decoder64(context_dim, image_shape, **kwargs)
    channels, height, width = image_shape
    pixels = height * width
    x = random_images((1, *image_shape))
    context = torch.randn(1, context_dim, dtype=F64) if context_dim else None
    jacobian = torch.autograd.functional.jacobian(
        lambda inp: decoder(inp.reshape(1, *image_shape), context).reshape(channels, pixels),
        x.reshape(-1),
    ).reshape(channels, pixels, channels, pixels)
    depends = (jacobian != 0).any(dim=0).any(dim=1)  # (logit pixel i, input pixel j)
    assert not depends.triu().any()
    reach_rows, reach_columns = decoder.reach
    rows, columns = torch.arange(pixels) // width, torch.arange(pixels) % width
    outside = ((rows[:, None] - rows[None, :] > reach_rows)
               | ((columns[:, None] - columns[None, :]).abs() > reach_columns))
    assert not depends[outside].any()
    for i in range(pixels):
        if columns[i] > 0:
            assert depends[i, i - 1]
        if rows[i] > 0:
            assert depends[i, i - width]


def test_decoder_28x28_gradients_of_a_few_pixels():
    """The default depth and kernel on 28x28: the gradient of one pixel's logit vanishes exactly
    at that pixel and every later one, and outside the reach (8, 8)."""
    decoder = decoder64(5, (1, 28, 28), channels=8, num_layers=8)
    assert decoder.reach == (8, 8)
    x = random_images((1, 1, 28, 28)).requires_grad_()
    context = torch.randn(1, 5, dtype=F64)
    logits = decoder(x, context)
    raster = torch.arange(784).reshape(28, 28)
    for row, column in [(0, 0), (0, 27), (1, 0), (13, 14), (27, 0), (27, 27)]:
        (grad,) = torch.autograd.grad(logits[0, 0, row, column], x, retain_graph=True)
        grad = grad[0, 0]
        assert torch.all(grad[raster >= raster[row, column]] == 0)
        rows, columns = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
        assert torch.all(grad[(row - rows > 8) | ((columns - column).abs() > 8)] == 0)
        if column > 0:
            assert grad[row, column - 1] != 0
        if row > 0:
            assert grad[row - 1, column] != 0


def test_first_pixel_depends_on_context_only():
    decoder = decoder64()
    x = random_images((4, 1, 6, 6))
    context = torch.randn(4, 3, dtype=F64)
    first = decoder(x, context)[..., 0, 0]
    assert torch.equal(first, decoder(1 - x, context)[..., 0, 0])
    assert torch.equal(first, decoder(torch.zeros_like(x), context)[..., 0, 0])
    assert not torch.equal(first, decoder(x, context + 1)[..., 0, 0])


# Shapes and arguments ------------------------------------------------------------------------

def test_decoder_shapes_and_broadcasting():
    decoder = decoder64()
    x = random_images((5, 1, 6, 6))
    context = torch.randn(3, 1, 3, dtype=F64)
    logits = decoder(x, context)
    assert logits.shape == (3, 5, 1, 6, 6)
    for a, b in itertools.product(range(3), range(5)):
        torch.testing.assert_close(logits[a, b], decoder(x[b:b + 1], context[a])[0],
                                   rtol=0, atol=1e-13)
    default = PixelCNNDecoder(7)
    assert default(torch.zeros(2, 1, 28, 28), torch.zeros(2, 7)).shape == (2, 1, 28, 28)
    assert len(default.layers) == 8 and default.layers[0].conv.kernel_size == (3, 3)
    assert default.layers[1].out_channels == 64 and default.context_channels == 1


def test_decoder_rejects_bad_arguments():
    decoder = decoder64()
    x = random_images((2, 1, 6, 6))
    with pytest.raises(ValueError, match="x must have shape"):
        decoder(x[..., :5], torch.zeros(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="context must have shape"):
        decoder(x, torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="context must have shape"):
        decoder(x)
    with pytest.raises(ValueError, match="num_samples"):
        decoder.generate(torch.zeros(2, 3, dtype=F64), num_samples=2)
    unconditional = decoder64(0)
    with pytest.raises(ValueError, match="context must be None"):
        unconditional(x, torch.zeros(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="num_samples"):
        unconditional.generate()
    for bad in [{"image_shape": (28, 28)}, {"channels": 0}, {"num_layers": 0},
                {"kernel_size": 2}, {"first_kernel_size": 4}, {"context_channels": 0}]:
        with pytest.raises(ValueError):
            PixelCNNDecoder(3, **bad)
    wrong_net = PixelCNNDecoder(3, (1, 6, 6), context_net=nn.Linear(3, 36))
    with pytest.raises(ValueError, match="context_net"):
        wrong_net(torch.zeros(2, 1, 6, 6), torch.zeros(2, 3))


def test_custom_context_net():
    context_net = nn.Sequential(nn.Linear(3, 2 * 36, dtype=F64), nn.Unflatten(-1, (2, 6, 6)))
    decoder = decoder64(context_channels=2, context_net=context_net)
    assert decoder.context_net is context_net
    assert decoder(random_images((2, 1, 6, 6)), torch.randn(2, 3, dtype=F64)).shape == (
        2, 1, 6, 6)


# Sampling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("image_shape,kwargs", [
    ((1, 8, 8), {"num_layers": 2}),                         # reach (2, 2): cropped windows
    ((2, 7, 9), {"first_kernel_size": 5, "kernel_size": (3, 5)}),
    ((1, 5, 6), {"first_kernel_size": (1, 3), "kernel_size": (1, 5)}),   # one-row kernels
    ((1, 28, 28), {"channels": 8, "num_layers": 8}),          # the default reach (8, 8)
])
def test_generate_is_consistent_with_forward(image_shape, kwargs):
    """Each pixel is drawn with the logit forward() gives on the final sample at that pixel."""
    decoder = decoder64(4, image_shape, **kwargs)
    context = torch.randn(3, 4, dtype=F64)
    generator = torch.Generator().manual_seed(2)
    images, logits = decoder.generate(context, generator=generator, return_logits=True)
    assert images.shape == logits.shape == (3, *image_shape)
    assert images.dtype == F64 and torch.all((images == 0) | (images == 1))
    torch.testing.assert_close(logits, decoder(images, context), rtol=0, atol=1e-12)
    again = decoder.generate(context, generator=torch.Generator().manual_seed(2))
    assert torch.equal(images, again)


def test_generate_check_is_sensitive_to_the_sample():
    """The consistency check can fail: the logits of later pixels change by far more than its
    tolerance when one earlier pixel of the sample is flipped."""
    decoder = decoder64(4, (1, 8, 8), num_layers=2)
    context = torch.randn(3, 4, dtype=F64)
    images, logits = decoder.generate(context, generator=torch.Generator().manual_seed(2),
                                      return_logits=True)
    for row, column in [(0, 0), (3, 4), (6, 7)]:
        flipped = images.clone()
        flipped[:, :, row, column] = 1 - flipped[:, :, row, column]
        difference = (logits - decoder(flipped, context)).abs()
        assert difference.max() > 1e-3
        assert torch.all(difference.flatten(1)[:, : row * 8 + column + 1] < 1e-12)


def test_generate_batch_shape_and_unconditional():
    decoder = decoder64(3, (1, 4, 4))
    assert decoder.generate(torch.randn(2, 3, 3, dtype=F64)).shape == (2, 3, 1, 4, 4)
    unconditional = decoder64(0, (1, 4, 4))
    images, logits = unconditional.generate(num_samples=5, return_logits=True)
    assert images.shape == (5, 1, 4, 4) and images.dtype == F64
    torch.testing.assert_close(logits, unconditional(images), rtol=0, atol=1e-12)


def test_generate_distribution_matches_exact_joint():
    """Samples of a 2x2 image against p(x) = prod_i Bernoulli(x_i | sigmoid(logit_i(x))),
    computed by forward() on all 16 images, for one fixed context."""
    decoder = decoder64(2, (1, 2, 2), channels=6, num_layers=2, seed=3)
    # Spread the probabilities so that all 16 cells are well populated but not uniform.
    with torch.no_grad():
        decoder.output.bias.fill_(0.3)
    context = torch.tensor([0.5, -1.0], dtype=F64)
    patterns = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)), dtype=F64)
    images = patterns.reshape(16, 1, 2, 2)
    with torch.no_grad():
        logits = decoder(images, context.expand(16, 2))
    log_joint = -F.binary_cross_entropy_with_logits(logits, images, reduction="none").sum(
        (1, 2, 3))
    probs = log_joint.exp()
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-12)
    samples = decoder.generate(context.expand(20000, 2),
                               generator=torch.Generator().manual_seed(0))
    codes = (samples.reshape(-1, 4) * torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=F64)).sum(-1)
    counts = torch.bincount(codes.long(), minlength=16)
    assert multinomial_goodness_of_fit(probs, counts) > 1e-3
    assert probs.max() / probs.min() > 3  # the test is not against a uniform distribution


# Gated dense and convolutional layers -------------------------------------------------------

def test_gated_dense_formula():
    torch.manual_seed(0)
    layer = GatedDense(5, 3, dtype=F64)
    x = torch.randn(4, 2, 5, dtype=F64)
    weight, bias = layer.linear.weight, layer.linear.bias
    expected = (x @ weight[:3].T + bias[:3]) * torch.sigmoid(x @ weight[3:].T + bias[3:])
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-14)
    relu = GatedDense(5, 3, activation=torch.relu, dtype=F64)
    weight, bias = relu.linear.weight, relu.linear.bias
    expected = torch.relu(x @ weight[:3].T + bias[:3]) * torch.sigmoid(x @ weight[3:].T
                                                                      + bias[3:])
    torch.testing.assert_close(relu(x), expected, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.zeros(4, 6, dtype=F64))
    with pytest.raises(ValueError, match="output_dim"):
        GatedDense(5, 0)


def test_gated_mlp_shapes():
    mlp = GatedMLP(784)
    assert [layer.output_dim for layer in mlp] == [300, 300] and mlp.output_dim == 300
    assert all(isinstance(layer, GatedDense) for layer in mlp)
    assert mlp(torch.rand(7, 784)).shape == (7, 300)
    head = GatedMLP(40, (300, 300), output_dim=784)
    assert isinstance(head[-1], nn.Linear) and len(head) == 3
    assert head(torch.randn(2, 3, 40)).shape == (2, 3, 784)
    assert GatedMLP(6, (), output_dim=2)(torch.randn(4, 6)).shape == (4, 2)
    with pytest.raises(ValueError, match="hidden_dims"):
        GatedMLP(6, ())
    with pytest.raises(ValueError, match="hidden_dims"):
        GatedMLP(6, (0,))


def test_gated_conv_formula():
    torch.manual_seed(0)
    layer = GatedConv2d(2, 3, 3, stride=2, padding=1, dtype=F64)
    x = torch.randn(4, 2, 7, 7, dtype=F64)
    weight, bias = layer.conv.weight, layer.conv.bias
    value = F.conv2d(x, weight[:3], bias[:3], stride=2, padding=1)
    gate = F.conv2d(x, weight[3:], bias[3:], stride=2, padding=1)
    output = layer(x)
    assert output.shape == (4, 3, 4, 4)
    torch.testing.assert_close(output, value * gate.sigmoid(), rtol=0, atol=1e-14)


# Devices -------------------------------------------------------------------------------------

def test_meta_device_construction():
    modules = {
        "dense": GatedDense(784, 300, device="meta"),
        "mlp": GatedMLP(40, output_dim=784, device="meta"),
        "conv": GatedConv2d(1, 32, 7, padding=3, device="meta"),
        "masked": MaskedConv2d(1, 8, 3, "A", device="meta"),
        "decoder": PixelCNNDecoder(40, device="meta"),
    }
    with torch.device("meta"):
        modules["decoder_ctx"] = PixelCNNDecoder(40, channels=16)
    for module in modules.values():
        tensors = list(module.parameters()) + list(module.buffers())
        assert tensors and all(t.device.type == "meta" for t in tensors)
    images, context = torch.empty(2, 1, 28, 28, device="meta"), torch.empty(2, 40, device="meta")
    for name in ("decoder", "decoder_ctx"):
        logits = modules[name](images, context)
        assert logits.device.type == "meta" and logits.shape == (2, 1, 28, 28)
    assert modules["mlp"](context).shape == (2, 784)


def test_generate_on_parameters_device_and_dtype_without_context():
    decoder = decoder64(0, (1, 3, 3))
    assert decoder.generate(num_samples=2).dtype == F64
    decoder = PixelCNNDecoder(0, (1, 3, 3), channels=4, num_layers=2)
    assert decoder.generate(num_samples=2).dtype == torch.float32


@CUDA
def test_cuda_forward_matches_cpu():
    decoder = decoder64(4, (1, 12, 12), num_layers=4)
    x, context = random_images((3, 1, 12, 12)), torch.randn(3, 4, dtype=F64)
    expected = decoder(x, context)
    cuda = torch.device("cuda")
    torch.testing.assert_close(decoder.to(cuda)(x.to(cuda), context.to(cuda)).cpu(), expected,
                               rtol=0, atol=1e-10)


@CUDA
@pytest.mark.parametrize("dtype,atol", [(F64, 1e-10), (torch.float32, 1e-4)])
def test_cuda_generate(dtype, atol):
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    decoder = PixelCNNDecoder(4, (1, 28, 28), channels=16, device=cuda, dtype=dtype)
    context = torch.randn(4, 4, device=cuda, dtype=dtype)
    generator = torch.Generator(cuda).manual_seed(0)
    images, logits = decoder.generate(context, generator=generator, return_logits=True)
    assert images.device.type == "cuda" and images.dtype == dtype
    assert images.shape == (4, 1, 28, 28) and torch.all((images == 0) | (images == 1))
    torch.testing.assert_close(logits, decoder(images, context), rtol=0, atol=atol)
    unconditional = PixelCNNDecoder(0, (1, 5, 5), channels=4, num_layers=2, device=cuda)
    assert unconditional.generate(num_samples=3).device.type == "cuda"
