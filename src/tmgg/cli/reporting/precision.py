"""Numbers reported no finer than they are known (issue 24).

A mean over three seeds is known to about its confidence interval, not to four
decimals. Reports show ``mean ± half-width (n N)`` with the half-width of the 95 %
Student-t interval, both rounded to the half-width's second significant digit;
comparisons state their test (Welch's unequal-variance t, two-sided p).

The t distribution is computed here rather than with scipy (not a dependency): its
cdf is the regularized incomplete beta function, evaluated with the continued
fraction of Numerical Recipes (Press et al., 3rd ed., §6.4, modified Lentz's method)
and ``math.lgamma``; quantiles invert the cdf by bisection to 1e-12. Tests check it
against tabulated values.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
DEFAULT_DECIMALS = 4  # where no interval is known (one value, or all values equal)
MAX_DECIMALS = 6


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (Numerical Recipes' betacf, Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (df may be fractional)."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on ``t_cdf``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), not {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    while high - low > 1e-12 * max(1.0, high):
        middle = (low + high) / 2.0
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and the half-width of its confidence interval (None
    for a single value)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def decimals(self) -> int:
        return decimals_for(self.half_width)

    def text(self, signed: bool = False) -> str:
        """``0.337 ± 0.012 (n 3)``: both rounded to the half-width's 2nd significant digit."""
        sign = "+" if signed else ""
        places = self.decimals
        if self.half_width is None:
            return f"{self.mean:{sign}.{places}f} (n {self.n})"
        return f"{self.mean:{sign}.{places}f} ± {self.half_width:.{places}f} (n {self.n})"


def decimals_for(half_width: float | None) -> int:
    """Decimals that show a half-width to two significant digits (0.0123 -> 3,
    0.16 -> 2, 0.0049 -> 4); ``DEFAULT_DECIMALS`` where no interval is known."""
    if half_width is None or not math.isfinite(half_width) or half_width <= 0.0:
        return DEFAULT_DECIMALS
    return max(0, min(MAX_DECIMALS, 1 - math.floor(math.log10(half_width))))


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """The mean of ``values`` with its t confidence interval (None when empty)."""
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, None, len(values))
    standard_error = statistics.stdev(values) / math.sqrt(len(values))
    quantile = t_quantile(0.5 + confidence / 2.0, len(values) - 1)
    return Interval(mean, quantile * standard_error, len(values))


def paired_difference(minuend: Sequence[float], subtrahend: Sequence[float]
                      ) -> Interval | None:
    """The mean of ``minuend[i] - subtrahend[i]`` with its interval (the same seeds)."""
    return interval([a - b for a, b in zip(minuend, subtrahend, strict=True)])


@dataclass(frozen=True)
class WelchResult:
    """A two-sided t test of a difference: Welch's (independent samples) or paired."""

    difference: float  # mean of the first minus mean of the second
    t: float
    df: float
    p: float  # two-sided
    standard_error: float
    test: str = "Welch"  # or "paired": the same seeds on both sides

    @property
    def half_width(self) -> float:
        """Of the difference's 95 % (Welch) interval: what its rounding may show."""
        return t_quantile(0.5 + CONFIDENCE / 2.0, self.df) * self.standard_error

    def text(self) -> str:
        places = 3 if self.p >= 0.001 else None
        p_text = f"p {self.p:.{places}f}" if places else "p < 0.001"
        df = f"{self.df:.0f}" if self.test == "paired" else f"{self.df:.1f}"
        return f"{self.test} t {self.t:+.2f}, df {df}, {p_text}"


def welch(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int
          ) -> WelchResult | None:
    """Welch's unequal-variance t test of mean_a = mean_b from summaries; None when it
    is undefined (a group of one, or no variance in either group)."""
    if n_a < 2 or n_b < 2:
        return None
    var_a, var_b = sd_a * sd_a / n_a, sd_b * sd_b / n_b
    if var_a + var_b <= 0.0:
        return None
    standard_error = math.sqrt(var_a + var_b)
    t = (mean_a - mean_b) / standard_error
    df = (var_a + var_b) ** 2 / (var_a * var_a / (n_a - 1) + var_b * var_b / (n_b - 1))
    p = 2.0 * (1.0 - t_cdf(abs(t), df))
    return WelchResult(mean_a - mean_b, t, df, min(1.0, max(0.0, p)), standard_error)


def welch_samples(a: Sequence[float], b: Sequence[float]) -> WelchResult | None:
    if len(a) < 2 or len(b) < 2:
        return None
    return welch(statistics.fmean(a), statistics.stdev(a), len(a),
                 statistics.fmean(b), statistics.stdev(b), len(b))


def paired_t(minuend: Sequence[float], subtrahend: Sequence[float]) -> WelchResult | None:
    """The paired t test of ``minuend[i] - subtrahend[i]`` (the same seed: its data, test
    set and initial weights on both sides), far stronger than Welch's where the seeds'
    spread is shared; None for fewer than two pairs or differences without spread."""
    differences = [a - b for a, b in zip(minuend, subtrahend, strict=True)]
    if len(differences) < 2:
        return None
    spread, mean = statistics.stdev(differences), statistics.fmean(differences)
    # Equal differences up to float rounding (0.3 - 0.2 vs 0.4 - 0.3) have no spread.
    if spread <= 1e-12 * max(1.0, abs(mean)):
        return None
    standard_error = spread / math.sqrt(len(differences))
    df = len(differences) - 1
    t = mean / standard_error
    p = 2.0 * (1.0 - t_cdf(abs(t), df))
    return WelchResult(mean, t, df, min(1.0, max(0.0, p)), standard_error, "paired")
