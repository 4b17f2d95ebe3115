"""Modified Bessel functions of the first kind, in log space, on the tensor's own device.

The von Mises-Fisher distribution needs :math:`\\log I_v(x)` and the ratio
:math:`I_{v+1}(x) / I_v(x)` for orders :math:`v = m/2 - 1` up to the thousands and arguments
from :math:`10^{-10}` to :math:`10^6`, where :math:`I_v` itself under- or overflows in any
floating-point type. This module evaluates them in pure torch, broadcasting, with hand-written
derivatives of every order and no host synchronisation.

Numerical regime (all arithmetic in float64, results cast back to the input's dtype):

* :math:`x \\le \\sqrt{v + 1} / 4`: the power series of
  :math:`{}_0F_1(; v + 1; x^2 / 4) = \\Gamma(v + 1) (2 / x)^v I_v(x)`, whose terms fall at least
  64-fold each; exact at :math:`x = 0`.
* otherwise: Debye's uniform asymptotic expansion [1, 10.41.3] at the shifted order
  :math:`u = v + N` (``N = 24``, 9 terms), accurate to a few :math:`10^{-14}` for every
  :math:`x` (for float32 inputs ``N = 8`` and 6 terms, accurate to about :math:`10^{-9}`,
  far below float32's rounding), followed by ``N`` steps of the recurrence
  :math:`r_{n-1} = 1 / (2 n / x + r_n)` for :math:`r_n = I_{n+1}(x) / I_n(x)`, which is stable
  downwards [2]. The starting ratio :math:`r_u` comes from Debye's expansion of
  :math:`I_u'` [1, 10.41.4] at the same order, written so that nothing cancels. For one order
  shared by all ``x`` (a Python number, as in the von Mises-Fisher distribution) both the
  expansions and the ``N`` recurrence steps, a product of 2 x 2 matrices whose entries are
  polynomials in :math:`1/x` with positive coefficients, are polynomials with coefficients
  computed once on the host: one GEMM evaluates them all, about 40 operations in all.

For one order and inputs below float64 (float32 parameters of a von Mises-Fisher
distribution in training), :math:`\\log {}_0F_1` and the ratio are read from a table instead,
about 20 operations: one polynomial per binary octave :math:`[2^{e-1}, 2^e)` of ``x``, for
every exponent ``e`` of float32 (subnormals included), in the variable
:math:`t = m - 3/4 \\in [-1/4, 1/4)` of the mantissa :math:`m` of ``torch.frexp``. Each polynomial
interpolates the float64 evaluation above at 14 Chebyshev points of its octave (computed once
per order and device); in every octave both functions are smooth in :math:`t`, and the table
is accurate to about :math:`10^{-11}` (relative to :math:`\\max(1, |\\log {}_0F_1|)`, and for
the ratio relative to itself), better than the shortened expansion of float32 inputs.

The von Mises-Fisher entropy, log-density and KL divergences at large :math:`x` also need
:math:`\\log {}_0F_1 - x`, :math:`1 - r` and :math:`A' = dr/dx` (and
:math:`\\log {}_0F_1 - x r`), which the formulas in :math:`\\log {}_0F_1` and :math:`r`
give only after cancelling terms of size :math:`x` (:math:`A' \\approx (2 v + 1) / (2 x^2)`
is all cancellation at :math:`x = 10^6`). :func:`_debye_and_recurrence_extended` computes
them directly: :math:`1 - r_u` and :math:`r_u'` from Debye's expansions at the shifted order
written without subtraction, carried down to :math:`v` through polynomials of the recurrence
matrix with exact rational coefficients (in which the cancellations are exact); relative
errors about :math:`2 \\cdot 10^{-14}` up to :math:`x = 10^6` (tests/test_special.py).

Derivatives of every order: :class:`_BesselParts` attaches to each of these values its
derivative written in the others (:data:`_FACTORS`), evaluated again through itself when a
derivative of a derivative is taken. Under ``torch.func`` transforms and forward-mode AD the
plain-torch reference :func:`_reference_parts` (both regions evaluated everywhere, no in-place
operations) is differentiated instead.

References:

1. NIST Digital Library of Mathematical Functions, chapter 10, https://dlmf.nist.gov/10.41
2. W. Gautschi, "Computational aspects of three-term recurrence relations", SIAM Review 9
   (1967)
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from functools import cache

import torch
from torch import Tensor

from pyro_dgm._fused import cache_forward_signature, needs_reference, reference_vjp

__all__ = [
    "bessel_iv_ratio",
    "log_bessel_iv",
    "log_bessel_iv_normalized",
    "log_bessel_iv_normalized_and_ratio",
    "log_bessel_iv_normalized_and_ratio_values",
]

# Order shift before the Debye expansion, and its number of terms: with u >= 24 and 9 terms
# the result is within 2e-14 of mpmath over the tested range (tests/test_special.py). Results
# returned in float32 need far less: u >= 8 and 6 terms give 1.3e-9 (log I_v, relative to
# max(1, |log I_v|)) and 3.4e-10 (the ratio), 50 times below float32's rounding, for 19 fewer
# operations (measured against the same reference; tests/test_special.py checks both).
_SHIFT, _DEBYE_TERMS = 24, 9
_SHIFT_SINGLE, _DEBYE_TERMS_SINGLE = 8, 6
# The power series is used for x^2 <= _SERIES_REGION (v + 1), where its k-th term is at most
# 1 / (64 k) times the previous one: 7 terms leave a relative error below 1e-16. (A small
# region keeps the common x >= 1 of a vMF's concentration out of it.)
_SERIES_REGION = 1 / 16
_SERIES_TERMS = 7
# The octave tables of float32 inputs: 14 coefficients per octave (measured: relative errors
# below 2.2e-11 for log 0F1 and 3.6e-12 for the ratio against mpmath, v from 0 to 5000), one
# octave per exponent of torch.frexp of a float32, subnormals included.
_OCTAVE_POINTS = 14
_OCTAVE_EXPONENTS = range(-148, 129)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

#: What :func:`_bessel_parts` evaluates, by name: ``log_iv`` log I_v(x); ``normalized``
#: log 0F1(; v + 1; x^2 / 4) = log[Gamma(v + 1) (2 / x)^v I_v(x)]; ``scaled`` that less x (the
#: exponentially scaled form, finite for large x without the cancellation of
#: log 0F1 - x); ``ratio`` r = I_{v+1}(x) / I_v(x); ``complement`` 1 - r; ``slope``
#: A' = dr/dx = 1 - r^2 - (2 v + 1) r / x; ``intercept`` log 0F1 - x r (the intercept at 0 of
#: the tangent of log 0F1 at x; the von Mises-Fisher entropy less log|S^{m-1}|), with
#: derivative -x A'. The last four are computed without subtracting the large terms of those
#: formulas (:func:`_debye_and_recurrence_extended`).
_KINDS = ("log_iv", "normalized", "scaled", "ratio", "complement", "slope", "intercept")
# The values each kind's derivative is written in (see _BesselParts).
_FACTORS = {
    "log_iv": ("ratio",), "normalized": ("ratio",), "scaled": ("complement",),
    "ratio": ("slope",), "complement": ("slope",), "slope": ("ratio", "slope"),
    "intercept": ("slope",),
}
_BASIC_KINDS = frozenset({"log_iv", "normalized", "ratio"})  # what _log_iv_parts gives
_TABLE_KINDS = frozenset({"normalized", "ratio", "scaled", "complement", "intercept"})
_SLOPE = frozenset({"slope"})


def _debye_polynomials(count: int) -> list[list[Fraction]]:
    """Coefficients (in powers of p) of Debye's polynomials U_0 .. U_{count-1}, exactly.

    U_{k+1}(p) = p^2 (1 - p^2) U_k'(p) / 2 + (1/8) int_0^p (1 - 5 t^2) U_k(t) dt  [DLMF 10.41.9]
    """
    polynomials = [[Fraction(1)]]
    for _ in range(count - 1):
        previous = polynomials[-1]
        following = [Fraction(0)] * (len(previous) + 3)
        for power, coefficient in enumerate(previous):
            if power > 0:  # p^2 (1 - p^2) / 2 * d/dp p^power
                following[power + 1] += power * coefficient / 2
                following[power + 3] -= power * coefficient / 2
            # (1/8) int_0^p (1 - 5 t^2) t^power dt
            following[power + 1] += coefficient / (8 * (power + 1))
            following[power + 3] -= 5 * coefficient / (8 * (power + 3))
        while following and following[-1] == 0:
            following.pop()
        polynomials.append(following)
    return polynomials


def _debye_w_polynomial(previous: list[Fraction]) -> list[Fraction]:
    """Coefficients (in powers of p) of W_k = -sum_j (j + 1/2) c_j p^(j + 1), the c_j being
    those of U_{k-1} (see :func:`_debye_matrix`)."""
    return [Fraction(0)] + [-(j + Fraction(1, 2)) * c for j, c in enumerate(previous)]


@cache
def _debye_matrix(device: torch.device, terms: int) -> Tensor:
    """(K, 2K) float64 matrix [A | B] for K = ``terms``, cached per device, with

    U_k(p) = p^k sum_i A[i, k] p^(2 i)   and   W_k(p) = p^k sum_i B[i, k] p^(2 i),

    W_k = (V_k - U_k) / (1 - p^2) = -p (U_{k-1} / 2 + p U_{k-1}') [DLMF 10.41.11], V_k being
    Debye's polynomials of I_u'. U_k and W_k have only the powers p^k, p^(k+2), ..., so
    sum_k U_k(p) / u^k = sum_k h^-k A_k(p^2) with h = u / p, and likewise for W.
    """
    polynomials = _debye_polynomials(terms)
    matrix = torch.zeros(terms, 2 * terms, dtype=torch.float64)
    for k, polynomial in enumerate(polynomials):
        assert all(c == 0 for j, c in enumerate(polynomial) if j < k or (j - k) % 2)
        matrix[: k + 1, k] = torch.tensor(
            [float(c) for c in polynomial[k::2]], dtype=torch.float64
        )
        if k > 0:
            w = _debye_w_polynomial(polynomials[k - 1])
            assert all(c == 0 for j, c in enumerate(w) if j < k or (j - k) % 2)
            matrix[: len(w[k::2]), terms + k] = torch.tensor(
                [float(c) for c in w[k::2]], dtype=torch.float64
            )
    return matrix.to(device)


def _powers(base: Tensor, count: int) -> Tensor:
    """[1, t, t^2, ..., t^(count-1)] along a new first dimension, written in place."""
    powers = base.new_empty((count, *base.shape))
    powers[0] = 1
    powers[1] = base
    for k in range(2, count):
        torch.mul(powers[k - 1], base, out=powers[k])
    return powers


def _debye_log_iv_and_ratio(
    order: Tensor | float, x: Tensor, terms: int
) -> tuple[Tensor, Tensor]:
    """log I_u(x) and I_{u+1}(x) / I_u(x) from ``terms`` terms of Debye's expansions of I_u
    and I_u' [DLMF 10.41.3, 10.41.4], for u >= the shift and x > 0. With h = sqrt(u^2 + x^2)
    and p = u / h:

    log I_u(x) = h + u log(x / (u + h)) - log(2 pi h) / 2 + log S_U,
    I_{u+1} / I_u = I_u' / I_u - u / x = x (1 / (h + u) + S_W / (h S_U)),

    S_U = sum_k U_k(p) / u^k, S_W = sum_k W_k(p) / u^k; the second form comes from
    h S_V / S_U - u = x^2 / (h + u) + h (1 - p^2) S_W / S_U and subtracts nothing.
    """
    hypot = (x * x + order * order).sqrt()
    inverse_hypot = hypot.reciprocal()
    p = order * inverse_hypot
    powers = _powers(torch.stack([p * p, inverse_hypot]), terms)  # (K, 2, ...)
    # (2K, K) @ (K, n): A_k(p^2) and B_k(p^2) for every k, then weighted by h^-k and summed
    polynomials = _debye_matrix(x.device, terms).T @ powers[:, 0].reshape(terms, -1)
    weights = powers[:, 1].reshape(terms, -1)
    sum_u = (polynomials[:terms] * weights).sum(0).reshape(x.shape)
    sum_w = (polynomials[terms:] * weights).sum(0).reshape(x.shape)
    log_iv = (
        hypot
        + order * torch.log(x / (order + hypot))
        - 0.5 * hypot.log()
        - _HALF_LOG_2PI
        + sum_u.log()
    )
    ratio = x * ((hypot + order).reciprocal() + sum_w * inverse_hypot / sum_u)
    return log_iv, ratio


def _debye_sums(u: float, terms: int, length: int) -> tuple[list[float], list[float]]:
    """Coefficients (powers 0 .. ``length`` of p) of Debye's sums S_U(p) = sum_k U_k(p) / u^k
    and S_W(p) = sum_k W_k(p) / u^k over ``terms`` terms, at the order u."""
    sum_u, sum_w = [0.0] * (length + 1), [0.0] * (length + 1)
    polynomials = _debye_polynomials(terms)
    for k, polynomial in enumerate(polynomials):
        weight = u**-k
        for power, coefficient in enumerate(polynomial):
            sum_u[power] += float(coefficient) * weight
        if k > 0:
            for power, coefficient in enumerate(_debye_w_polynomial(polynomials[k - 1])):
                sum_w[power] += float(coefficient) * weight
    return sum_u, sum_w


@functools.lru_cache(maxsize=256)
def _scalar_order_polynomials(
    v: float, shift: int, terms: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """For one order v: the constant terms (6,) and the coefficient matrix (2 L, 6), float64
    on ``device``, of six polynomials, in p (rows 0 .. L-1: powers 1 .. L) and in y (rows
    L .. 2 L - 1), that :func:`_debye_and_recurrence` evaluates with one GEMM:

    * S_U(p) = sum_k U_k(p) / u^k and S_W(p) = sum_k W_k(p) / u^k at u = v + shift, Debye's
      sums of :func:`_debye_log_iv_and_ratio`, whose k-th terms hold the powers p^k to
      p^(3 k);
    * the four entries of P(y) = M_{v+1} M_{v+2} ... M_{v+shift}, M_n = [[2 n y, 1], [1, 0]],
      the product of the recurrence steps (f_{n-1}, f_n) = M_n (f_n, f_{n+1}) taken in
      :func:`_log_iv_parts`, as polynomials of degree <= shift in y = 1 / x. Their
      coefficients are positive, so their values are free of cancellation.
    """
    u = v + shift
    length = max(3 * (terms - 1), shift)
    sum_u, sum_w = _debye_sums(u, terms, length)
    # P = I M_{v+1} ... M_{v+shift}: right-multiplying [[a, b], [c, d]] by M_n gives
    # [[2 n y a + b, a], [2 n y c + d, c]]
    entries = [[1.0], [0.0], [0.0], [1.0]]
    for n in range(1, shift + 1):
        scale = 2 * (v + n)
        a, b, c, d = entries
        entries = [_times_y_plus(a, scale, b), a, _times_y_plus(c, scale, d), c]
    columns = [sum_u, sum_w] + [e + [0.0] * (length + 1 - len(e)) for e in entries]
    table = torch.tensor(columns, dtype=torch.float64).T  # (length + 1, 6)
    matrix = torch.zeros(2 * length, 6, dtype=torch.float64)
    matrix[:length, :2] = table[1:, :2]
    matrix[length:, 2:] = table[1:, 2:]
    return table[0].to(device), matrix.to(device)


def _times_y_plus(polynomial: list[float], scale: float, other: list[float]) -> list[float]:
    """Coefficients of scale * y * polynomial(y) + other(y)."""
    result = [0.0] + [scale * c for c in polynomial]
    for power, coefficient in enumerate(other):
        result[power] += coefficient
    return result


def _debye_and_recurrence(
    v: float, x: Tensor, shift: int, terms: int, with_log_iv: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """log I_v(x) (None unless ``with_log_iv``), log 0F1(; v + 1; x^2 / 4) and
    I_{v+1}(x) / I_v(x) for one order v (a Python number) and x > 0 in float64 outside the
    series region: Debye's expansions at u = v + shift, as in
    :func:`_debye_log_iv_and_ratio`, carried down to v by the recurrence in matrix form,

        (f_v, f_{v+1}) = P(1 / x) (1, I_{u+1} / I_u),   f = I / I_u,

    with every polynomial of :func:`_scalar_order_polynomials` evaluated by one GEMM of a
    table of powers: about 30 operations whatever ``shift`` and ``terms``, where the
    element-wise recurrence takes ``shift`` steps. The normalized logarithm is assembled
    directly, without forming log I_v and subtracting the leading term:

        log 0F1 = h - u log(u + h) + shift log x + log(S_U f_v / sqrt(h)) + C,
        C = v log 2 + log Gamma(v + 1) - log(2 pi) / 2,

    from log I_u = h + u log(x / (u + h)) - log(2 pi h) / 2 + log S_U and u - v = shift.
    log I_v, when asked for, is assembled directly too (four operations more; adding the
    leading term to log 0F1 would cost three, but loses a digit to cancellation for large
    orders).
    """
    u = v + shift
    constants, matrix = _scalar_order_polynomials(v, shift, terms, x.device)
    length = matrix.shape[0] // 2
    flat = x.reshape(-1)
    hypot = torch.hypot(flat, flat.new_full((), u))
    p = hypot.reciprocal().mul_(u)
    powers = torch.stack([p, flat.reciprocal()], -1).unsqueeze(-1)
    powers = powers.expand(-1, 2, length).cumprod(-1)  # p^k and y^k, k = 1 .. L
    polynomials = torch.addmm(constants, powers.view(-1, 2 * length), matrix)
    sum_u, sum_w, *entries = polynomials.unbind(-1)
    u_plus_h = hypot + u
    # I_{u+1} / I_u, nothing cancels
    ratio_u = flat * (sum_w / (hypot * sum_u) + u_plus_h.reciprocal())
    current = torch.addcmul(entries[0], entries[1], ratio_u)  # f_v
    following = torch.addcmul(entries[2], entries[3], ratio_u)  # f_{v+1}
    # log(S_U f_v / sqrt(h)); f_v stays below ~1e70 for v <= 5000 in the Debye region
    log_scaled = (sum_u * current / hypot.sqrt()).log_()
    log_x = flat.log()
    log_u_plus_h = u_plus_h.log_()
    log_iv = None
    if with_log_iv:  # h + u log(x / (u + h)) + log(S_U f_v / sqrt(h)) - log(2 pi) / 2
        log_iv = torch.add(hypot, log_x - log_u_plus_h, alpha=u).add_(log_scaled)
        log_iv = log_iv.sub_(_HALF_LOG_2PI).view(x.shape)
    log_normalized = torch.add(hypot, log_u_plus_h, alpha=-u).add_(log_scaled)
    log_normalized.add_(log_x, alpha=shift)
    log_normalized += v * math.log(2) + math.lgamma(v + 1) - _HALF_LOG_2PI
    return log_iv, log_normalized.view(x.shape), (following / current).view(x.shape)


def _exact_recurrence_polynomials(v: float, shift: int) -> list[list[Fraction]]:
    """The entries a, b, c, d of P(y) = M_{v+1} ... M_{v+shift} (see
    :func:`_scalar_order_polynomials`), as exact coefficient lists in y, lowest power first."""
    order = Fraction(v)
    a, b, c, d = [Fraction(1)], [Fraction(0)], [Fraction(0)], [Fraction(1)]
    for n in range(1, shift + 1):
        scale = 2 * (order + n)
        a, b, c, d = (
            _add_polynomials([Fraction(0)] + [scale * t for t in a], b), a,
            _add_polynomials([Fraction(0)] + [scale * t for t in c], d), c,
        )
    return [a, b, c, d]


def _add_polynomials(*terms: tuple[int, list[Fraction]] | list[Fraction]) -> list[Fraction]:
    """Sum of coefficient lists, each given as a list or as (sign, list)."""
    terms = [term if isinstance(term, tuple) else (1, term) for term in terms]
    total = [Fraction(0)] * max(len(coefficients) for _, coefficients in terms)
    for sign, coefficients in terms:
        for power, coefficient in enumerate(coefficients):
            total[power] += sign * coefficient
    return total


def _multiply_polynomials(first: list[Fraction], second: list[Fraction]) -> list[Fraction]:
    product = [Fraction(0)] * (len(first) + len(second) - 1)
    for i, a in enumerate(first):
        if a:
            for j, b in enumerate(second):
                product[i + j] += a * b
    return product


def _derivative_polynomial(coefficients: list) -> list:
    return [power * c for power, c in enumerate(coefficients)][1:] or [0 * coefficients[0]]


@functools.lru_cache(maxsize=256)
def _scalar_order_extended(
    v: float, shift: int, terms: int, device: torch.device
) -> tuple[Tensor, Tensor, int, int]:
    """For one order v: the constant terms (13,), the coefficient matrix (L_p + L_y, 13),
    float64 on ``device``, and L_p, L_y, for the thirteen polynomials that
    :func:`_debye_and_recurrence_extended` evaluates with one GEMM: rows 0 .. L_p - 1 hold
    the powers p^1 .. p^L_p, rows L_p .. the powers y^1 .. y^L_y.

    * in p (columns 0-3): Debye's sums S_U and S_W at u = v + shift (as in
      :func:`_scalar_order_polynomials`) and their derivatives dS_U/dp and dS_W/dp;
    * in y = 1/x (columns 4-12): the entries a, b, c, d of P(y) = M_{v+1} ... M_{v+shift}
      (:func:`_scalar_order_polynomials`), so that (f_v, f_{v+1}) = (a + b r_u, c + d r_u);
      e = a + b - c - d and g = d - b, so that f_v - f_{v+1} = e + g (1 - r_u); and, with
      primes for d/dy, W1 = c'a - c a', W2 = c'b + d'a - c b' - d a', W3 = d'b - d b' as
      W1 + W2 + W3, W2 + 2 W3 and W3, so that with delta_u = 1 - r_u

          f_v f_{v+1}' - f_{v+1} f_v' = -y^2 [(W1 + W2 + W3) - delta_u (W2 + 2 W3)
                                              + delta_u^2 W3] + det(P) r_u'

      (' = d/dx on the left). The entries are built in exact rational arithmetic, so that the
      cancellations among them (e(0) = 0, the Wronskian-like combinations) are exact in the
      coefficients rather than left to the evaluation.
    """
    u = v + shift
    length_p = 3 * (terms - 1)
    sum_u, sum_w = _debye_sums(u, terms, length_p)
    in_p = [sum_u, sum_w, _derivative_polynomial(sum_u), _derivative_polynomial(sum_w)]

    a, b, c, d = _exact_recurrence_polynomials(v, shift)
    da, db, dc, dd = (_derivative_polynomial(entry) for entry in (a, b, c, d))
    w1 = _add_polynomials(_multiply_polynomials(dc, a), (-1, _multiply_polynomials(c, da)))
    w2 = _add_polynomials(
        _multiply_polynomials(dc, b), _multiply_polynomials(dd, a),
        (-1, _multiply_polynomials(c, db)), (-1, _multiply_polynomials(d, da)),
    )
    w3 = _add_polynomials(_multiply_polynomials(dd, b), (-1, _multiply_polynomials(d, db)))
    in_y = [
        a, b, c, d,
        _add_polynomials(a, b, (-1, c), (-1, d)),
        _add_polynomials(d, (-1, b)),
        _add_polynomials(w1, w2, w3),
        _add_polynomials(w2, w3, w3),
        w3,
    ]
    length_y = max(len(polynomial) for polynomial in in_y) - 1
    matrix = torch.zeros(length_p + length_y, len(in_p) + len(in_y), dtype=torch.float64)
    constants = torch.zeros(len(in_p) + len(in_y), dtype=torch.float64)
    for column, polynomial in enumerate(in_p + in_y):
        offset = 0 if column < len(in_p) else length_p
        values = [float(coefficient) for coefficient in polynomial]
        constants[column] = values[0]
        if len(values) > 1:
            matrix[offset: offset + len(values) - 1, column] = torch.tensor(
                values[1:], dtype=torch.float64
            )
    return constants.to(device), matrix.to(device), length_p, length_y


def _debye_and_recurrence_extended(
    v: float, x: Tensor, shift: int, terms: int, kinds: frozenset[str]
) -> dict[str, Tensor]:
    """The ``kinds`` among normalized, scaled, ratio, complement, slope and intercept (see
    :data:`_KINDS`) for one order v (a Python number) and x > 0 in float64 outside the series
    region: Debye's expansions at u = v + shift and the recurrence in matrix form, as in
    :func:`_debye_and_recurrence`, with every polynomial of :func:`_scalar_order_extended`
    from one GEMM. Each is assembled so that nothing large cancels:

    * delta_u = 1 - r_u = (u + (h - x)) / (h + u) - x S_W / (h S_U), h - x = u^2 / (h + x)
      (S_W < 0: both terms positive), and delta_v = (e + g delta_u) / f_v;
    * r_u' = u / (h (h + u)) + (p / h) (p G - (1 - p^2) G'(p)), G = S_W / S_U, the derivative
      of Debye's ratio at the shifted order (d/dx [x / (h + u)] = u / (h (h + u))), and
      r_v' from the Wronskian form of :func:`_scalar_order_extended`;
    * log 0F1 - x = (h - x) - u log1p((u + h - x) / x) - v log x + log(S_U f_v / sqrt(h)) + C,
      C = v log 2 + log Gamma(v + 1) - log(2 pi) / 2 (:func:`_debye_and_recurrence`'s form
      with log((u + h) / x) taken through log1p);
    * intercept = (log 0F1 - x) + x delta_v.
    """
    u = v + shift
    constants, matrix, length_p, length_y = _scalar_order_extended(v, shift, terms, x.device)
    flat = x.reshape(-1)
    hypot = torch.hypot(flat, flat.new_full((), u))
    inverse_hypot = hypot.reciprocal()
    p = inverse_hypot * u
    y = flat.reciprocal()
    powers = torch.cat(
        [p.unsqueeze(-1).expand(-1, length_p).cumprod(-1),
         y.unsqueeze(-1).expand(-1, length_y).cumprod(-1)], -1
    )
    (sum_u, sum_w, sum_u_slope, sum_w_slope,
     a, b, c, d, e, g, w123, w23, w3) = torch.addmm(constants, powers, matrix).unbind(-1)
    q = flat * inverse_hypot  # x / h
    debye_g = sum_w / sum_u
    correction = q * debye_g  # < 0
    u_plus_h = hypot + u
    h_minus_x = (hypot + flat).reciprocal_().mul_(u * u)
    ratio_u = torch.div(flat, u_plus_h).add_(correction)
    complement_u = (h_minus_x + u).div_(u_plus_h).sub_(correction)
    current = torch.addcmul(a, b, ratio_u)  # f_v = I_v / I_u
    parts = {}
    if "ratio" in kinds:
        parts["ratio"] = torch.addcmul(c, d, ratio_u).div_(current)
    if kinds & {"complement", "intercept"}:
        parts["complement"] = torch.addcmul(e, g, complement_u).div_(current)
    if "slope" in kinds:
        debye_g_slope = torch.addcmul(sum_w_slope, debye_g, sum_u_slope, value=-1).div_(sum_u)
        inner = torch.addcmul(p * debye_g, q * q, debye_g_slope, value=-1)
        slope_u = torch.div(inverse_hypot, u_plus_h).mul_(u).addcmul_(p * inverse_hypot, inner)
        wronskian = torch.addcmul(w23, complement_u, w3, value=-1)
        wronskian = torch.addcmul(w123, complement_u, wronskian, value=-1)
        slope = torch.addcmul(slope_u.mul_((-1) ** shift), y * y, wronskian, value=-1)
        parts["slope"] = slope.div_(current.square())
    if kinds & {"normalized", "scaled", "intercept"}:
        log_scaled = (sum_u * current).mul_(hypot.rsqrt()).log_()
        scaled = torch.log1p((h_minus_x + u).mul_(y)).mul_(-u).add_(h_minus_x).add_(log_scaled)
        if v != 0:
            scaled.add_(flat.log(), alpha=-v)
        scaled.add_(v * math.log(2) + math.lgamma(v + 1) - _HALF_LOG_2PI)
        parts["scaled"] = scaled
        if "normalized" in kinds:
            parts["normalized"] = scaled + flat
        if "intercept" in kinds:
            parts["intercept"] = torch.addcmul(scaled, flat, parts["complement"])
    return {kind: value.view(x.shape) for kind, value in parts.items() if kind in kinds}


@functools.lru_cache(maxsize=64)
def _octave_table(v: float, device: torch.device) -> Tensor:
    """The coefficients (E, 2, P), float64 on ``device``:
    for each exponent e of ``_OCTAVE_EXPONENTS``, the coefficients in powers of t of the
    polynomials of degree P - 1 that interpolate log 0F1(; v + 1; x^2 / 4) and
    I_{v+1}(x) / I_v(x) over x = (t + 3 / 4) 2^e, t in [-1/4, 1/4) (x's mantissa less 3/4),
    at the P Chebyshev points of that interval, evaluated in float64 by :func:`_log_iv_parts`.
    """
    points = _OCTAVE_POINTS
    k = torch.arange(points, dtype=torch.float64)
    nodes = torch.cos(math.pi * (k + 0.5) / points)  # in [-1, 1]; t = nodes / 4
    exponents = torch.tensor(list(_OCTAVE_EXPONENTS), dtype=torch.float64)
    x = (nodes / 4 + 0.75) * torch.exp2(exponents).unsqueeze(-1)  # (E, P)
    _, normalized, ratio = _log_iv_parts(v, x.reshape(-1), with_log_iv=False)
    values = torch.stack([normalized, ratio], -1).reshape(len(exponents), points, 2)
    # Chebyshev coefficients c_j = (2 / P) sum_k f(s_k) T_j(s_k) (c_0 halved), then powers of
    # s = 4 t through T_j's integer coefficients (T_{j+1} = 2 s T_j - T_{j-1}), exact in float64
    chebyshev = torch.cos(k.unsqueeze(-1) * torch.arccos(nodes)) * (2 / points)  # (j, k)
    chebyshev[0] /= 2
    monomial = [[1] + [0] * (points - 1), [0, 1] + [0] * (points - 2)]
    while len(monomial) < points:
        previous, last = monomial[-2], monomial[-1]
        monomial.append([2 * (last[i - 1] if i else 0) - previous[i] for i in range(points)])
    to_powers = chebyshev.T @ torch.tensor(monomial, dtype=torch.float64) * 4.0**k  # (k, power)
    table = torch.einsum("ekf,kp->efp", values, to_powers)
    return table.to(device)


def _octave_normalized_and_ratio(v: float, x: Tensor) -> tuple[Tensor, Tensor]:
    """log 0F1(; v + 1; x^2 / 4) and I_{v+1}(x) / I_v(x) in float64 for one order v and x of a
    floating type of at most float32's range, from :func:`_octave_table`; 0 at x = 0 and NaN
    for negative or NaN x."""
    table = _octave_table(v, x.device)
    flat = x.reshape(-1).float()
    mantissa, exponent = torch.frexp(flat)
    t = (mantissa - 0.75).double().unsqueeze(-1)  # exact
    powers = t.expand(-1, _OCTAVE_POINTS - 1).cumprod(-1)  # t^1 .. t^(P-1), (n, P - 1)
    coefficients = table.index_select(0, exponent.sub_(_OCTAVE_EXPONENTS.start))  # (n, 2, P)
    values = torch.baddbmm(
        coefficients[..., :1], coefficients[..., 1:], powers.unsqueeze(-1)
    ).squeeze(-1)
    # 0 (sqrt(0)) at x = 0, where frexp gives no octave, and NaN for x < 0 (sqrt(x < 0))
    column = flat.unsqueeze(-1)
    normalized, ratio = torch.where(column > 0, values, column.sqrt()).unbind(-1)
    return normalized.view(x.shape), ratio.view(x.shape)


def _series_tails(v: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
    """0F1(; b; x^2 / 4) - 1 for b = v + 1 and b = v + 2 by the power series
    0F1(; b; y) = sum_k y^k / (k! (b)_k), summed by Horner's rule and kept apart from the 1:
    y / b * (1 + y / (2 (b + 1)) * (1 + ...))."""
    y = 0.25 * x * x
    one = torch.ones_like(x)
    tails = []
    for b in (v + 1, v + 2):
        inner = one
        for k in range(_SERIES_TERMS, 1, -1):
            inner = torch.addcmul(one, inner, y / ((b + (k - 1)) * k))
        tails.append(inner * y / b)
    return tails[0], tails[1]


def _series_log_normalized_and_ratio(v: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
    """log 0F1(; v + 1; x^2 / 4) and I_{v+1}(x) / I_v(x) by the power series
    (:func:`_series_tails`): I_{v+1} / I_v = (x / 2) / (v + 1) * 0F1(; v + 2; y) /
    0F1(; v + 1; y)."""
    tail, tail_next = _series_tails(v, x)
    return torch.log1p(tail), 0.5 * x * (1 + tail_next) / ((1 + tail) * (v + 1))


def _series_parts(
    v: Tensor | float, x: Tensor, kinds: frozenset[str], log_gamma: Tensor | float
) -> dict[str, Tensor]:
    """The ``kinds`` (:data:`_KINDS`) by the power series, in plain torch (differentiable to
    any order). With T_0, T_1 the tails of :func:`_series_tails` and r the ratio,

        A' = 1 - r^2 - (2 v + 1) r / x
           = (1 + (2 v + 2) T_0 - (2 v + 1) T_1) / ((2 v + 2) (1 + T_0)) - r^2,

    (r / x = (1 + T_1) / (2 (v + 1) (1 + T_0))), where 1 - (2 v + 1) / (2 v + 2) is taken
    exactly; log I_v adds the leading term log((x / 2)^v / Gamma(v + 1)) (``log_gamma`` is
    log Gamma(v + 1)).
    """
    tail, tail_next = _series_tails(v, x)
    normalized = torch.log1p(tail)
    ratio = 0.5 * x * (1 + tail_next) / ((1 + tail) * (v + 1))
    parts = {"normalized": normalized, "ratio": ratio}
    if "scaled" in kinds:
        parts["scaled"] = normalized - x
    if "complement" in kinds:
        parts["complement"] = 1 - ratio
    if "intercept" in kinds:
        parts["intercept"] = normalized - x * ratio
    if "slope" in kinds:
        parts["slope"] = (1 + (2 * v + 2) * tail - (2 * v + 1) * tail_next) / (
            (2 * v + 2) * (1 + tail)
        ) - ratio * ratio
    if "log_iv" in kinds:
        parts["log_iv"] = _times_log(v, torch.log(0.5 * x)) - log_gamma + normalized
    return parts


def _debye_and_recurrence_per_element(
    v: Tensor, x: Tensor, shift: int, terms: int
) -> tuple[Tensor, Tensor]:
    """:func:`_debye_and_recurrence` for orders ``v`` given per element (broadcast with ``x``):
    Debye's expansions at u = v + shift, then ``shift`` steps down the recurrence
    I_{n-1} = (2 n / x) I_n + I_{n+1} on unnormalized values f, from (f_u, f_{u+1}) =
    (1, I_{u+1} / I_u): then f_v = I_v / I_u and r_v = f_{v+1} / f_v, stable downwards [2].
    In the Debye region f stays below ~1e70 for v <= 5000."""
    log_iv_shifted, ratio = _debye_log_iv_and_ratio(v + shift, x, terms)
    two_over_x = 2 / x
    current, following = torch.ones_like(ratio), ratio
    for step in range(shift, 0, -1):  # n = v + step
        current, following = following + two_over_x * (v + step) * current, current
    return log_iv_shifted + current.log(), following / current


def _log_iv_parts(
    v: Tensor | float, x: Tensor, *, with_log_iv: bool = True
) -> tuple[Tensor | None, Tensor, Tensor]:
    """(log I_v(x), log 0F1(; v + 1; x^2 / 4), I_{v+1}(x) / I_v(x)) in float64, broadcast; the
    first is None with ``with_log_iv=False`` (for one order, :func:`_debye_and_recurrence`
    gives the normalized logarithm directly, and log I_v costs four operations more; for one
    order and float32 inputs the other two then come from :func:`_octave_table`).

    ``v`` may be a Python number (the common case of one order for all x, much cheaper: its
    functions are then evaluated on the host) or a tensor. Inputs of a dtype below float64 get
    the shorter shift and expansion of float32 accuracy (see ``_SHIFT_SINGLE``).
    """
    single = x.dtype != torch.float64
    if single and not with_log_iv and not torch.is_tensor(v):
        return None, *_octave_normalized_and_ratio(v, x)
    shift, terms = (_SHIFT_SINGLE, _DEBYE_TERMS_SINGLE) if single else (_SHIFT, _DEBYE_TERMS)
    x = x.double()
    if torch.is_tensor(v):
        v, x = torch.broadcast_tensors(v.double(), x)
        log_gamma, series_limit = torch.lgamma(v + 1), (_SERIES_REGION * (v + 1)).sqrt()
    else:
        log_gamma, series_limit = math.lgamma(v + 1), math.sqrt(_SERIES_REGION * (v + 1))
    in_series = x <= series_limit
    # On the CPU, asking which regions occur costs no device synchronisation: skip the other.
    on_host = x.device.type == "cpu" and not _is_wrapped(x)  # vmap refuses bool()
    need_series = not on_host or bool(in_series.any())
    need_debye = not on_host or not need_series or not bool(in_series.all())

    @cache  # evaluated once, and only where needed
    def leading() -> Tensor:  # log of (x / 2)^v / Gamma(v + 1)
        return _times_log(v, torch.log(0.5 * x)) - log_gamma

    if need_series:
        series_normalized, series_ratio = _series_log_normalized_and_ratio(
            v, torch.clamp(x, max=series_limit) if not torch.is_tensor(v) else
            torch.minimum(x, series_limit)
        )
        if not need_debye:
            log_iv = leading() + series_normalized if with_log_iv else None
            return log_iv, series_normalized, series_ratio

    # Debye at the shifted order, then down the recurrence; x kept out of the series region,
    # where the ratios would underflow and the result is discarded anyway.
    if torch.is_tensor(v):
        log_iv, ratio = _debye_and_recurrence_per_element(
            v, torch.maximum(x, series_limit), shift, terms
        )
        normalized = log_iv - leading()
    else:
        log_iv, normalized, ratio = _debye_and_recurrence(
            v, torch.clamp(x, min=series_limit) if need_series else x, shift, terms,
            with_log_iv,
        )
    if not need_series:
        return log_iv, normalized, ratio

    normalized = torch.where(in_series, series_normalized, normalized)
    ratio = torch.where(in_series, series_ratio, ratio)
    if with_log_iv:
        log_iv = torch.where(in_series, leading() + series_normalized, log_iv)
    return log_iv, normalized, ratio


def _extended_parts(v: float, x: Tensor, kinds: frozenset[str]) -> dict[str, Tensor]:
    """The ``kinds`` (:data:`_KINDS`, without log I_v) in float64 for one order v (a Python
    number): the series region and :func:`_debye_and_recurrence_extended`, each skipped on
    the CPU when no element needs it (as :func:`_log_iv_parts`)."""
    single = x.dtype != torch.float64
    shift, terms = (_SHIFT_SINGLE, _DEBYE_TERMS_SINGLE) if single else (_SHIFT, _DEBYE_TERMS)
    x = x.double()
    series_limit = math.sqrt(_SERIES_REGION * (v + 1))
    in_series = x <= series_limit
    on_host = x.device.type == "cpu" and not _is_wrapped(x)
    need_series = not on_host or bool(in_series.any())
    need_debye = not on_host or not need_series or not bool(in_series.all())
    if need_series:
        series = _series_parts(v, torch.clamp(x, max=series_limit), kinds, math.lgamma(v + 1))
        if not need_debye:
            return {kind: series[kind] for kind in kinds}
    debye = _debye_and_recurrence_extended(
        v, torch.clamp(x, min=series_limit) if need_series else x, shift, terms, kinds
    )
    if not need_series:
        return debye
    return {kind: torch.where(in_series, series[kind], debye[kind]) for kind in kinds}


@cache
def _debye_matrix_with_slopes(device: torch.device, terms: int) -> Tensor:
    """(K, 4K) float64: :func:`_debye_matrix`'s [A | B] followed by [A~ | B~] with
    A~[i, k] = (k + 2 i) A[i, k] (likewise B~), so that p dU_k/dp = p^k sum_i A~[i, k] p^(2i)
    and p dS_U/dp = sum_k h^-k A~_k(p^2) (likewise for W)."""
    matrix = _debye_matrix(device, terms)
    index = torch.arange(terms, dtype=torch.float64, device=device)
    weights = (index.unsqueeze(0) + 2 * index.unsqueeze(-1)).repeat(1, 2)  # k + 2 i
    return torch.cat([matrix, matrix * weights], -1)


def _pure_powers(base: Tensor, count: int) -> Tensor:
    """[1, t, ..., t^(count-1)] along a new first dimension, without in-place writes."""
    ones = torch.ones_like(base).unsqueeze(0)
    return torch.cat([ones, base.unsqueeze(0).expand(count - 1, *base.shape).cumprod(0)])


def _reference_debye_recurrence(
    v: Tensor | float, x: Tensor, shift: int, terms: int, log_gamma: Tensor | float
) -> dict[str, Tensor]:
    """Every kind (:data:`_KINDS`) for x > 0 outside the series region, in plain torch:
    Debye's expansions at u = v + shift [DLMF 10.41.3, 10.41.4], per element, then ``shift``
    steps down the recurrence of the ratios, r_{n-1} = 1 / (2 n / x + r_n), carrying
    delta_n = 1 - r_n and r_n' along:

        delta_{n-1} = r_{n-1} (2 n / x - delta_n),   r_{n-1}' = r_{n-1}^2 (2 n / x^2 - r_n').

    Written in t = u / x and w = x / u (x / h = (1 + t^2)^(-1/2), u / h = (1 + w^2)^(-1/2),
    x / (h + u) = 1 / (sqrt(1 + t^2) + t)), so that autograd's derivatives of the result, a
    chain of single-signed factors apart from Debye's small correction terms, do not cancel
    either; differentiated by autograd, the ratio recurrence yields the recurrence of r'
    above. The delta recurrence loses up to about 50 units of rounding at large x (it
    subtracts (2 n - 1) / (2 x) from 2 n / x at every step); :func:`_debye_and_recurrence_extended`
    avoids that for one order.
    """
    u = v + shift
    t = u / x
    w = x / u
    root = torch.sqrt(1 + t * t)  # h / x
    q = torch.rsqrt(1 + t * t)  # x / h
    p = torch.rsqrt(1 + w * w)  # u / h
    inverse_hypot = p / u
    matrix = _debye_matrix_with_slopes(x.device, terms)
    polynomials = torch.tensordot(matrix.T, _pure_powers(p * p, terms), dims=1)
    sums = (polynomials.unflatten(0, (4, terms)) * _pure_powers(inverse_hypot, terms)).sum(1)
    sum_u, sum_w, sum_u_slope, sum_w_slope = sums.unbind(0)  # the last two times p
    debye_g = sum_w / sum_u
    debye_g_slope = (sum_w_slope - debye_g * sum_u_slope) / sum_u  # p dG/dp
    ratio = 1 / (root + t) + q * debye_g
    t_squared_over = t * t / (root + 1)  # (h - x) / x
    complement = (t + t_squared_over) / (root + t) - q * debye_g
    slope = p * inverse_hypot / (1 + p) + inverse_hypot * (
        p * p * debye_g - q * q * debye_g_slope
    )
    y = 1 / x
    product = torch.ones_like(ratio)  # I_u / I_v
    for step in range(shift, 0, -1):
        two_n_y = 2 * (v + step) * y
        ratio = 1 / (two_n_y + ratio)
        complement = ratio * (two_n_y - complement)
        slope = ratio * ratio * (two_n_y * y - slope)
        product = product * ratio
    # log I_v - x = (h - x) - u log1p((u + h - x) / x) - log(2 pi h) / 2 + log S_U + log f_v
    common = (
        x * t_squared_over
        - u * torch.log1p(t + t_squared_over)
        - _HALF_LOG_2PI
        - 0.5 * torch.log(x)
        + 0.5 * torch.log(q)
        + torch.log(sum_u)
        - torch.log(product)
    )
    scaled = common - v * torch.log(0.5 * x) + log_gamma
    return {
        "log_iv": x + common,
        "normalized": scaled + x,
        "scaled": scaled,
        "ratio": ratio,
        "complement": complement,
        "slope": slope,
        "intercept": scaled + x * complement,
    }


def _reference_parts(v: Tensor | float, x: Tensor, kinds: frozenset[str]) -> dict[str, Tensor]:
    """The plain-torch reference of every kind (:data:`_KINDS`), float64, broadcast: the
    series (:func:`_series_parts`) and :func:`_reference_debye_recurrence`, both evaluated
    everywhere and selected per element (no data-dependent control flow, no in-place
    operations), so that autograd, ``torch.func`` transforms and forward-mode AD can
    differentiate it to any order. The fused path's values agree with it to rounding; its
    derivatives are autograd's, accurate to a few units in 1e-13 relative in float64 where
    the fused rules are to 1e-14 (tests/test_special.py)."""
    single = x.dtype != torch.float64
    shift, terms = (_SHIFT_SINGLE, _DEBYE_TERMS_SINGLE) if single else (_SHIFT, _DEBYE_TERMS)
    x = x.double()
    if torch.is_tensor(v):
        v, x = torch.broadcast_tensors(v.double(), x)
        log_gamma, series_limit = torch.lgamma(v + 1), (_SERIES_REGION * (v + 1)).sqrt()
        below, above = torch.minimum(x, series_limit), torch.maximum(x, series_limit)
    else:
        log_gamma, series_limit = math.lgamma(v + 1), math.sqrt(_SERIES_REGION * (v + 1))
        below, above = torch.clamp(x, max=series_limit), torch.clamp(x, min=series_limit)
    series = _series_parts(v, below, kinds, log_gamma)
    debye = _reference_debye_recurrence(v, above, shift, terms, log_gamma)
    in_series = x <= series_limit
    return {kind: torch.where(in_series, series[kind], debye[kind]) for kind in kinds}


def _evaluate(v: Tensor | float, x: Tensor, kinds: frozenset[str]) -> dict[str, Tensor]:
    """The ``kinds`` (:data:`_KINDS`) in float64, without a graph, at the detached ``x``, by
    the cheapest path that is accurate for ``x``'s dtype: :func:`_log_iv_parts` (and for one
    order and float32 inputs its octave tables, from which the scaled logarithm, the
    complement and the intercept follow in float64 well within float32's rounding) for the
    first three kinds, :func:`_extended_parts` for one order otherwise, and the reference
    for orders given per element."""
    if kinds <= _BASIC_KINDS:
        log_iv, normalized, ratio = _log_iv_parts(v, x, with_log_iv="log_iv" in kinds)
        parts = {"normalized": normalized, "ratio": ratio}
        if log_iv is not None:
            parts["log_iv"] = log_iv
        return parts
    if torch.is_tensor(v):
        with torch.no_grad():
            return _reference_parts(v, x, kinds)
    if x.dtype != torch.float64 and kinds <= _TABLE_KINDS:
        normalized, ratio = _octave_normalized_and_ratio(v, x)
        return _parts_from_table(x.double(), normalized, ratio)
    parts = _extended_parts(v, x, kinds - {"log_iv"})
    if "log_iv" in kinds:
        parts["log_iv"] = _log_iv_parts(v, x)[0]
    return parts


def _parts_from_table(x: Tensor, normalized: Tensor, ratio: Tensor) -> dict[str, Tensor]:
    """The kinds that follow from log 0F1 and the ratio of float32 inputs (float64)."""
    return {
        "normalized": normalized,
        "ratio": ratio,
        "scaled": normalized - x,
        "complement": 1 - ratio,
        "intercept": normalized - x * ratio,
    }


def _times_log(v: Tensor | float, log_value: Tensor) -> Tensor:
    """v * log_value with 0 * (-inf) = 0 (the power x^0 at x = 0)."""
    if torch.is_tensor(v):
        return torch.where(v == 0, 0.0, v * log_value)
    return torch.zeros_like(log_value) if v == 0 else v * log_value


def _as_tensors(v: Tensor | float, x: Tensor | float) -> tuple[Tensor, Tensor]:
    """x as a floating tensor (Python numbers: torch's default dtype); v as a tensor, or a
    Python float (never rounded to a lower precision)."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        x = torch.as_tensor(x, dtype=torch.get_default_dtype())
    if not torch.is_tensor(v):
        v = float(v)  # stays on the host: no host-to-device copy, and cheaper arithmetic
    return v, x


def _order_over_x(v: Tensor | float, x: Tensor) -> Tensor:
    """v / x, with the limit 0 for v = 0 (so that d/dx log I_0 is finite at x = 0)."""
    if torch.is_tensor(v):
        return torch.where(v == 0, 0.0, v / x)
    return torch.zeros_like(x) if v == 0 else v / x


def _slope_derivative(v: Tensor | float, x: Tensor, ratio: Tensor, slope: Tensor) -> Tensor:
    """A'' = d/dx (1 - r^2 - (2 v + 1) r / x) = -2 r A' - (2 v + 1) (A' - r / x) / x, with the
    limit 0 at x = 0 (A' is even in x). Differentiable (a where on a safe x)."""
    positive = x > 0
    safe_x = torch.where(positive, x, 1.0)
    value = -2 * ratio * slope - (2 * v + 1) * (slope - ratio / safe_x) / safe_x
    return torch.where(positive, value, 0.0)


def _derivative(kind: str, factors: dict[str, Tensor], v: Tensor | float, x: Tensor) -> Tensor:
    """d/dx of the kind (:data:`_KINDS`), from the factors of :data:`_FACTORS`."""
    if kind == "log_iv":
        return factors["ratio"] + _order_over_x(v, x)
    if kind == "normalized":
        return factors["ratio"]
    if kind == "scaled":
        return -factors["complement"]
    if kind == "ratio":
        return factors["slope"]
    if kind == "complement":
        return -factors["slope"]
    if kind == "intercept":
        return -x * factors["slope"]
    return _slope_derivative(v, x, factors["ratio"], factors["slope"])


def _output(value: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` in ``dtype``, always a new tensor object: autograd attaches the Function's
    history to its outputs, and must not to a caller's cached values."""
    return value.to(dtype) if value.dtype != dtype else value.detach()


@cache_forward_signature
class _BesselParts(torch.autograd.Function):
    """The ``kinds`` (:data:`_KINDS`) of the modified Bessel function at (v, x), differentiable
    in x to any order. ``parts`` holds their float64 values, already evaluated at the same
    (v, x) (:func:`_evaluate`), and possibly the derivative factors (:data:`_FACTORS`) too;
    the outputs are those values in x's dtype. With r the ratio, A' its derivative and
    delta = 1 - r, the derivatives are

        log I_v: r + v / x;   log 0F1: r;   log 0F1 - x: -delta;   r: A';   delta: -A';
        A': -2 r A' - (2 v + 1) (A' - r / x) / x;   log 0F1 - x r: -x A'.

    A first-order backward pass uses the float64 factors saved (or evaluates the missing ones
    at x); one that finds grad mode on (``create_graph=True``) evaluates them again through
    this Function (:func:`_bessel_parts`), at the saved x with its history, so that each
    derivative is itself differentiable and derivatives of every order follow from the rules
    above. The rule for A' has a removable singularity at x = 0 (where A'' = 0), which no rule
    in r and A' differentiates through: there, with grad mode on, the vector-Jacobian product
    of the plain-torch reference (:func:`_reference_parts`, whose series is a polynomial at 0)
    is taken instead (:func:`pyro_dgm._fused.reference_vjp`).
    """

    @staticmethod
    def forward(
        v: Tensor | float, x: Tensor, kinds: tuple[str, ...], parts: dict[str, Tensor]
    ) -> tuple[Tensor, ...]:
        return tuple(_output(parts[kind], x.dtype) for kind in kinds)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        v, x, kinds, parts = inputs
        ctx.kinds, ctx.v_number = kinds, None if torch.is_tensor(v) else v
        ctx.set_materialize_grads(False)  # unused outputs: None, not 0 * (possibly inf)
        ctx.save_for_backward(
            x, v if torch.is_tensor(v) else None,
            parts.get("ratio"), parts.get("complement"), parts.get("slope"),
        )

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[None, Tensor | None, None, None]:
        x, v_tensor, ratio, complement, slope = ctx.saved_tensors
        v = ctx.v_number if v_tensor is None else v_tensor
        wanted = [
            (kind, grad)
            for kind, grad in zip(ctx.kinds, grads, strict=True)
            if grad is not None
        ]
        if not wanted or not ctx.needs_input_grad[1]:
            return None, None, None, None
        grad = None
        if torch.is_grad_enabled():  # a derivative of this gradient will be taken
            point = x
            slope_grads = [grad for kind, grad in wanted if kind == "slope"]
            if slope_grads:
                # A'' = -2 r A' - (2 v + 1) (A' - r / x) / x has a removable singularity at
                # x = 0 that no rule in r and A' differentiates through: the reference's
                # series, a polynomial there, gives its derivatives of every order.
                grad = reference_vjp(
                    lambda at: _reference_parts(v, at, _SLOPE)["slope"].to(at.dtype),
                    (x,), slope_grads, (True,),
                )[0]
                wanted = [(kind, grad) for kind, grad in wanted if kind != "slope"]
                if not wanted:
                    return None, grad, None, None
            needed = tuple(sorted(set().union(*(_FACTORS[kind] for kind, _ in wanted))))
            factors = dict(zip(needed, _bessel_parts(v, x, needed), strict=True))
        else:
            needed = tuple(sorted(set().union(*(_FACTORS[kind] for kind, _ in wanted))))
            point = x.detach().double()
            saved = {"ratio": ratio, "complement": complement, "slope": slope}
            factors = {name: saved[name] for name in needed if saved[name] is not None}
            missing = frozenset(needed) - factors.keys()
            if missing:
                factors.update(_evaluate(v, x.detach(), missing))
        total = None
        for kind, grad_output in wanted:
            term = grad_output * _derivative(kind, factors, v, point)
            total = term if total is None else total + term
        total = _sum_to_shape(total.to(x.dtype), x.shape)
        return None, total if grad is None else total + grad, None, None


def _sum_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to the shape of the input it belongs to."""
    if grad.shape == shape:
        return grad
    leading = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(leading))) if leading else grad
    dims = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def _bessel_parts_values(
    v: Tensor | float, x: Tensor | float, kinds: tuple[str, ...]
) -> dict[str, Tensor]:
    """The float64 values of the ``kinds`` (:data:`_KINDS`) at (v, x), without a graph, for
    :func:`_bessel_parts`'s ``values`` (callers that need several kinds at the same (v, x)
    evaluate them once); the reference's values under ``torch.func`` transforms."""
    v, x = _as_tensors(v, x)
    if needs_reference(x, v):
        parts = _reference_parts(v, x.detach(), frozenset(kinds))
        return {kind: parts[kind].detach() for kind in kinds}
    return _evaluate(v, x.detach(), frozenset(kinds))


def _bessel_parts(
    v: Tensor | float,
    x: Tensor | float,
    kinds: tuple[str, ...],
    values: dict[str, Tensor] | None = None,
) -> tuple[Tensor, ...]:
    """The ``kinds`` (names from :data:`_KINDS`) of :math:`I_v(x)`, in ``x``'s dtype,
    broadcast, differentiable in ``x`` to any order (:class:`_BesselParts`), on ``x``'s
    device.

    :param values: float64 values of (at least) the ``kinds`` at the same (v, x), already
        evaluated; ``None`` evaluates them (with the derivative factors, when ``x`` requires
        grad, from the same evaluation).
    :returns: one tensor per kind. Under ``torch.func`` transforms and forward-mode AD the
        plain-torch reference (:func:`_reference_parts`) is differentiated instead.
    """
    v, x = _as_tensors(v, x)
    if needs_reference(x, v):
        parts = _reference_parts(v, x, frozenset(kinds))
        return tuple(parts[kind].to(x.dtype) for kind in kinds)
    if values is None:
        wanted = frozenset(kinds)
        if x.requires_grad and torch.is_grad_enabled():
            wanted = wanted.union(*(_FACTORS[kind] for kind in kinds))
        values = _evaluate(v, x.detach(), wanted)
    return _BesselParts.apply(v, x, tuple(kinds), values)


def log_bessel_iv(v: Tensor | float, x: Tensor | float) -> Tensor:
    """Logarithm of the modified Bessel function of the first kind, :math:`\\log I_v(x)`.

    Accurate to a few units in :math:`10^{-14}` relative to :math:`\\max(1, |\\log I_v(x)|)`
    in float64 (about :math:`10^{-9}` before rounding to float32 for float32 ``x``) for
    :math:`v \\in [0, 5000]` and :math:`x \\in [10^{-10}, 10^6]` (see the module docstring for
    the algorithm), with the exact limits at :math:`x = 0`: :math:`\\log I_0(0) = 0` and
    :math:`\\log I_v(0) = -\\infty` for :math:`v > 0`.

    :param v: order(s) :math:`v \\ge 0`, a float or a tensor broadcastable with ``x``. Not
        differentiated.
    :param x: argument(s) :math:`x \\ge 0`, a floating-point tensor of any shape, float32 or
        float64; differentiable, with
        :math:`\\partial_x \\log I_v(x) = I_{v+1}(x) / I_v(x) + v / x`.
    :returns: a tensor of the broadcast shape of ``v`` and ``x``, on ``x``'s device and of its
        dtype. Values outside the domain (negative ``v`` or ``x``) give NaN.

    Example::

        >>> log_bessel_iv(0.5, torch.tensor([1.0, 1000.0], dtype=torch.float64))
        tensor([ 0.1614, 996.0878], dtype=torch.float64)
    """
    return _bessel_parts(v, x, ("log_iv",))[0]


def log_bessel_iv_normalized(v: Tensor | float, x: Tensor | float) -> Tensor:
    """:math:`\\log\\left[\\Gamma(v + 1) (2 / x)^v I_v(x)\\right] = \\log {}_0F_1(; v + 1; x^2/4)`.

    :math:`I_v(x)` divided by its leading small-:math:`x` term: zero at :math:`x = 0` and smooth
    there, with derivative :math:`I_{v+1}(x) / I_v(x)`. The von Mises-Fisher log-normalizer is
    :math:`\\log C_m(\\kappa) = -\\log |S^{m-1}| -` ``log_bessel_iv_normalized(m / 2 - 1,
    kappa)``, which is how it stays finite and smooth as :math:`\\kappa \\to 0`.

    :param v: order(s) :math:`v \\ge 0`, float or tensor broadcastable with ``x``.
    :param x: argument(s) :math:`x \\ge 0`, floating-point tensor (float32 or float64),
        differentiable.
    :returns: tensor of the broadcast shape, on ``x``'s device and of its dtype.
    """
    return _bessel_parts(v, x, ("normalized",))[0]


def bessel_iv_ratio(v: Tensor | float, x: Tensor | float) -> Tensor:
    """The ratio :math:`I_{v+1}(x) / I_v(x)`, in :math:`[0, 1)`.

    For the von Mises-Fisher distribution on :math:`S^{m-1}` this is the mean resultant length
    :math:`A_m(\\kappa) = I_{m/2}(\\kappa) / I_{m/2-1}(\\kappa)`. Zero at :math:`x = 0`.

    :param v: order(s) :math:`v \\ge 0`, float or tensor broadcastable with ``x``.
    :param x: argument(s) :math:`x \\ge 0`, floating-point tensor (float32 or float64),
        differentiable, with derivative :math:`1 - r^2 - (2 v + 1) r / x` where ``r`` is the
        ratio.
    :returns: tensor of the broadcast shape, on ``x``'s device and of its dtype.
    """
    return _bessel_parts(v, x, ("ratio",))[0]


def log_bessel_iv_normalized_and_ratio(
    v: Tensor | float,
    x: Tensor | float,
    values: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Both :func:`log_bessel_iv_normalized` and :func:`bessel_iv_ratio` from one evaluation.

    The von Mises-Fisher entropy and KL divergences need both at the same
    :math:`(v, \\kappa)`; this halves their cost. Differentiable in ``x`` through both outputs.

    :param v: order(s) :math:`v \\ge 0`, float or tensor broadcastable with ``x``.
    :param x: argument(s) :math:`x \\ge 0`, floating-point tensor (float32 or float64),
        differentiable.
    :param values: the pair already evaluated at the same ``v`` and ``x`` by
        :func:`log_bessel_iv_normalized_and_ratio_values`, to which only the derivatives are
        attached (no second evaluation); ``None`` evaluates them.
    :returns: ``(log_normalized, ratio)``, each of the broadcast shape, on ``x``'s device and of
        its dtype.
    """
    parts = None if values is None else {"normalized": values[0], "ratio": values[1]}
    return _bessel_parts(v, x, ("normalized", "ratio"), parts)


def log_bessel_iv_normalized_and_ratio_values(
    v: Tensor | float, x: Tensor | float
) -> tuple[Tensor, Tensor]:
    """The values of :func:`log_bessel_iv_normalized_and_ratio` in float64, whatever ``x``'s
    dtype, computed without autograd (no graph, no derivatives).

    For callers that evaluate the pair once and need it both as plain numbers and, through
    ``log_bessel_iv_normalized_and_ratio(v, x, values=...)``, with derivatives; or that write
    the derivatives themselves: :math:`\\partial_x \\log {}_0F_1 = r` and
    :math:`\\partial_x r = 1 - r^2 - (2 v + 1) r / x`. The accuracy is matched to ``x``'s
    dtype: float64 inputs as :func:`log_bessel_iv`, float32 inputs (one order) from the octave
    tables, to about :math:`10^{-11}`, and with a tensor of orders from the shorter expansion,
    to about :math:`10^{-9}` (module docstring).

    :returns: ``(log_normalized, ratio)``, float64 tensors of the broadcast shape on ``x``'s
        device.
    """
    v, x = _as_tensors(v, x)
    if needs_reference(x, v):
        parts = _reference_parts(v, x.detach(), frozenset({"normalized", "ratio"}))
        return parts["normalized"], parts["ratio"]
    _, normalized, ratio = _log_iv_parts(v, x.detach(), with_log_iv=False)
    return normalized, ratio
