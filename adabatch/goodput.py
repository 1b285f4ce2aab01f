"""Goodput, energy and Zeus policies: pick the batch with the most training progress per second or joule.

Progress per sample falls as the batch grows (:func:`statistical_efficiency`); samples per second
and per joule usually rise with it. :class:`ThroughputProfile` learns the second half online from
windows of steps, and :class:`GoodputPolicy` multiplies the two and picks the best batch on a grid.
:func:`adabatch.policy.make_policy` builds the policy a :class:`~adabatch.config.ControllerConfig` names.
These policies read wall time (and joules), so a run that uses them is not reproducible bit for bit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from adabatch.policy import BatchPolicy, PolicyInput, round_to_granularity

log = logging.getLogger("adabatch")

OBJECTIVES = ("time", "energy", "zeus")
# Above this many multiples of the granularity, candidates are a geometric grid instead.
MAX_CANDIDATES = 1024
# A batch size joins the throughput fit once this many of its steps were timed: one step's time is
# noise (a new shape's first call, a measured step, the machine's other work).
MIN_STEPS = 8
# The fit extrapolates only once the batch sizes seen span this factor: from two sizes a factor 2
# apart, the per-sample slope is a difference of two close step times, and timing noise turns it
# into a verdict for the smallest batch that nothing later corrects.
EXPLORE_SPAN = 4
# Per batch size and kind of step, the profile prices a step from the median over its most recent
# windows (at least MIN_WINDOWS of them): a mean lets one disturbed window set the price.
KEEP_WINDOWS = 64
MIN_WINDOWS = 3


def statistical_efficiency(batch: float, base_batch: float, noise_scale: float) -> float:
    """Training progress per sample at ``batch``, relative to ``base_batch`` (1 at the base batch).

    Pollux (Qiao et al., OSDI 2021, Sec. 3.1), from McCandlish et al. (2018): reaching a given
    loss takes S = S_min (1 + phi/M) steps, i.e. S M = S_min (M + phi) samples, at batch M with
    noise scale phi. Progress per sample is therefore proportional to 1 / (phi + M), and relative
    to the base batch M0

        E(M) = (phi + M0) / (phi + M),

    which is 1 at M = M0, about M0/M when M >> phi (extra samples are wasted) and about 1 when
    M << phi (every sample counts). A nan noise scale gives nan.

    Example:
        >>> statistical_efficiency(batch=256, base_batch=32, noise_scale=1024.0)
        0.825
    """
    if not batch > 0 or not base_batch > 0:
        raise ValueError(f"statistical_efficiency needs batch > 0 and base_batch > 0; "
                         f"got batch={batch!r}, base_batch={base_batch!r}.")
    if math.isnan(noise_scale):
        return math.nan
    if noise_scale < 0:
        raise ValueError(f"statistical_efficiency: noise_scale={noise_scale!r} is negative; a noise scale "
                         "is a ratio of non-negative quantities (pass nan while it is unknown).")
    return (noise_scale + base_batch) / (noise_scale + batch)


@dataclass(frozen=True)
class LinearFit:
    """Cost of one step at batch B modelled as ``alpha + beta * B`` (seconds or joules)."""

    alpha: float  # per-step overhead: launch, optimizer step, synchronisation
    beta: float  # cost per sample

    def per_step(self, batch: float) -> float:
        return self.alpha + self.beta * batch

    def per_sample(self, batch: float) -> float:
        return self.alpha / batch + self.beta


def fit_linear(points: Sequence[tuple[float, float]]) -> LinearFit | None:
    """Least-squares ``y = alpha + beta * x`` with ``alpha, beta >= 0``, one weight per point.

    Negative coefficients have no physical meaning (a step cannot take negative time), so when the
    unconstrained fit has one, the better of the two boundary fits is used: through the origin
    (beta = sum(x y) / sum(x^2)) or constant (alpha = mean y). With a single point there is no
    slope to learn; per-step overhead is then assumed zero, i.e. a constant cost per sample
    (alpha = 0, beta = y / x). None without points.

    Example:
        >>> fit_linear([(32, 0.096), (64, 0.128)])
        LinearFit(alpha=0.064, beta=0.001)
    """
    if not points:
        return None
    if len(points) == 1:
        x, y = points[0]
        return LinearFit(0.0, y / x)
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    beta = sxy / sxx
    alpha = my - beta * mx
    if alpha >= 0 and beta >= 0:
        return LinearFit(_tidy(alpha), _tidy(beta))
    candidates = [LinearFit(0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points)),
                  LinearFit(my, 0.0)]
    return min(candidates, key=lambda f: sum((f.per_step(x) - y) ** 2 for x, y in points))


def _tidy(value: float) -> float:
    # Drop float noise in the last bits so exact data gives exact coefficients (and stable ties).
    return float(f"{value:.12g}")


class ThroughputProfile:
    """Seconds and joules per step at each batch size seen, with a linear model to extrapolate.

    Each :meth:`observe` adds a window of steps at one batch: the ordinary training steps between
    two measurements, or the controller's measured step (``measured=True``). Per batch size and kind
    of step the profile keeps the most recent ``KEEP_WINDOWS`` windows and prices a step by their
    median (weighted by steps), so one window slowed by something else on the machine moves the
    price little. It fits per-step cost t(B) = alpha + beta * B over the batch sizes priced with
    :func:`fit_linear` (one point per batch size, so a long stay at one batch does not drown the
    others; Pollux fits the same shape, Qiao et al. 2021 Sec. 3.2), and predicts per-sample cost
    t(B) / B anywhere.

    What is fitted is the cost of *training*. A measured step costs more (split into pieces or
    norm hooks, one read-back; on linear regression about 1.3x an ordinary step), and the
    controller measures every so many samples, so a large batch is measured on a larger share of
    its steps: averaged together, the profile would charge large batches for the estimator's work.
    Per sample, measuring costs the same at every batch that is not measured on every step, so it
    does not bear on which batch trains fastest. A batch size that has only measured steps (every
    step is measured while the batch exceeds the measurement spacing) is priced at its measured
    cost less the extra cost of a measured step, fitted as alpha + beta * B over the batch sizes
    timed both ways (none, while that difference is not positive); until one size is timed both
    ways, the profile cannot tell the two apart and uses the median over all steps. The controller
    starts each window after its decision, so the time a proposal takes is no step's cost (that
    time, read as 9.3 ms per ordinary step at batch 656 against 1.5 ms per measured one, kept the
    goodput policy at batch 16 on linear regression while fixed batches of 4096 trained about 70x
    faster).

    A batch size counts (in the fit and in :meth:`batches`) once ``min_steps`` of its steps in at
    least ``min_windows`` windows were timed. With one point per batch size, a single slow step
    would otherwise weigh as much as thousands: one step at 128 that took six times a step at 16
    (its first call at the new shape, measured) made the fit read a constant cost per sample, and
    the policy went back to the smallest batch for the rest of a run.

    Example:
        >>> profile = ThroughputProfile()
        >>> for window in range(3):  # steps between measurements, 100 at a time
        ...     profile.observe(batch=32, samples=3200, seconds=9.6, joules=480.0)
        ...     profile.observe(batch=64, samples=6400, seconds=12.8, joules=704.0)
        >>> round(profile.seconds_per_sample(128), 6), round(profile.joules_per_sample(128), 6)
        (0.0015, 0.09)
    """

    KINDS = ("time", "energy")

    def __init__(self, min_steps: float = MIN_STEPS, min_windows: int = MIN_WINDOWS) -> None:
        if not min_steps >= 1:
            raise ValueError(f"ThroughputProfile: min_steps={min_steps!r} must be >= 1.")
        if not (isinstance(min_windows, int) and min_windows >= 1):
            raise ValueError(f"ThroughputProfile: min_windows={min_windows!r} must be an integer >= 1.")
        self.min_steps, self.min_windows = float(min_steps), min_windows
        # kind -> (batch, measured) -> the most recent windows as [steps, cost] (KEEP_WINDOWS of them,
        # more than the thresholds need, so what they hold decides whether a batch size counts)
        self._cost: dict[str, dict[tuple[int, bool], list[list[float]]]] = {kind: {} for kind in self.KINDS}
        self._metered: dict[int, list[float]] = {}  # batch -> [joules, seconds] of the windows that have joules

    def observe(self, batch: int, samples: int, seconds: float, joules: float | None = None,
                measured: bool = False) -> None:
        """Add ``samples`` trained at ``batch`` in ``seconds`` (and ``joules``, if metered).

        ``measured``: the steps were the controller's measured steps, whose extra cost is the
        estimator's and is kept out of the training cost the policies compare.
        """
        if not batch > 0:
            raise ValueError(f"ThroughputProfile.observe: batch={batch!r} must be > 0.")
        if samples == 0:
            return  # an empty window carries no information
        if not samples > 0 or not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"ThroughputProfile.observe: got samples={samples!r}, seconds={seconds!r}; "
                             "need samples > 0 and a finite seconds > 0 measured over those samples.")
        if joules is not None and not (math.isfinite(joules) and joules >= 0):
            raise ValueError(f"ThroughputProfile.observe: joules={joules!r} must be finite and >= 0, "
                             "or None when no meter is attached.")
        steps = samples / batch
        for kind, cost in (("time", seconds), ("energy", joules)):
            if cost is not None:
                recent = self._cost[kind].setdefault((int(batch), bool(measured)), [])
                recent.append([steps, float(cost)])
                del recent[:-KEEP_WINDOWS]
        if joules is not None:
            metered = self._metered.setdefault(int(batch), [0.0, 0.0])
            metered[0] += joules
            metered[1] += seconds

    def _check_kind(self, kind: str) -> dict[tuple[int, bool], list[list[float]]]:
        if kind not in self.KINDS:
            raise ValueError(f"ThroughputProfile: kind={kind!r}; use 'time' or 'energy'.")
        return self._cost[kind]

    def _per_step(self, rows: list[tuple[tuple[int, bool], list[list[float]]]]) -> dict[int, float]:
        """Median cost of one step per batch size, over windows; sizes with too little data are left out."""
        out: dict[int, list[list[float]]] = {}
        for (batch, _), recent in rows:
            out.setdefault(batch, []).extend(recent)
        return {b: _weighted_median(windows) for b, windows in sorted(out.items())
                if sum(n for n, _ in windows) >= self.min_steps and len(windows) >= self.min_windows}

    def step_costs(self, kind: str = "time") -> dict[int, float]:
        """Training cost of one step at each batch size with enough data (seconds or joules)."""
        rows = self._check_kind(kind)
        plain = self._per_step([(key, row) for key, row in rows.items() if not key[1]])
        measured = self._per_step([(key, row) for key, row in rows.items() if key[1]])
        if set(measured) <= set(plain):
            return plain
        extra = fit_linear([(b, max(measured[b] - plain[b], 0.0)) for b in sorted(set(plain) & set(measured))])
        if extra is None:  # no batch size timed both ways: the measured share cannot be told apart
            return self._per_step(list(rows.items()))
        out = dict(plain)
        for b in measured.keys() - plain.keys():
            training = measured[b] - extra.per_step(b)
            if training > 0:  # else the extrapolated extra cost is not to be trusted here: no price yet
                out[b] = training
        return dict(sorted(out.items()))

    def batches(self, kind: str = "time") -> list[int]:
        """Batch sizes with enough data (``min_steps`` timed steps), for ``kind`` ``"time"`` or ``"energy"``."""
        return list(self.step_costs(kind))

    def time_fit(self) -> LinearFit | None:
        """Training seconds per step as alpha + beta * B over the batch sizes with enough steps; None before any."""
        return fit_linear(list(self.step_costs("time").items()))

    def energy_fit(self) -> LinearFit | None:
        """Training joules per step as alpha + beta * B over the metered batch sizes with enough steps; None before any."""
        return fit_linear(list(self.step_costs("energy").items()))

    def seconds_per_sample(self, batch: float) -> float:
        fit = self.time_fit()
        return math.nan if fit is None else fit.per_sample(batch)

    def joules_per_sample(self, batch: float) -> float:
        fit = self.energy_fit()
        return math.nan if fit is None else fit.per_sample(batch)

    def max_power_w(self) -> float:
        """Highest mean power (joules / seconds) seen at any batch size; nan without joules."""
        priced = self.step_costs("energy")  # batch sizes with enough metered windows
        powers = [j / s for b, (j, s) in self._metered.items() if b in priced and s > 0]
        return max(powers) if powers else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {kind: [[b, measured, recent] for (b, measured), recent in sorted(self._cost[kind].items())]
                for kind in self.KINDS} | {"metered": [[b, *v] for b, v in sorted(self._metered.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "metered" not in state or any(len(row) != 3 for kind in self.KINDS for row in state[kind]):
            # saved before measured steps were priced apart (a mix of both kinds), or in another layout
            log.warning("adabatch: the throughput profile in this checkpoint was saved in an older layout (before "
                        "measured steps were priced apart); the goodput policy starts a new profile (it re-times "
                        "its batch sizes).")
            self._cost, self._metered = {kind: {} for kind in self.KINDS}, {}
            return
        for kind in self.KINDS:
            self._cost[kind] = {(int(b), bool(m)): [[float(n), float(c)] for n, c in recent]
                                for b, m, recent in state[kind]}
        self._metered = {int(b): [float(j), float(s)] for b, j, s in state["metered"]}


def _weighted_median(windows: list[list[float]]) -> float:
    """Median of per-step cost over windows, each weighted by its steps: one window slowed by
    something else on the machine (a collection, a preempted core) moves it little."""
    ordered = sorted(windows, key=lambda w: w[1] / w[0])
    half, acc = 0.5 * sum(n for n, _ in ordered), 0.0
    for n, cost in ordered:
        acc += n
        if acc >= half:
            return cost / n
    return ordered[-1][1] / ordered[-1][0]


def candidate_batches(current: int, granularity: int, min_batch: int, max_batch: int,
                      max_candidates: int = MAX_CANDIDATES) -> list[int]:
    """Batches a policy may propose: every multiple of ``granularity`` in bounds, plus ``current``.

    When there are more than ``max_candidates`` multiples, a geometric grid of that many points
    (snapped to the granularity) replaces them, which keeps relative resolution constant.

    Example:
        >>> candidate_batches(current=64, granularity=32, min_batch=32, max_batch=160)
        [32, 64, 96, 128, 160]
    """
    lo = round_to_granularity(min_batch, granularity, min_batch, max_batch)
    hi = round_to_granularity(max_batch, granularity, min_batch, max_batch)
    count = (hi - lo) // granularity + 1
    if count <= max_candidates:
        grid = set(range(lo, hi + 1, granularity))
    else:
        ratio = (hi / lo) ** (1.0 / (max_candidates - 1))
        grid = {round_to_granularity(lo * ratio ** i, granularity, min_batch, max_batch)
                for i in range(max_candidates)}
    grid.add(int(current))
    return sorted(grid)


class GoodputPolicy(BatchPolicy):
    """Aim at the batch with the most progress per second, per joule, or the lowest Zeus cost.

    With E(B) from :func:`statistical_efficiency` (progress per sample) and per-sample seconds
    t(B)/B and joules e(B)/B from the :class:`ThroughputProfile`, the objectives are

        time   (Pollux goodput, Qiao et al. 2021):  maximise  E(B) * B / t(B)
        energy:                                      maximise  E(B) * B / e(B)
        zeus   (You et al., NSDI 2023):              minimise  (eta e(B) + (1 - eta) P_max t(B)) / (E(B) B)

    where P_max is ``max_power_w`` (Zeus uses the GPU's maximum power limit); when it is None the
    highest mean power observed in the profile stands in, pricing time at what this job draws at
    its hungriest. For linear costs t(B) = a + b B the time optimum is B* = sqrt(phi a / b)
    (set d/dB log of the goodput to zero); energy and Zeus have the same form with their own
    coefficients, so they part ways exactly where power per sample changes with the batch.

    Exploration: with one batch size in the profile, the single-point fit assumes a constant cost
    per sample, under which a larger batch can only look worse, so the policy would never move; and
    from two sizes a factor 2 apart the slope is a small difference of two noisy step times. Until the
    sizes seen span ``EXPLORE_SPAN`` (4x; or reach the upper bound) it therefore proposes four times
    the current batch (half at the upper bound) once the current batch has data, and the current
    batch before that. It returns nan (no opinion) while the noise scale is unknown or nothing has
    been observed. Candidates come from :func:`candidate_batches`; ties go to the smaller batch, so
    it is deterministic given its profile.

    Example:
        >>> policy = GoodputPolicy("time")
        >>> for batch in (32, 64):  # per-step seconds 0.064 + 0.001 * batch, 3 windows of 100 steps each
        ...     for window in range(3):
        ...         policy.observe(batch, 100 * batch, 100 * (0.064 + 0.001 * batch), None)
        >>> policy.propose(PolicyInput(step=200, batch=64, base_batch=32, noise_scale=1024.0,
        ...                            granularity=32, min_batch=32, max_batch=1024))
        256.0
    """

    def __init__(self, objective: str = "time", eta: float = 0.5, max_power_w: float | None = None,
                 profile: ThroughputProfile | None = None) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"GoodputPolicy objective={objective!r}: use one of {', '.join(OBJECTIVES)}.")
        if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
            raise ValueError(f"GoodputPolicy eta={eta!r}: use a number in [0, 1] (weight on energy).")
        if max_power_w is not None and not (math.isfinite(max_power_w) and max_power_w > 0):
            raise ValueError(f"GoodputPolicy max_power_w={max_power_w!r}: use watts > 0, or None to take "
                             "the highest power observed.")
        self.objective = objective
        self.eta = float(eta)
        self.max_power_w = max_power_w
        self.profile = profile if profile is not None else ThroughputProfile()

    def observe(self, batch: int, samples: int, seconds: float, joules: float | None,
                measured: bool = False) -> None:
        self.profile.observe(batch, samples, seconds, joules, measured)

    def _kinds(self) -> tuple[str, ...]:
        return {"time": ("time",), "energy": ("energy",), "zeus": ("time", "energy")}[self.objective]

    def score(self, batch: int, base_batch: int, noise_scale: float) -> float:
        """Higher is better: progress per second or per joule, or minus Zeus cost per progress."""
        return self._scorer(base_batch, noise_scale)(batch)

    def _scorer(self, base_batch: int, noise_scale: float) -> Callable[[int], float]:
        """:meth:`score` at any batch, with the profile's fits taken once (a proposal scores up to
        ``MAX_CANDIDATES`` batches)."""
        time_fit = self.profile.time_fit() if self.objective != "energy" else None
        energy_fit = self.profile.energy_fit() if self.objective != "time" else None
        power = self.max_power_w if self.max_power_w is not None else self.profile.max_power_w()

        def per_sample(fit: LinearFit | None, batch: int) -> float:
            return math.nan if fit is None else fit.per_sample(batch)

        def score(batch: int) -> float:
            eff = statistical_efficiency(batch, base_batch, noise_scale)
            if self.objective == "time":
                return eff / per_sample(time_fit, batch)
            if self.objective == "energy":
                return eff / per_sample(energy_fit, batch)
            cost = self.eta * per_sample(energy_fit, batch) + (1.0 - self.eta) * power * per_sample(time_fit, batch)
            return -cost / eff

        return score

    def propose(self, inp: PolicyInput) -> float:
        if not (math.isfinite(inp.noise_scale) and inp.noise_scale >= 0):
            return math.nan
        seen = [set(self.profile.batches(k)) for k in self._kinds()]
        if any(not s for s in seen):
            return math.nan
        if any(len(s) < 2 or (max(s) < EXPLORE_SPAN * min(s) and max(s) < inp.max_batch) for s in seen):
            return self._explore(inp, seen)
        best, best_score, score = inp.batch, -math.inf, self._scorer(inp.base_batch, inp.noise_scale)
        for batch in candidate_batches(inp.batch, inp.granularity, inp.min_batch, inp.max_batch):
            s = score(batch)
            if s > best_score:
                best, best_score = batch, s
        return float(best)

    def _explore(self, inp: PolicyInput, seen: list[set[int]]) -> float:
        if any(inp.batch not in s for s in seen):
            return float(inp.batch)  # stay until the current batch has its own data point
        up = round_to_granularity(EXPLORE_SPAN * inp.batch, inp.granularity, inp.min_batch, inp.max_batch)
        if up != inp.batch:
            return float(up)
        return float(round_to_granularity(inp.batch / 2, inp.granularity, inp.min_batch, inp.max_batch))

    def state_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.profile.load_state_dict(state["profile"])
