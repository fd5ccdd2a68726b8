"""What a noisy number is worth: exact 95% statements for the noise OpenDP adds.

Plain math on public quantities (noise scales, bounds, candidate counts), never on data. Every interval here is
computed from the exact distribution of the noise, not from a normal approximation or a union bound, and rounds
outward, so its coverage is at least the stated level. Where a truncated sum is needed, the dropped probability
mass counts as a miss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy.special import ndtr, ndtri

TAIL = 1e-13  # probability mass we are willing to drop from a discrete support (counted against coverage)
GRID_CELLS = 48  # cells over the bounds for the AVG pivot; more is tighter and slower, never less valid
SUPPORT_BINS = 4096  # a count noise's support beyond this many values is summed in bins: bounded work, still valid

# OpenDP's names in `summarize_polars_measurement` -> (family, discrete)
DISTRIBUTIONS = {
    "Float Laplace": ("laplace", False),
    "Integer Laplace": ("laplace", True),
    "Float Gaussian": ("gaussian", False),
    "Integer Gaussian": ("gaussian", True),
}


@dataclass(frozen=True)
class Noise:
    """One noise draw: Laplace or Gaussian, on the reals or the integers, with OpenDP's scale parameter."""

    family: str  # "laplace" | "gaussian"
    discrete: bool
    scale: float

    @classmethod
    def from_summary(cls, distribution: str, scale: float) -> Noise:
        family, discrete = DISTRIBUTIONS[distribution]
        return cls(family, discrete, float(scale))

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """P(e <= x); for discrete noise x is taken at its floor."""
        x = np.asarray(x, dtype=float)
        s = self.scale
        if s == 0:
            return (x >= 0).astype(float)
        if self.discrete:
            x = np.floor(x)
            if self.family == "laplace":
                # p^k written as exp(-k/s): stable for the huge scales of fixed-point sums, where p is 1 - 1e-12
                p = math.exp(-1.0 / s)
                with np.errstate(over="ignore"):
                    return np.where(x >= 0, 1 - np.exp(-(x + 1) / s) / (1 + p), np.exp(x / s) / (1 + p))
            if s >= 2:
                # Poisson summation: the discrete Gaussian's CDF at an integer equals the continuous one at +0.5
                # up to exp(-2 pi^2 s^2) < 1e-34
                return ndtr((x + 0.5) / s)
            values, probs, _ = self.support()
            cumulative = np.cumsum(probs)
            index = np.searchsorted(values, x, side="right") - 1
            return np.where(index >= 0, cumulative[np.clip(index, 0, None)], 0.0)
        if self.family == "laplace":
            with np.errstate(over="ignore"):
                return np.where(x >= 0, 1 - 0.5 * np.exp(-x / s), 0.5 * np.exp(x / s))
        return ndtr(x / s)

    def prob_between(self, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """P(low <= e <= high), element-wise."""
        low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
        if self.discrete:
            below = self.cdf(np.ceil(low) - 1)
        else:
            below = self.cdf(low)
        return np.clip(self.cdf(high) - below, 0.0, 1.0) * (high >= low)

    def support(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Discrete noise only: values, probabilities, and the mass left out (at most TAIL)."""
        assert self.discrete
        s = max(self.scale, 1e-12)
        if self.family == "laplace":
            p = math.exp(-1.0 / s)
            # P(|e| > k) = 2 exp(-(k + 1)/s) / (1 + p)
            k = max(0, math.ceil(-s * math.log(TAIL * (1 + p) / 2)) - 1)
            values = np.arange(-k, k + 1, dtype=float)
            probs = (1 - p) / (1 + p) * np.exp(-np.abs(values) / s)
            left_out = 2 * math.exp(-(k + 1) / s) / (1 + p)
            return values, probs, float(left_out)
        k = math.ceil(s * math.sqrt(2 * math.log(1 / TAIL)) + 2)
        values = np.arange(-k, k + 1, dtype=float)
        weights = np.exp(-(values**2) / (2 * s * s))
        # the mass beyond +-k is below TAIL relative to the centre's; normalise on the kept support and count
        # the (tiny) remainder as left out
        return values, weights / weights.sum(), TAIL

    def std(self) -> float:
        """Standard deviation: the noise's RMSE, the yardstick for choosing between mechanisms."""
        s = self.scale
        if not self.discrete:
            return s * math.sqrt(2) if self.family == "laplace" else s
        if self.family == "laplace":
            p = math.exp(-1.0 / s) if s > 0 else 0.0
            return math.sqrt(2 * p) / (1 - p) if p < 1 else math.inf
        if s >= 2:
            return s  # the discrete Gaussian's variance equals s^2 to within exp(-2 pi^2 s^2)
        values, probs, _ = self.support()
        return float(math.sqrt(np.dot(probs, values**2)))

    def half_width(self, alpha: float) -> float:
        """Smallest t with P(|e| <= t) >= 1 - alpha: the 1 - alpha interval is value +- t."""
        s = self.scale
        if s == 0:
            return 0.0
        if not self.discrete:
            if self.family == "laplace":
                return s * math.log(1 / alpha)
            return s * float(ndtri(1 - alpha / 2))
        if self.family == "laplace":
            # P(|e| > k) = 2 exp(-(k + 1)/s) / (1 + p) <= alpha
            p = math.exp(-1.0 / s)
            return float(max(0, math.ceil(-s * math.log(alpha * (1 + p) / 2) - 1e-9) - 1))
        low, high = 0, math.ceil(s * float(ndtri(1 - alpha / 4)) + 2)
        while low < high:  # smallest integer k with P(|e| <= k) >= 1 - alpha
            mid = (low + high) // 2
            if self.prob_between(-mid, mid) >= 1 - alpha:
                high = mid
            else:
                low = mid + 1
        return float(low)


def combined_half_width(first: Noise, second: Noise, weight: float, alpha: float) -> float:
    """Smallest t (to 1e-9 relative) with P(|e1 + weight * e2| <= t) >= 1 - alpha, for independent draws;
    `second` must be discrete (it is always a count's noise here).

    Used where one released number is derived from two noisy statistics: SUM = centred sum + centre * count.
    """
    if weight == 0 or second.scale == 0:
        return first.half_width(alpha)
    low_values, high_values, probs, left_out = binned_support(second)
    shift_low = np.minimum(weight * low_values, weight * high_values)
    shift_high = np.maximum(weight * low_values, weight * high_values)

    def coverage(t: float) -> float:
        # |e1 + s| <= t for every shift s of a bin exactly when e1 lies in [-t - s_low, t - s_high]
        return float(np.dot(probs, first.prob_between(-t - shift_low, t - shift_high))) - left_out

    high = first.half_width(alpha / 2) + abs(weight) * second.half_width(alpha / 2)  # a union bound: valid
    while coverage(high) < 1 - alpha:  # only the left-out tail can make the union bound fall short
        high *= 1.01
    low = 0.0
    while high - low > 1e-9 * high:
        mid = (low + high) / 2
        if coverage(mid) >= 1 - alpha:
            high = mid
        else:
            low = mid
    return high


def binned_support(noise: Noise, bins: int = SUPPORT_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """A discrete noise's support as (low, high, probability) per bin, and the mass left out. Up to `bins`
    values each value is its own bin (exact); beyond, consecutive integers share a bin, whose probability comes
    from the closed-form CDF. The work is then bounded by `bins` whatever the scale (a preview at a tiny
    epsilon once took minutes), and a bin's coverage is taken at its worst shift, so intervals stay valid and
    widen by at most a bin's width."""
    values, probs, left_out = noise.support() if _support_size(noise) <= bins else (None, None, 0.0)
    if values is not None:
        return values, values, probs, left_out
    k = (_support_size(noise) - 1) // 2
    edges = np.unique(np.round(np.linspace(-k, k + 1, bins + 1)))
    low, high = edges[:-1], edges[1:] - 1
    probs = np.clip(noise.cdf(high) - noise.cdf(low - 1), 0.0, 1.0)
    return low, high, probs, float(max(1.0 - probs.sum(), 0.0))


def _support_size(noise: Noise) -> int:
    """How many values `Noise.support` would keep (2k + 1), without building them."""
    s = max(noise.scale, 1e-12)
    if noise.family == "laplace":
        p = math.exp(-1.0 / s)
        k = max(0, math.ceil(-s * math.log(TAIL * (1 + p) / 2)) - 1)
    else:
        k = math.ceil(s * math.sqrt(2 * math.log(1 / TAIL)) + 2)
    return 2 * k + 1


def ratio_grid(total: Noise, count: Noise, low: float, high: float, alpha: float,
               cells: int = GRID_CELLS) -> list[list[float]]:
    """For an AVG released as centre + S/C (S a centred sum over [low, high], C a count): cells [d0, d1] of
    the centred range, each with the largest 1 - alpha half-width of S - d C over the cell. Data-free: computed
    once per query, then `ratio_interval` applies it to each group's noisy S and C."""
    edges = np.linspace(low, high, cells + 1)
    widths = {d: combined_half_width(total, count, d, alpha) for d in sorted({abs(float(e)) for e in edges})}
    return [[float(a), float(b), max(widths[abs(float(a))], widths[abs(float(b))])]
            for a, b in zip(edges[:-1], edges[1:])]


def ratio_interval(noisy_sum: float, noisy_count: float, grid: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """The set of centred means d for which the noisy pair is plausible at level 1 - alpha, as an interval.

    For the true mean d*, S - d* C = e_S - d* e_C exactly (the data cancel), so |S - d* C| <= q(d*) holds with
    probability >= 1 - alpha whatever the data: the set {d : |S - d C| <= q(d)} covers d* at that rate (a
    Fieller-type pivot, with no union bound over the two noises). q grows with |d|, so each cell uses its
    largest q and the set found is a superset. None if no d in the range is plausible."""
    found_low, found_high = math.inf, -math.inf
    for d0, d1, q in grid:
        if noisy_count == 0:
            if abs(noisy_sum) > q:
                continue
            lo, hi = d0, d1
        else:
            a, b = (noisy_sum - q) / noisy_count, (noisy_sum + q) / noisy_count
            lo, hi = max(min(a, b), d0), min(max(a, b), d1)
            if lo > hi:
                continue
        found_low, found_high = min(found_low, lo), max(found_high, hi)
    return (found_low, found_high) if found_low <= found_high else None


U64_MAX = 2**64 - 1


def alpha_fraction(quantile: float, max_rows: int) -> tuple[int, int]:
    """The (numerator, denominator) OpenDP scores a quantile with, for a frame of at most `max_rows` rows: the
    quantile's exact binary fraction when its denominator is below floor((2^64 - 1) / max_rows) (the finest
    grid that cannot overflow), else round(q * that) over it. E.g. 0.5 is 1/2; 0.9 is 8106479329266893 / 2^53
    up to 2,048 rows."""
    exact = Fraction(quantile)
    finest = U64_MAX // max(int(max_rows), 1)
    if exact.denominator < finest:
        return exact.numerator, exact.denominator
    return round(quantile * float(finest)), finest


def quantile_rank_error(scale: float, candidates: int, quantile: float, alpha: float, max_rows: int) -> float:
    """Rows: with probability >= 1 - alpha the released candidate's rank error is at most the best candidate's
    plus this. Rank error of c = |(1 - q) #{x < c} - q #{x > c}|, i.e. how many rows c sits from the q-th
    position (OpenDP's score divided by its alpha denominator, which depends on max_rows). Report-noisy-min
    picks a candidate whose score is t above the best with probability at most (K - 1) exp(-t / scale)."""
    if candidates <= 1:
        return 0.0
    _, denominator = alpha_fraction(quantile, max_rows)
    return scale * math.log((candidates - 1) / alpha) / denominator
