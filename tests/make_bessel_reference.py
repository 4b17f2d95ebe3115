"""Builds tests/data/bessel_reference.json: log I_v(x) and I_{v+1}(x)/I_v(x) to 30 digits.

Two independent mpmath evaluations: the power series (mpmath.besseli) where it converges
quickly, and otherwise the positive integral representation [DLMF 10.32.2]

    I_v(x) = (x/2)^v / (sqrt(pi) Gamma(v + 1/2)) int_{-1}^{1} (1 - t^2)^(v - 1/2) e^(x t) dt,

integrated in log space around the integrand's peak. Where both apply they are checked against
each other. Run from the repository root: ``python tests/make_bessel_reference.py``.
"""

import json
from pathlib import Path

import mpmath

mpmath.mp.dps = 40

ORDERS = [0, 0.5, 1, 1.5, 2, 2.5, 4, 4.5, 9.5, 15, 31.5, 49, 63.5, 100, 255.5, 499.5, 1000,
          2499.5, 4999, 5000]
ARGUMENTS = [mpmath.mpf(10) ** (k / 4) for k in range(-40, 25)]  # 1e-10 .. 1e6


def log_i0_integral(x):
    """log I_0(x) = log (1/pi) int_0^pi exp(x cos t) dt [DLMF 10.32.1], scaled by exp(-x)."""
    width = 1 / mpmath.sqrt(x)
    points = sorted({mpmath.mpf(0), mpmath.pi} | {min(k * width, mpmath.pi) for k in (2, 8, 30)})
    integral = mpmath.quad(lambda t: mpmath.exp(x * (mpmath.cos(t) - 1)), points)
    return x + mpmath.log(integral / mpmath.pi)


def log_iv_integral(v, x):
    if v == 0:  # the weight (1 - t^2)^(-1/2) is singular next to the peak
        return log_i0_integral(mpmath.mpf(x))
    v, x = mpmath.mpf(v), mpmath.mpf(x)

    def exponent(t):
        if v == 0.5:  # no weight; avoids 0 * log(0) at the end points
            return x * t
        return (v - 0.5) * mpmath.log1p(-t * t) + x * t

    # The peak of (v - 1/2) log(1 - t^2) + x t, and its width.
    if v > 0.5:
        peak = x / (v - 0.5 + mpmath.sqrt((v - 0.5) ** 2 + x * x))
    else:
        peak = mpmath.mpf(1) - 1 / (2 * x) if x > 1 else mpmath.mpf(0)
    height = exponent(peak) if v > 0.5 or x > 1 else mpmath.mpf(0)
    width = 1 / mpmath.sqrt(x + v + 1)
    points = sorted({mpmath.mpf(-1), mpmath.mpf(1)} | {
        mpmath.mpf(min(max(peak + k * width, -1), 1)) for k in (-30, -8, -2, 0, 2, 8, 30)})
    integral = mpmath.quad(lambda t: mpmath.exp(exponent(t) - height), points)
    return (v * mpmath.log(x / 2) - 0.5 * mpmath.log(mpmath.pi) - mpmath.loggamma(v + 0.5)
            + height + mpmath.log(integral))


def log_iv_series(v, x):
    return mpmath.log(mpmath.besseli(v, x))


def main() -> None:
    rows = []
    for v in ORDERS:
        for x in ARGUMENTS:
            if x * x <= 4 * (v + 1) or x < 30:
                log_iv, log_iv_next = log_iv_series(v, x), log_iv_series(v + 1, x)
                if x > 1e-3:
                    check = log_iv_integral(v, x)
                    assert abs(check - log_iv) < 1e-18 * max(1, abs(log_iv)), (v, x, check)
            else:
                log_iv, log_iv_next = log_iv_integral(v, x), log_iv_integral(v + 1, x)
            rows.append([float(v), mpmath.nstr(x, 30), mpmath.nstr(log_iv, 30),
                         mpmath.nstr(mpmath.exp(log_iv_next - log_iv), 30)])
    out = Path(__file__).parent / "data" / "bessel_reference.json"
    out.write_text(json.dumps({"columns": ["v", "x", "log_iv", "ratio"], "rows": rows}))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
