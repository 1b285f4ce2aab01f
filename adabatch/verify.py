"""Re-running a study's best trials on seeds they never saw, beside the default config.

A study ranks its trials by what they scored on the seeds they trained on. With dozens of trials
and seed-to-seed noise larger than most differences between configs, the top of that ranking
favours the trial that was lucky: picked by its own seeds, it loses to the default on new ones
(the quick study's best trial did, on 7 of 10 held-out seeds, before this stage existed).

So once a study has all its trials, the ``top_k`` best are trained again on ``seeds`` fresh
seeds (the ones after the trials' own), and so is the default config (the study file's
``[fixed]`` values alone, every tuned field at its default). Each of those means is unbiased:
none of the runs had a say in choosing the candidates. ``study best`` and ``study export`` pick by
them, and say when no trial beat the default.

Every run's result is a study attribute of its own (``adabatch_verify:<label>:<seed>``), written
when the run ends; a run in progress is claimed the same way, and the claim is refreshed like a
trial's heartbeat, so several workers share the runs, a killed worker's claim goes stale after the
grace period, and a rerun of ``study run`` finishes what is missing without redoing what is done.

Example:
    >>> VerifySettings(top_k=3, seeds=4).runs()
    16
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from optuna.trial import TrialState

RESULT_PREFIX = "adabatch_verify:"
CLAIM_PREFIX = "adabatch_verify_claim:"
DEFAULT_LABEL = "default"


@dataclass(frozen=True)
class VerifySettings:
    """The ``[verify]`` table: how many of the best trials to re-run, on how many fresh seeds.

    ``top_k = 0`` turns the stage off. ``baseline`` re-runs the default config as well, on the
    same seeds, so every candidate is compared with it seed by seed.
    """

    top_k: int = 0
    seeds: int = 5
    baseline: bool = True

    def runs(self) -> int:
        """Training runs the stage takes when it runs in full."""
        return (self.top_k + self.baseline) * self.seeds if self.top_k else 0

    def to_dict(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "seeds": self.seeds, "baseline": self.baseline}


@dataclass(frozen=True)
class Candidate:
    """One config under verification: a trial (``trial`` set) or the default (``trial`` None)."""

    label: str
    config: Any
    trial: Any = None


@dataclass(frozen=True)
class Verified:
    """What the verification runs say about one candidate."""

    candidate: Candidate
    values: dict[int, float]  # seed -> objective value

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values()) if self.values else math.nan

    def against(self, other: "Verified", direction: str = "maximize") -> tuple[float, int, int]:
        """Mean paired difference to ``other`` over the seeds both have, and (wins, seeds): the seeds
        where this one scored better in ``direction`` (higher for "maximize", lower for "minimize").

        Example:
            >>> a, b = Verified(None, {1: 70.0, 2: 74.0}), Verified(None, {1: 88.0, 2: 88.0})
            >>> a.against(b, "minimize"), a.against(b, "maximize")
            ((-16.0, 2, 2), (-16.0, 0, 2))
        """
        shared = sorted(set(self.values) & set(other.values))
        diffs = [self.values[s] - other.values[s] for s in shared]
        sign = 1.0 if direction == "maximize" else -1.0
        return (statistics.fmean(diffs) if diffs else math.nan), sum(sign * d > 0 for d in diffs), len(diffs)


@dataclass(frozen=True)
class Report:
    """The stage's state: the candidates' results, which one is chosen, and what is missing."""

    seeds: list[int]
    direction: str  # "maximize" or "minimize"
    results: list[Verified]  # trials by verified mean, best first
    baseline: Verified | None
    missing: int  # runs not yet done

    @property
    def complete(self) -> bool:
        return self.missing == 0 and bool(self.results)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b

    @property
    def best(self) -> Verified | None:
        """The trial with the best verified mean (None until the stage is complete)."""
        return self.results[0] if self.complete else None

    @property
    def default_wins(self) -> bool:
        """Whether the default config scored at least as well as every verified trial."""
        best = self.best
        return best is not None and self.baseline is not None and not self.better(best.mean, self.baseline.mean)

    def lines(self, objective: str) -> list[str]:
        """What ``study best`` prints about the stage."""
        head = (f"verified on {len(self.seeds)} fresh seed(s) {_seed_text(self.seeds)} that no trial trained "
                f"on ({objective}, {self.direction}; mean over those seeds):")
        out = [head]
        if self.baseline is not None:
            out.append(f"  default config  {_value(self.baseline)}")
        for v in self.results:
            line = f"  trial {v.candidate.trial.number:<7d} {_value(v)}"
            if self.baseline is not None and v.values and self.baseline.values:
                diff, wins, n = v.against(self.baseline, self.direction)
                sign = diff if self.direction == "maximize" else -diff
                line += f"  {diff:+.4g} vs default ({'better' if sign > 0 else 'not better'}; ahead on {wins} of {n} seeds)"
            out.append(line)
        if not self.complete:
            out.append(f"  {self.missing} verification run(s) still to do: run the study file again to finish them.")
        elif self.default_wins:
            out.append("  no trial beat the default config on the fresh seeds: 'study export' writes the default.")
        return out


def _value(v: Verified) -> str:
    return f"{v.mean:.4g} ({len(v.values)} seed(s))" if v.values else "(not run yet)"


def _seed_text(seeds: Sequence[int]) -> str:
    return f"{seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else str(seeds[0]) if seeds else ""


def fresh_seeds(seed: int, seeds_per_trial: int, settings: VerifySettings) -> list[int]:
    """The seeds after the trials' own: ``seed + seeds_per_trial``, and on."""
    start = seed + seeds_per_trial
    return list(range(start, start + settings.seeds))


def candidates(study: Any, settings: VerifySettings, config_of: Callable[[Any], Any],
               default_config: Any) -> list[Candidate]:
    """The ``top_k`` best completed feasible trials (one per distinct config), then the default if
    asked for; nothing at all while no trial is feasible."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and not any(c > 0 for c in t.user_attrs.get("constraint") or [])]
    sign = -1.0 if study.direction.name == "MAXIMIZE" else 1.0
    done.sort(key=lambda t: (sign * t.values[0], t.number))
    out, seen = [], set()
    for t in done:
        config = config_of(t)
        key = repr(sorted(config.to_dict().items()))
        if key in seen:  # a retry of a trial, or the same draw twice
            continue
        seen.add(key)
        out.append(Candidate(f"trial{t.number}", config, t))
        if len(out) == settings.top_k:
            break
    if settings.baseline and out:
        out.append(Candidate(DEFAULT_LABEL, default_config))
    return out


def result_key(label: str, seed: int) -> str:
    return f"{RESULT_PREFIX}{label}:{seed}"


def claim_key(label: str, seed: int) -> str:
    return f"{CLAIM_PREFIX}{label}:{seed}"


def report(study: Any, settings: VerifySettings, seeds: Sequence[int], config_of: Callable[[Any], Any],
           default_config: Any) -> Report | None:
    """The stage as the study's attributes record it; None when the study has it off."""
    if not settings.top_k or len(study.directions) != 1:
        return None
    attrs = study.user_attrs
    verified = []
    missing = 0
    for c in candidates(study, settings, config_of, default_config):
        values = {}
        for seed in seeds:
            stored = attrs.get(result_key(c.label, seed))
            if not isinstance(stored, Mapping):
                missing += 1
            elif stored.get("value") is None:  # the run failed (a non-finite loss): the worst value
                values[seed] = -math.inf if study.direction.name == "MAXIMIZE" else math.inf
            else:
                values[seed] = float(stored["value"])
        verified.append(Verified(c, values))
    direction = study.direction.name.lower()
    baseline = next((v for v in verified if v.candidate.trial is None), None)
    trials = [v for v in verified if v.candidate.trial is not None]
    sign = -1.0 if direction == "maximize" else 1.0
    trials.sort(key=lambda v: (sign * v.mean if v.values else math.inf, v.candidate.trial.number))
    return Report(list(seeds), direction, trials, baseline, missing)


class Verifier:
    """Runs the stage's missing runs, sharing them with any other worker of the study.

    ``run_config(config, seed, on_step)`` trains one config on one seed and returns the objective
    value and the run's result; ``lock()`` is the study's lock; ``retry(fn, what)`` wraps each
    database call; ``log`` gets one line per finished run.
    """

    def __init__(self, study: Any, settings: VerifySettings, seeds: Sequence[int], *,
                 config_of: Callable[[Any], Any], default_config: Any,
                 run_config: Callable[[Any, int, Callable[[], None]], tuple[float, Any]],
                 lock: Callable[[], Any], retry: Callable[[Callable[[], Any], str], Any],
                 heartbeat_interval: float, grace_period: float,
                 log: Callable[[str], None] | None = None) -> None:
        self.study, self.settings, self.seeds = study, settings, list(seeds)
        self.config_of, self.default_config, self.run_config = config_of, default_config, run_config
        self.lock, self.retry = lock, retry
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.log = log or (lambda line: None)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def run(self) -> int:
        """Do missing runs until none is left unclaimed; returns how many this worker did."""
        done = 0
        while True:
            item = self.retry(self._claim, "claiming a verification run")
            if item is None:
                return done
            cand, seed = item
            self._run(cand, seed)
            done += 1

    def _claim(self) -> tuple[Candidate, int] | None:
        with self.lock():
            attrs = self.study.user_attrs
            now = time.time()
            for cand in candidates(self.study, self.settings, self.config_of, self.default_config):
                for seed in self.seeds:
                    if isinstance(attrs.get(result_key(cand.label, seed)), Mapping):
                        continue  # done
                    claim = attrs.get(claim_key(cand.label, seed))
                    if isinstance(claim, Mapping) and now - float(claim.get("at", 0)) < self.grace_period:
                        continue  # another worker is on it
                    self.study.set_user_attr(claim_key(cand.label, seed), {"worker": self.worker, "at": now})
                    return cand, seed
        return None

    def _run(self, cand: Candidate, seed: int) -> None:
        key = claim_key(cand.label, seed)
        last = [time.monotonic()]

        def beat() -> None:
            if time.monotonic() - last[0] >= self.heartbeat_interval:
                last[0] = time.monotonic()
                self.retry(lambda: self.study.set_user_attr(key, {"worker": self.worker, "at": time.time()}),
                           "refreshing a verification claim")

        error = None
        try:
            value, result = self.run_config(cand.config, seed, beat)
        except FloatingPointError as exc:  # counted as the worst value, not retried forever
            value, result, error = math.nan, None, f"{type(exc).__name__}: {exc}"
        except BaseException:
            # Let the next worker (or the next run) take it at once instead of after the grace period.
            try:
                self.study.set_user_attr(key, None)
            except Exception:
                pass
            raise
        stored = {"value": None if not math.isfinite(value) else float(value),
                  "final_metric": _finite(getattr(result, "final_metric", None)),
                  "seconds": _finite(getattr(result, "wall_seconds", None)), "worker": self.worker,
                  "error": error}
        self.retry(lambda: self.study.set_user_attr(result_key(cand.label, seed), stored),
                   "storing a verification run")
        self.retry(lambda: self.study.set_user_attr(key, None), "releasing a verification claim")
        name = "default config" if cand.trial is None else f"trial {cand.trial.number}"
        self.log(f"verify {name} on seed {seed}: {value:.4g}")


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
