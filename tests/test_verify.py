"""The [verify] stage: the best trials and the default config re-run on fresh seeds (linreg, in-process)."""

from __future__ import annotations

import time
import tomllib

import pytest

from adabatch import ControllerConfig
from adabatch.study import (
    RUN_ATTR,
    StudySpec,
    StudySpecError,
    TrialRunner,
    best_trials,
    export_config,
    load_study,
    run_study,
    verification,
)
from adabatch.storage import TraceStore, open_optuna_storage
from adabatch.verify import Verifier, claim_key, result_key
from adabatch.workloads import train

STUDY = """
[study]
name = "checked"
workload = "linreg"
n_trials = 4
startup_trials = 4
seed = 7
seeds_per_trial = 2
sample_budget = 1200
eval_every = 400

[verify]
top_k = 2
seeds = 3

[reliability]
heartbeat_interval = 1
grace_period = 3

[fixed]
max_batch = 128

[search]
target_factor = { low = 0.5, high = 8.0, log = true }
lr_rule = { choices = ["linear", "sqrt"] }
"""


def spec_from(text: str) -> StudySpec:
    return StudySpec.from_dict(tomllib.loads(text))


def url_in(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def test_the_stage_reruns_the_top_trials_and_the_default_on_seeds_no_trial_saw(tmp_path):
    spec = spec_from(STUDY)
    lines: list[str] = []
    study = run_study(spec, url_in(tmp_path), progress=False, log=lines.append)
    report = verification(study)
    # Seeds 7 and 8 trained the trials; the stage uses the three after them.
    assert report.seeds == [9, 10, 11] and report.complete and report.missing == 0
    assert len(report.results) == 2 and report.baseline is not None
    assert sum(line.startswith("verify ") for line in lines) == 3 * 3
    # The two best trials by their own mean, ranked again by their mean on the fresh seeds.
    done = sorted((t for t in study.trials if t.values), key=lambda t: t.values[0])
    assert {v.candidate.trial.number for v in report.results} == {done[0].number, done[1].number}
    means = [v.mean for v in report.results]
    assert means == sorted(means)  # val_loss: lower is better
    assert best_trials(study) == [report.results[0].candidate.trial]
    # Each stored value is a real run of that config on that seed (the default: [fixed] alone).
    wl = spec.workload_obj()
    for seed in report.seeds:
        run = train(wl, ControllerConfig(max_batch=128), seed=seed, sample_budget=1200, eval_every=400)
        assert report.baseline.values[seed] == pytest.approx(run.final_metric, rel=1e-6)
    # A rerun of a finished study trains nothing more.
    again: list[str] = []
    run_study(spec, url_in(tmp_path), progress=False, log=again.append)
    assert again == []


def test_export_writes_the_default_when_no_trial_beats_it_on_the_fresh_seeds(tmp_path):
    spec = spec_from(STUDY)
    study = run_study(spec, url_in(tmp_path), progress=False)
    report = verification(study)
    # Make every trial lose to the default on the fresh seeds, as stored results would say.
    for v in report.results:
        for seed in report.seeds:
            study.set_user_attr(result_key(v.candidate.label, seed),
                                {"value": report.baseline.values[seed] * 2 + 1.0})
    study = load_study("checked", url_in(tmp_path))
    report = verification(study)
    assert report.default_wins
    trial, path = export_config(study, tmp_path / "chosen.json")
    assert trial is None and ControllerConfig.load(path) == ControllerConfig(max_batch=128)
    assert "no trial beat the default" in "\n".join(report.lines("val_loss"))
    # Asking for a trial by number still exports that trial.
    number = report.results[0].candidate.trial.number
    trial, path = export_config(study, tmp_path / "trial.json", number)
    assert trial.number == number and ControllerConfig.load(path) != ControllerConfig(max_batch=128)


def test_an_interrupted_stage_keeps_finished_runs_frees_its_claim_and_resumes(tmp_path):
    spec = spec_from(STUDY.replace("top_k = 2", "top_k = 1"))
    url = url_in(tmp_path)
    study = run_study(spec, url, n_trials=4, progress=False)  # the stage runs after the 4th trial ...
    for key in [k for k in study.user_attrs if k.startswith("adabatch_verify")]:
        study.set_user_attr(key, None)  # ... so forget it, as if it never ran
    study = load_study("checked", url)
    assert verification(study).missing == 2 * 3 and not verification(study).complete
    runner = TrialRunner(spec, TraceStore(open_optuna_storage(url).engine), "checked")
    calls: list[tuple[int, int]] = []

    def flaky(config, seed, beat):
        calls.append((seed, len(calls)))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return runner.run_config(config, seed, beat)

    def verifier(run_config):
        from contextlib import nullcontext
        return Verifier(study, spec.verify, spec.verify_seeds(), config_of=lambda t: ControllerConfig.from_dict(
            t.user_attrs["config"]), default_config=spec.default_config(), run_config=run_config,
            lock=nullcontext, retry=lambda fn, what: fn(), heartbeat_interval=1, grace_period=60)

    with pytest.raises(KeyboardInterrupt):
        verifier(flaky).run()
    study = load_study("checked", url)
    assert verification(study).missing == 4  # two runs stored before the interrupt
    cand = verification(study).results[0].candidate
    # Every claim is released: the finished runs' and the interrupted one's (seed 11).
    assert all(study.user_attrs.get(claim_key(cand.label, s)) is None for s in (9, 10, 11))
    assert verifier(runner.run_config).run() == 4
    assert verification(load_study("checked", url)).complete


def test_a_fresh_claim_is_left_to_its_worker_and_a_stale_one_is_taken(tmp_path):
    spec = spec_from(STUDY.replace("top_k = 2", "top_k = 1").replace("seeds = 3", "seeds = 1"))
    url = url_in(tmp_path)
    study = run_study(spec, url, progress=False)
    report = verification(study)
    labels = [report.results[0].candidate.label, "default"]
    for label in labels:
        study.set_user_attr(result_key(label, 9), None)
    # Another worker claimed the trial's run a moment ago and the default's long ago.
    study.set_user_attr(claim_key(labels[0], 9), {"worker": "elsewhere", "at": time.time()})
    study.set_user_attr(claim_key(labels[1], 9), {"worker": "dead", "at": time.time() - 3600})
    from contextlib import nullcontext
    ran = []
    v = Verifier(load_study("checked", url), spec.verify, [9],
                 config_of=lambda t: ControllerConfig.from_dict(t.user_attrs["config"]),
                 default_config=spec.default_config(), run_config=lambda c, s, b: (ran.append(c) or 1.0, None),
                 lock=nullcontext, retry=lambda fn, what: fn(), heartbeat_interval=1, grace_period=60)
    assert v.run() == 1 and ran == [spec.default_config()]


def test_infeasible_trials_are_never_candidates(tmp_path):
    # A target no run reaches: every trial is infeasible, so there is nothing to verify.
    spec = spec_from(STUDY.replace("eval_every = 400", "eval_every = 400\nrequire_target = true\ntarget = 1e-9"))
    lines: list[str] = []
    study = run_study(spec, url_in(tmp_path), progress=False, log=lines.append)
    assert all(t.user_attrs["constraint"][0] > 0 for t in study.trials)
    report = verification(study)
    assert report.results == [] and report.baseline is None and not report.complete
    assert not [line for line in lines if line.startswith("verify ")] and best_trials(study) == []


@pytest.mark.parametrize("change, message", [
    (("top_k = 2", "top_k = -1"), "[verify] top_k"),
    (("seeds = 3", "seeds = 0"), "[verify] seeds"),
    (("seeds = 3", "seeds = 3\nbaseline = 'yes'"), "[verify] baseline"),
    (("seeds = 3", "seeds = 3\nrounds = 2"), "[verify]"),
    (('n_trials = 4', 'n_trials = 4\nobjectives = ["metric", "seconds"]'), "one objective"),
])
def test_bad_verify_settings_are_named(change, message):
    with pytest.raises(StudySpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        spec_from(STUDY.replace(*change))


def test_the_stage_is_off_without_the_table_and_its_settings_are_not_fingerprinted(tmp_path):
    plain = spec_from(STUDY.replace("[verify]\ntop_k = 2\nseeds = 3\n", ""))
    assert plain.verify.top_k == 0 and plain.verify_seeds() == []
    assert plain.fingerprint() == spec_from(STUDY).fingerprint()  # [verify] changes no trial
    study = run_study(plain, url_in(tmp_path), progress=False)
    assert verification(study) is None and "verify" not in study.user_attrs[RUN_ATTR]
    assert not any(k.startswith("adabatch_verify:") for k in study.user_attrs)
