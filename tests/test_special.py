"""Accuracy of pyro_dgm.special against mpmath (a stored 30-digit table, and in-test values)
and scipy; its derivatives of every order against the plain-torch reference and finite
differences; torch.func transforms."""

import json
import math
from pathlib import Path

import mpmath
import numpy as np
import pytest
import scipy.special
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_dgm.special import (
    _KINDS,
    _bessel_parts,
    _evaluate,
    _log_iv_parts,
    _reference_parts,
    bessel_iv_ratio,
    log_bessel_iv,
    log_bessel_iv_normalized,
    log_bessel_iv_normalized_and_ratio,
)

REFERENCE = json.loads((Path(__file__).parent / "data" / "bessel_reference.json").read_text())
V, X, LOG_IV, RATIO = np.array(REFERENCE["rows"], dtype=float).T


def relative_error(got, expected):
    """|delta log I| / max(1, |log I|), the issue's accuracy measure."""
    return np.abs(got - expected) / np.maximum(1.0, np.abs(expected))


def test_reference_covers_the_promised_range():
    assert V.min() == 0 and V.max() == 5000 and np.any(V % 1 == 0.5)
    assert X.min() == pytest.approx(1e-10) and X.max() == pytest.approx(1e6)
    assert len(V) == 1300


def test_log_bessel_iv_float64_against_mpmath():
    got = log_bessel_iv(torch.tensor(V), torch.tensor(X, dtype=torch.float64)).numpy()
    assert np.isfinite(got).all()
    assert relative_error(got, LOG_IV).max() < 1e-13  # the issue asks for 1e-9


def test_log_bessel_iv_float32_against_mpmath():
    # Reference at the float32-rounded arguments: d log I / dx is up to ~1, so the rounding
    # of x itself (6e-8 relative) would otherwise dominate.
    x32 = torch.tensor(X, dtype=torch.float32)
    got = log_bessel_iv(torch.tensor(V), x32).double().numpy()
    exact = LOG_IV + (x32.double().numpy() - X) * (RATIO + V / X)  # first-order correction
    assert got.dtype == np.float64 and log_bessel_iv(1.0, x32).dtype == torch.float32
    assert relative_error(got, exact).max() < 1e-5


def test_float32_configuration_is_accurate_before_rounding():
    """Float32 inputs take the short shift and expansion (_SHIFT_SINGLE): their float64
    results, before the final rounding to float32, are within 2e-9 of mpmath (log I_v,
    relative to max(1, |log I_v|)) and 5e-10 (the ratio), at the float32-rounded arguments."""
    x32 = torch.tensor(X, dtype=torch.float32)
    log_iv, _, ratio = _log_iv_parts(torch.tensor(V), x32)
    shift = x32.double().numpy() - X
    exact_log_iv = LOG_IV + shift * (RATIO + V / X)  # first-order corrections
    exact_ratio = RATIO + shift * (1 - RATIO**2 - (2 * V + 1) * RATIO / X)
    assert relative_error(log_iv.numpy(), exact_log_iv).max() < 2e-9
    assert (np.abs(ratio.numpy() - exact_ratio) / exact_ratio).max() < 5e-10


def test_bessel_iv_ratio_against_mpmath():
    got = bessel_iv_ratio(torch.tensor(V), torch.tensor(X, dtype=torch.float64)).numpy()
    assert (np.abs(got - RATIO) / RATIO).max() < 1e-12


def test_normalized_is_log_iv_minus_leading_term():
    v, x = torch.tensor(V), torch.tensor(X, dtype=torch.float64)
    normalized = log_bessel_iv_normalized(v, x).numpy()
    expected = LOG_IV - V * np.log(X / 2) + np.array([math.lgamma(o + 1) for o in V])
    scale = np.maximum(1.0, np.abs(LOG_IV))  # the cancellation in `expected` is of that size
    assert (np.abs(normalized - expected) / scale).max() < 1e-13
    both = log_bessel_iv_normalized_and_ratio(v, x)
    assert torch.equal(both[0], torch.from_numpy(normalized))
    assert torch.equal(both[1], bessel_iv_ratio(v, x))


@pytest.mark.parametrize("v", [0.0, 0.5, 3.0, 100.0])
def test_against_scipy_where_scipy_is_accurate(v):
    x = np.logspace(-3, 3, 50)
    scaled = scipy.special.ive(v, x)
    x = x[scaled > 1e-290]  # scipy underflows (to 0) where mpmath and we do not
    expected = np.log(scaled[scaled > 1e-290]) + x
    got = log_bessel_iv(v, torch.tensor(x)).numpy()
    assert relative_error(got, expected).max() < 1e-12


def test_exact_limits_at_zero():
    v = torch.tensor([0.0, 0.5, 1.0, 2499.5], dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    log_iv = log_bessel_iv(v, zero)
    assert log_iv[0] == 0 and torch.isneginf(log_iv[1:]).all()
    assert torch.equal(bessel_iv_ratio(v, zero), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(log_bessel_iv_normalized(v, zero), torch.zeros(4, dtype=torch.float64))
    (grad,) = torch.autograd.grad(log_bessel_iv_normalized(v, zero).sum(), zero)
    assert torch.equal(grad, torch.zeros(4, dtype=torch.float64))
    (grad,) = torch.autograd.grad(bessel_iv_ratio(v, zero).sum(), zero)
    torch.testing.assert_close(grad, 0.5 / (v + 1))  # r ~ x / (2 (v + 1))


def test_half_integer_closed_form():
    # I_{1/2}(x) = sqrt(2 / (pi x)) sinh(x)
    x = torch.logspace(-8, 2.5, 200, dtype=torch.float64)
    expected = 0.5 * torch.log(2 / (math.pi * x)) + torch.log(torch.sinh(x))
    torch.testing.assert_close(log_bessel_iv(0.5, x), expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_and_match_formulas(dtype):
    v = torch.tensor(V, dtype=dtype)
    x = torch.tensor(X, dtype=dtype, requires_grad=True)
    (grad_log,) = torch.autograd.grad(log_bessel_iv(v, x).sum(), x)
    (grad_ratio,) = torch.autograd.grad(bessel_iv_ratio(v, x).sum(), x)
    (grad_normalized,) = torch.autograd.grad(log_bessel_iv_normalized(v, x).sum(), x)
    for grad in (grad_log, grad_ratio, grad_normalized):
        assert torch.isfinite(grad).all()
    ratio = torch.tensor(RATIO, dtype=dtype)
    torch.testing.assert_close(grad_log, ratio + v / x.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_normalized, ratio, rtol=1e-5, atol=0)


@pytest.mark.parametrize("v", [0.0, 1.5, 31.5, 1000.0])
@pytest.mark.parametrize("x0", [1e-3, 0.7, 5.0, 80.0, 3000.0])
def test_gradients_against_finite_differences(v, x0):
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    h = 1e-6 * x0
    for fn in (log_bessel_iv, bessel_iv_ratio, log_bessel_iv_normalized):
        (grad,) = torch.autograd.grad(fn(v, x), x)
        plus, minus = (torch.tensor(x0 + s * h, dtype=torch.float64) for s in (1, -1))
        numeric = (fn(v, plus) - fn(v, minus)) / (2 * h)
        torch.testing.assert_close(grad, numeric.to(grad.dtype), rtol=1e-6, atol=1e-12)


def test_broadcasting_and_gradient_shapes():
    v = torch.tensor([[0.5], [4.0], [30.0]], dtype=torch.float64)  # (3, 1)
    x = torch.tensor([0.1, 2.0, 50.0, 900.0], dtype=torch.float64, requires_grad=True)
    out = log_bessel_iv(v, x)
    assert out.shape == (3, 4)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape
    loop = sum(torch.autograd.grad(log_bessel_iv(float(o), x).sum(), x)[0] for o in v.flatten())
    torch.testing.assert_close(grad, loop)


@settings(max_examples=60, deadline=None)
@given(
    v=st.floats(0, 2000, allow_nan=False),
    x=st.floats(1e-8, 1e5, allow_nan=False),
)
def test_recurrence_and_bounds_hold(v, x):
    """I_{v-1} - I_{v+1} = (2v/x) I_v for v >= 1; and Amos' bounds on the ratio."""
    x_t = torch.tensor(x, dtype=torch.float64)
    ratio = bessel_iv_ratio(v, x_t).item()
    lower = x / (v + 1 + math.sqrt((v + 1) ** 2 + x * x))
    upper = x / (v + 0.5 + math.sqrt((v + 0.5) ** 2 + x * x))
    assert lower * (1 - 1e-12) <= ratio <= upper * (1 + 1e-12)
    if v >= 1:
        log_prev, log_mid, log_next = (log_bessel_iv(o, x_t).item() for o in (v - 1, v, v + 1))
        # divide by I_{v-1}: 1 - exp(log_next - log_prev) = (2 v / x) exp(log_mid - log_prev)
        lhs = -math.expm1(log_next - log_prev)
        rhs = 2 * v / x * math.exp(log_mid - log_prev)
        # each side is a difference of logs of size |log I|: allow that much rounding
        assert lhs == pytest.approx(rhs, rel=1e-9, abs=1e-14 * max(1.0, abs(log_mid)))


def test_octave_tables_of_float32_inputs_against_mpmath():
    """One order and float32 inputs: log 0F1 and the ratio from the per-octave polynomials
    (_octave_table), in float64 before rounding, within 5e-11 of mpmath (log 0F1 relative to
    max(1, |log 0F1|)) and 1e-11 (the ratio, relative), at the float32-rounded arguments; and
    the exact limits at 0, NaN below it."""
    worst = np.zeros(2)
    for v in np.unique(V):
        rows = V == v
        x32 = torch.tensor(X[rows], dtype=torch.float32)
        _, normalized, ratio = _log_iv_parts(float(v), x32, with_log_iv=False)
        assert normalized.dtype == ratio.dtype == torch.float64
        shift = x32.double().numpy() - X[rows]
        exact_normalized = (LOG_IV[rows] - v * np.log(X[rows] / 2) + math.lgamma(v + 1)
                            + shift * RATIO[rows])
        exact_ratio = RATIO[rows] + shift * (
            1 - RATIO[rows] ** 2 - (2 * v + 1) * RATIO[rows] / X[rows])
        worst = np.maximum(worst, [
            (np.abs(normalized.numpy() - exact_normalized)
             / np.maximum(1.0, np.abs(exact_normalized))).max(),
            (np.abs(ratio.numpy() - exact_ratio) / exact_ratio).max(),
        ])
    assert worst[0] < 5e-11 and worst[1] < 1e-11
    edges = torch.tensor([0.0, -1.0, float("nan")])
    _, normalized, ratio = _log_iv_parts(4.5, edges, with_log_iv=False)
    assert normalized[0] == 0 and ratio[0] == 0
    assert normalized[1:].isnan().all() and ratio[1:].isnan().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    v, x = torch.tensor(V), torch.tensor(X, dtype=torch.float64)
    cpu = log_bessel_iv(v, x)
    cuda = log_bessel_iv(v.cuda(), x.cuda())
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-13, atol=1e-13)


def test_one_order_for_all_x_against_mpmath():
    """A Python-number order takes the polynomial form of Debye's sums and of the recurrence
    (_debye_and_recurrence), with coefficients computed on the host: as accurate as the
    per-element path, in both configurations."""
    worst = np.zeros(4)
    for v in np.unique(V):
        rows = V == v
        x = torch.tensor(X[rows], dtype=torch.float64)
        log_iv, normalized, ratio = _log_iv_parts(float(v), x)
        expected_normalized = LOG_IV[rows] - v * np.log(X[rows] / 2) + math.lgamma(v + 1)
        x32 = x.float()
        log_iv32, _, ratio32 = _log_iv_parts(float(v), x32)
        shift = x32.double().numpy() - X[rows]
        exact_log_iv = LOG_IV[rows] + shift * (RATIO[rows] + v / X[rows])
        exact_ratio = RATIO[rows] + shift * (
            1 - RATIO[rows] ** 2 - (2 * v + 1) * RATIO[rows] / X[rows])
        errors = [
            max(relative_error(log_iv.numpy(), LOG_IV[rows]).max(),
                (np.abs(normalized.numpy() - expected_normalized)
                 / np.maximum(1.0, np.abs(LOG_IV[rows]))).max()),
            (np.abs(ratio.numpy() - RATIO[rows]) / RATIO[rows]).max(),
            relative_error(log_iv32.numpy(), exact_log_iv).max(),
            (np.abs(ratio32.numpy() - exact_ratio) / exact_ratio).max(),
        ]
        worst = np.maximum(worst, errors)
    assert worst[0] < 1e-13 and worst[1] < 1e-12
    assert worst[2] < 2e-9 and worst[3] < 5e-10


# The kinds of _bessel_parts: accuracy, derivatives of every order, torch.func ------------


def mpmath_kinds(v: float, x: float) -> dict[str, float]:
    """Every kind of :data:`pyro_dgm.special._KINDS` at (v, x) in 40-digit arithmetic (A' from
    1 - r^2 - (2 v + 1) r / x, which loses at most 12 of those digits for x <= 1e6)."""
    mpmath.mp.dps = 40
    v, x = mpmath.mpf(v), mpmath.mpf(x)
    iv = mpmath.besseli(v, x, maxterms=10**6)
    ratio = mpmath.besseli(v + 1, x, maxterms=10**6) / iv
    normalized = mpmath.log(iv) - v * mpmath.log(x / 2) + mpmath.loggamma(v + 1)
    exact = {
        "log_iv": mpmath.log(iv),
        "normalized": normalized,
        "scaled": normalized - x,
        "ratio": ratio,
        "complement": 1 - ratio,
        "slope": 1 - ratio**2 - (2 * v + 1) * ratio / x,
        "intercept": normalized - x * ratio,
    }
    return {kind: float(value) for kind, value in exact.items()}


EXTENDED_ORDERS = [0.0, 0.5, 1.5, 4.5, 49.0, 499.0]
EXTENDED_X = np.logspace(-3, 6, 13)


@pytest.fixture(scope="module")
def extended_reference() -> dict[float, dict[str, np.ndarray]]:
    return {
        v: {
            kind: np.array([mpmath_kinds(v, x)[kind] for x in EXTENDED_X])
            for kind in _KINDS
        }
        for v in EXTENDED_ORDERS
    }


# |error| / scale, the scale of each kind: the ratio, its complement and A' relative to
# themselves; log I_v and log 0F1 relative to max(1, |log I_v|) (as above: log 0F1 is log I_v
# less terms of its size), log 0F1 - x relative to max(1, |log 0F1 - x|) and the intercept
# (log 0F1 - x r = (log 0F1 - x) + x (1 - r)) to the same
def kind_errors(kind, got, exact):
    if kind in ("ratio", "complement", "slope"):
        scale = np.abs(exact[kind])
    elif kind in ("intercept", "scaled"):
        scale = np.maximum(1.0, np.abs(exact["scaled"]))
    else:
        scale = np.maximum(1.0, np.abs(exact["log_iv"]))
    return np.abs(got - exact[kind]) / scale


def test_every_kind_for_one_order_against_mpmath(extended_reference):
    """float64, one order: 1 - r, A' = dr/dx and log 0F1 - x free of cancellation up to
    x = 1e6 (the naive 1 - r loses up to 1e-10 there, A' = 1 - r^2 - (2 v + 1) r / x all of
    its digits)."""
    worst = dict.fromkeys(_KINDS, 0.0)
    for v in EXTENDED_ORDERS:
        parts = _evaluate(v, torch.tensor(EXTENDED_X), frozenset(_KINDS))
        for kind in _KINDS:
            error = kind_errors(kind, parts[kind].numpy(), extended_reference[v]).max()
            worst[kind] = max(worst[kind], error)
    limits = {"ratio": 2e-15, "complement": 5e-14, "slope": 5e-14, "log_iv": 1e-13,
              "normalized": 1e-13, "scaled": 1e-13, "intercept": 1e-13}
    assert all(worst[kind] < limits[kind] for kind in _KINDS), worst


def test_reference_and_orders_per_element_against_mpmath(extended_reference):
    """The plain-torch reference (also the path of tensor orders), float64: within a few
    1e-13 (its delta recurrence accumulates rounding, see _reference_debye_recurrence)."""
    v = torch.tensor(EXTENDED_ORDERS).unsqueeze(-1)
    x = torch.tensor(EXTENDED_X)
    for parts in (_reference_parts(v, x, frozenset(_KINDS)), _evaluate(v, x, frozenset(_KINDS))):
        for kind in _KINDS:
            for row, order in enumerate(EXTENDED_ORDERS):
                error = kind_errors(kind, parts[kind][row].numpy(), extended_reference[order])
                assert error.max() < 2e-12, (kind, order, error.max())


@pytest.mark.parametrize("kinds", [_KINDS, ("normalized", "scaled", "complement", "intercept")])
def test_every_kind_of_float32_inputs_before_rounding(kinds):
    """Float32 inputs (the short expansion, or for the kinds that follow from log 0F1 and the
    ratio the octave tables) in float64 before the final rounding, against the float64
    evaluation at the same (float32) arguments: within 1e-8, relative to the value (the ratio,
    its complement and A') or to max(1, |value|) (the logarithms), far below float32's
    rounding (6e-8); except 1 - r from the tables, whose ratio's error (4e-12) grows by
    2 x / (2 v + 1) in it: 2.3e-8 at x = 3e5 for v = 0, under float32's rounding still."""
    x = torch.tensor([1e-4, 0.2, 1.0, 7.0, 60.0, 900.0, 2e4, 3e5])
    for v in (0.0, 1.5, 31.5):
        exact = _evaluate(v, x.double(), frozenset(kinds))
        got = _evaluate(v, x, frozenset(kinds))
        for kind in kinds:
            assert got[kind].dtype == torch.float64
            floor = 1.0 if kind in ("log_iv", "normalized", "scaled", "intercept") else 0.0
            error = (got[kind] - exact[kind]).abs() / exact[kind].abs().clamp(min=floor)
            limit = 5e-8 if kind == "complement" and "slope" not in kinds else 1e-8
            assert error.max() < limit, (v, kind, error.max())


def derivatives(function, x: torch.Tensor, create_graph: bool = True):
    """(value, first derivative, second derivative) of ``function`` summed, at ``x``."""
    x = x.detach().clone().requires_grad_()
    value = function(x)
    (first,) = torch.autograd.grad(value.sum(), x, create_graph=create_graph)
    if not create_graph:
        return value.detach(), first, None
    (second,) = torch.autograd.grad(first.sum(), x)
    return value.detach(), first.detach(), second


def assert_fused_matches_reference(device: str) -> None:
    """The fused Function (_BesselParts, with its rules and its first-order backward pass) and
    the plain-torch reference differentiated by autograd: values, first and second
    derivatives, float32 and float64, one order and orders per element."""
    tolerances = {torch.float64: (1e-12, 1e-11, 1e-9), torch.float32: (2e-6, 2e-6, 2e-5)}
    for dtype, (value_tol, first_tol, second_tol) in tolerances.items():
        x = torch.tensor([1e-3, 0.3, 2.0, 17.0, 150.0, 3000.0], dtype=dtype, device=device)
        orders = (0.0, 1.5, 31.5, torch.tensor([[0.0], [1.5], [31.5]], dtype=dtype,
                                               device=device))
        for v in orders:
            for kind in _KINDS:
                def fused_function(at, v=v, kind=kind):
                    return _bessel_parts(v, at, (kind,))[0]

                def reference_function(at, v=v, kind=kind):
                    return _reference_parts(v, at, frozenset([kind]))[kind].to(at.dtype)

                fused = derivatives(fused_function, x)
                first_order = derivatives(fused_function, x, False)
                reference = derivatives(reference_function, x)
                tolerances = (value_tol, first_tol, second_tol)
                for got, expected, tol in zip(fused, reference, tolerances, strict=True):
                    torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=kind)
                torch.testing.assert_close(first_order[1], reference[1], rtol=first_tol,
                                           atol=first_tol, msg=kind)


def test_fused_matches_reference():
    assert_fused_matches_reference("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_matches_reference_on_cuda():
    assert_fused_matches_reference("cuda")


def nth_derivative(kind: str, v: float, x0: float, order: int) -> float:
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    value = _bessel_parts(v, x, (kind,))[0]
    for _ in range(order):
        (value,) = torch.autograd.grad(value, x, create_graph=True)
    return float(value.detach())


@pytest.mark.parametrize("kind", _KINDS)
def test_second_and_third_derivatives_against_finite_differences(kind):
    """d^2 and d^3 of every kind (float64) against central differences of the autograd
    derivative one order below."""
    v = 2.5
    for x0 in (0.4, 3.0, 25.0, 400.0):
        step = 1e-4 * x0
        for order in (2, 3):
            expected = (nth_derivative(kind, v, x0 + step, order - 1)
                        - nth_derivative(kind, v, x0 - step, order - 1)) / (2 * step)
            got = nth_derivative(kind, v, x0, order)
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-9), (x0, order)


def test_derivatives_at_zero():
    """At x = 0, from r = x / (2 (v + 1)) - x^3 / (8 (v + 1)^2 (v + 2)) + O(x^5), the slope
    A = dr/dx has A(0) = 1 / (2 (v + 1)), dA/dx(0) = 0 and d2A/dx2(0) = -3 / (4 (v + 1)^2
    (v + 2)); and the higher derivatives of A, where the rule for dA/dx in r and A has a
    removable singularity, equal the reference's (its series, a polynomial at 0): 0 for the
    odd ones (A is even in x), not for the fourth."""
    v = 2.5
    a1, a3 = 1 / (2 * (v + 1)), -3 / (4 * (v + 1) ** 2 * (v + 2))
    expected = {  # kind: (second, third derivative) at 0
        "normalized": (a1, 0.0), "scaled": (a1, 0.0), "intercept": (-a1, 0.0),
        "ratio": (0.0, a3), "complement": (0.0, -a3), "slope": (a3, None),
    }
    for kind, values in expected.items():
        for order, value in zip((2, 3), values, strict=True):
            if value is not None:
                got = nth_derivative(kind, v, 0.0, order)
                assert got == pytest.approx(value, rel=1e-12, abs=1e-15), (kind, order)
    x = torch.zeros((), dtype=torch.float64, requires_grad=True)
    reference = _reference_parts(v, x, frozenset(["slope"]))["slope"]
    for order in range(1, 5):
        (reference,) = torch.autograd.grad(reference, x, create_graph=True)
        got = nth_derivative("slope", v, 0.0, order)
        assert got == pytest.approx(float(reference.detach()), rel=1e-12, abs=1e-15), order
        assert (got == 0) == (order % 2 == 1)


@pytest.mark.parametrize("function", [log_bessel_iv, log_bessel_iv_normalized, bessel_iv_ratio])
def test_torch_func_transforms_match_autograd(function):
    """grad, vmap, jacrev (and grad of grad) of the public functions through the reference
    equal autograd's derivatives of the fused path."""
    x = torch.tensor([0.05, 1.3, 9.0, 120.0, 5e3], dtype=torch.float64)
    for v in (0.0, 3.5):
        def f(at, v=v):
            return function(v, at)
        value, first, second = derivatives(f, x)
        torch.testing.assert_close(torch.func.vmap(f)(x), value, rtol=1e-13, atol=1e-13)
        grad = torch.func.vmap(torch.func.grad(f))(x)
        torch.testing.assert_close(grad, first, rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(torch.func.jacrev(f)(x).diagonal(), first, rtol=1e-11,
                                   atol=1e-14)
        second_func = torch.func.vmap(torch.func.grad(torch.func.grad(f)))(x)
        torch.testing.assert_close(second_func, second, rtol=1e-9, atol=1e-14)
    both = torch.func.vmap(lambda at: log_bessel_iv_normalized_and_ratio(1.5, at))(x)
    torch.testing.assert_close(both, log_bessel_iv_normalized_and_ratio(1.5, x), rtol=1e-13,
                               atol=1e-13)
