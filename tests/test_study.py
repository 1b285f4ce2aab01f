"""Study files, their validation, and the trial runner (in-process, on the linreg workload)."""

from __future__ import annotations

import dataclasses
import math
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from adabatch.storage import StorageError, open_optuna_storage, retried_trial_number
from adabatch.study import (
    FINGERPRINT_ATTR,
    SPEC_ATTR,
    StudySpec,
    StudySpecError,
    best_trials,
    export_config,
    load_study,
    make_pruner,
    open_study,
    run_study,
)
from adabatch import ControllerConfig

States = optuna.trial.TrialState

ROOT = Path(__file__).resolve().parents[1]

TINY = """
[study]
name = "tiny"
workload = "linreg"
n_trials = 2
sample_budget = 800
eval_every = 400

[reliability]
heartbeat_interval = 1
grace_period = 3

[fixed]
max_batch = 128

[search]
grow_threshold = { low = 1.2, high = 3.0 }
cooldown_samples = { low = 0, high = 2000 }
lr_rule = { choices = ["linear", "sqrt"] }
"""


def spec_from(text: str) -> StudySpec:
    import tomllib

    return StudySpec.from_dict(tomllib.loads(text))


def url_in(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def test_shipped_study_files_are_valid():
    files = sorted((ROOT / "studies").glob("*.toml")) + sorted((ROOT / "benchmarks" / "tuning").glob("*.toml"))
    specs = {p.name: StudySpec.from_toml(p) for p in files}
    assert {"mnist1d_quick.toml", "mnist1d_sgd.toml", "mnist1d_multiobjective.toml"} <= set(specs)
    assert any(s.workload == "charlm" for s in specs.values())
    quick = specs["mnist1d_quick.toml"]
    assert quick.directions() == ["maximize"] and quick.pruner != "none"
    # The quick study's pruner waits for half the budget and keeps most trials (see its comments).
    assert quick.pruner_config()["warmup_samples"] >= quick.budget() // 2
    # Its pick is checked on fresh seeds against the default before it is exported.
    assert quick.verify.top_k >= 2 and quick.verify.baseline and set(quick.verify_seeds()).isdisjoint(quick.trial_seeds())
    multi = specs["mnist1d_multiobjective.toml"]
    assert len(multi.directions()) == 3 and "energy" in multi.objectives and multi.require_target
    assert multi.pruner == "none"


@pytest.mark.parametrize("change, message", [
    (("[study]", "[study]\ncolour = 'red'"), "unknown key(s) colour"),
    (('n_trials = 2', 'n_trials = "two"'), "n_trials='two' is invalid"),
    (('workload = "linreg"', 'workload = 3'), "workload=3 has the wrong type"),
    (('grow_threshold = { low = 1.2, high = 3.0 }', 'grow_threshold = { low = 3.0, high = 1.2 }'),
     "low=3.0 is above high=1.2"),
    (('cooldown_samples = { low = 0, high = 2000 }', 'cooldown_samples = { low = 0, high = 2000, log = true }'),
     "log=true needs low > 0"),
    (('lr_rule = { choices = ["linear", "sqrt"] }', 'lr_rule = { choices = [] }'), "choices must be a non-empty"),
    (('lr_rule = { choices = ["linear", "sqrt"] }', 'lr_rule = { choices = ["linear", "cubic"] }'),
     "lr_rule: 'cubic' cannot be used"),
    (('grow_threshold = { low = 1.2, high = 3.0 }', 'grow_threshold = { low = 0.5, high = 3.0 }'),
     "accepted a number > 1"),
    (('grow_threshold = { low = 1.2, high = 3.0 }', 'grow_thresold = { low = 1.2, high = 3.0 }'),
     "unknown ControllerConfig field(s) grow_thresold"),
    (('max_batch = 128', 'max_bach = 128'), "[fixed]: unknown ControllerConfig field(s) max_bach"),
    (('max_batch = 128', 'max_batch = -1'), "ControllerConfig.max_batch=-1 is invalid"),
    (('workload = "linreg"', 'workload = "imagenet"'), "unknown workload 'imagenet'"),
    (('workload = "linreg"', 'workload = "no_such_module_xyz:fn"'), "cannot load workload"),
    (('n_trials = 2', 'n_trials = 2\nobjectives = ["accuracy"]'), "objectives: unknown 'accuracy'"),
    (('n_trials = 2', 'n_trials = 2\nobjectives = ["metric", "seconds"]\npruner = "median"'),
     "cannot prune multi-objective"),
    (('n_trials = 2', 'n_trials = 2\nobjectives = ["seconds"]\npruner = "median"'), "must be metric or best_metric"),
    (('n_trials = 2', 'n_trials = 2\nsampler = "grid"'), "sampler='grid' is invalid"),
    (('max_batch = 128', 'max_batch = 128\ngrow_threshold = 2.0'), "appear in both [fixed] and [search]"),
    (('heartbeat_interval = 1', 'heartbeat_interval = 0'), "heartbeat_interval=0 is invalid"),
    (('grace_period = 3', 'grace_period = 1'), "grace_period=1 must exceed heartbeat_interval=1"),
    (('n_trials = 2', 'n_trials = 2\nseed = -1'), "seed=-1 is invalid"),
    (('n_trials = 2', 'n_trials = 2\nseed = 4294967296'), "seed=4294967296 is invalid"),
    (('n_trials = 2', 'n_trials = 2\ntarget = nan'), "target=nan must be a finite number"),
    (('name = "tiny"', 'name = "ti\\u0007ny"'), "contains control characters"),
    (('lr_rule = { choices = ["linear", "sqrt"] }', 'lr_rule = { choices = ["linear", "linear"] }'),
     "lists a value twice"),
    (('lr_rule = { choices = ["linear", "sqrt"] }', 'lr_rule = { choices = [{ rule = "linear" }] }'),
     "must be a string, number or true/false"),
    (('cooldown_samples = { low = 0, high = 2000 }', 'cooldown_samples = { low = 0, high = 2000, step = 3 }'),
     "is not a multiple of step=3; set high = 1998"),
    (('grow_threshold = { low = 1.2, high = 3.0 }', 'grow_threshold = { low = 1.2, high = 3.0, step = 0.25 }'),
     "is not a multiple of step=0.25; set high = 2.95"),
])
def test_schema_errors_name_the_problem(change, message):
    old, new = change
    assert old in TINY
    with pytest.raises(StudySpecError) as err:
        spec_from(TINY.replace(old, new, 1))
    assert message in str(err.value)


@pytest.mark.parametrize("pruner, table, message", [
    ("median", "percentile = 50.0", 'percentile do not apply; accepted for pruner = "median"'),
    ("none", "startup_trials = 3", 'pruner = "none" takes no settings'),
    ("median", "interval_samples = 300", "interval_samples=300 must be a multiple of eval_every=400"),
    ("percentile", "percentile = 100", "percentile=100 is invalid"),
    ("median", "warmup_samples = -1", "warmup_samples=-1 is invalid"),
    ("hyperband", "min_samples = 800", "min_samples=800 must be below the sample budget 800"),
])
def test_pruner_settings_are_checked_against_the_pruner(pruner, table, message):
    text = TINY.replace("n_trials = 2", f'n_trials = 2\npruner = "{pruner}"') + f"\n[pruner]\n{table}\n"
    with pytest.raises(StudySpecError) as err:
        spec_from(text)
    assert message in str(err.value)


def test_a_search_box_with_an_invalid_corner_is_rejected_before_any_trial():
    # Each bound is valid alone, but min_batch=256 with max_batch=128 is not a config.
    text = TINY.replace("max_batch = 128", "").replace(
        "cooldown_samples = { low = 0, high = 2000 }", "min_batch = { low = 8, high = 256 }\nmax_batch = { low = 128, high = 512 }")
    with pytest.raises(StudySpecError, match=r"the combination .*min_batch=256, max_batch=128.* is invalid"):
        spec_from(text)


def test_empty_search_space_is_rejected():
    text = TINY.split("[search]")[0]
    with pytest.raises(StudySpecError, match=r"\[search\] is empty"):
        spec_from(text)


def test_bad_toml_and_missing_file_name_the_path(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\nname=")
    with pytest.raises(StudySpecError, match="bad.toml is not valid TOML"):
        StudySpec.from_toml(bad)
    with pytest.raises(StudySpecError, match="no study file at"):
        StudySpec.from_toml(tmp_path / "missing.toml")


def test_trials_return_objectives_and_store_run_facts(tmp_path):
    spec = spec_from(TINY.replace('n_trials = 2', 'n_trials = 2\nobjectives = ["metric", "seconds", "energy"]'))
    study = run_study(spec, url_in(tmp_path), progress=False)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE", "MINIMIZE"]
    assert len(study.trials) == 2
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        metric, seconds, energy = t.values
        assert metric == pytest.approx(t.user_attrs["final_metric"])
        assert seconds == pytest.approx(t.user_attrs["wall_seconds"]) and seconds > 0
        assert t.user_attrs["samples"] >= 800
        assert energy == pytest.approx(t.user_attrs["energy_j"])
        # No RAPL/NVML here means a CPU-time estimate, and it must say so.
        if not t.user_attrs["energy_measured"]:
            assert t.user_attrs["energy_kind"] == "estimate"
            assert t.user_attrs["energy_source"].startswith("estimate")
        cfg = ControllerConfig.from_dict(t.user_attrs["config"])
        assert cfg.max_batch == 128 and cfg.grow_threshold == t.params["grow_threshold"]


def test_seeds_per_trial_reports_the_mean_of_one_run_per_seed_and_prunes_seed_by_seed(tmp_path):
    from adabatch.workloads import train

    text = TINY.replace("n_trials = 2", 'n_trials = 1\nseeds_per_trial = 3\nseed = 5\npruner = "median"')
    spec = spec_from(text)
    assert spec.trial_seeds() == [5, 6, 7] and spec.normalised()["study"]["seeds_per_trial"] == 3
    # One seed per trial is the old study: the fingerprint of a file without the key is unchanged.
    assert "seeds_per_trial" not in spec_from(TINY).normalised()["study"]
    trial = run_study(spec, url_in(tmp_path), progress=False).trials[0]
    config = ControllerConfig.from_dict(trial.user_attrs["config"])
    alone = [train("linreg", config, seed=s, sample_budget=800, eval_every=400).final_metric for s in (5, 6, 7)]
    assert trial.user_attrs["seed_metrics"] == pytest.approx(alone)
    assert trial.value == pytest.approx(sum(alone) / 3) == pytest.approx(trial.user_attrs["final_metric"])
    # The k-th seed reports at k x budget + samples, so every trial's k-th run meets the same pruner steps.
    assert sorted(trial.intermediate_values) == [400, 800, 1200, 1600, 2000, 2400]
    assert [trial.intermediate_values[k] for k in (800, 1600, 2400)] == pytest.approx(alone)
    with pytest.raises(StudySpecError, match="seeds_per_trial=0 is invalid"):
        spec_from(TINY.replace("n_trials = 2", "n_trials = 2\nseeds_per_trial = 0"))


def test_a_rerun_finishes_the_study_to_n_trials_and_n_trials_asks_for_more(tmp_path):
    spec, url = spec_from(TINY), url_in(tmp_path)  # n_trials = 2
    run_study(spec, url, n_trials=1, progress=False)
    assert len(run_study(spec, url, progress=False).trials) == 2  # finished, not 1 + 2
    assert len(run_study(spec, url, progress=False).trials) == 2  # nothing left to do
    # n_trials is no part of the fingerprint: raising it in the file finishes the larger study.
    assert len(run_study(dataclasses.replace(spec, n_trials=3), url, progress=False).trials) == 3
    assert [t.number for t in run_study(spec, url, n_trials=2, progress=False).trials] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_the_file_seed_gives_trial_zero_the_same_parameters_in_every_run(tmp_path, sampler):
    text = TINY.replace("n_trials = 2", f'n_trials = 2\nsampler = "{sampler}"\npopulation_size = 4')
    if sampler == "tpe":
        text = text.replace("population_size = 4", "")
    runs = [run_study(spec_from(text), f"sqlite:///{tmp_path / f'{i}.db'}", progress=False).trials for i in range(2)]
    assert [t.params for t in runs[0]] == [t.params for t in runs[1]]
    reseeded = spec_from(text.replace("n_trials = 2", "n_trials = 2\nseed = 1"))
    other = run_study(reseeded, f"sqlite:///{tmp_path / 'other.db'}", n_trials=1, progress=False).trials
    assert other[0].params != runs[0][0].params


@pytest.mark.parametrize("old, new, named", [
    ("max_batch = 128", "max_batch = 256", "[fixed] max_batch: 128 -> 256"),
    ("sample_budget = 800", "sample_budget = 1200", "[study] sample_budget: 800 -> 1200"),
    ('lr_rule = { choices = ["linear", "sqrt"] }', 'lr_rule = { choices = ["sqrt", "none"] }',
     '[search] lr_rule: {choices = ["linear", "sqrt"]} -> {choices = ["sqrt", "none"]}'),
    ('lr_rule = { choices = ["linear", "sqrt"] }', "", '[search] lr_rule: {choices = ["linear", "sqrt"]} -> (absent)'),
    ("n_trials = 2", 'n_trials = 2\npruner = "median"', '[pruner] kind: "none" -> "median"'),
])
def test_a_changed_study_file_is_refused_naming_each_change_and_nothing_is_mixed(tmp_path, old, new, named):
    url = url_in(tmp_path)
    run_study(spec_from(TINY), url, n_trials=1, progress=False)
    changed = spec_from(TINY.replace(old, new))
    with pytest.raises(StudySpecError) as err:
        run_study(changed, url, progress=False)
    assert named in str(err.value) and "--study-name NEW" in str(err.value)
    study = load_study("tiny", url)
    assert [t.state for t in study.trials] == [States.COMPLETE]  # no trial added, none failed
    assert study.user_attrs[SPEC_ATTR] == spec_from(TINY).normalised()  # the stored settings are the first file's
    assert len(run_study(changed, url, study_name="tiny-2", n_trials=1, progress=False).trials) == 1


def test_n_trials_and_reliability_may_change_and_equal_numbers_fingerprint_alike(tmp_path):
    url = url_in(tmp_path)
    run_study(spec_from(TINY), url, n_trials=1, progress=False)
    relaxed = TINY.replace("heartbeat_interval = 1", "heartbeat_interval = 2").replace("grace_period = 3",
                                                                                      "grace_period = 9")
    relaxed = relaxed.replace("high = 3.0 }", "high = 3 }")  # 3 and 3.0 are the same bound
    study = run_study(spec_from(relaxed.replace("n_trials = 2", "n_trials = 3")), url, progress=False)
    assert len(study.trials) == 3
    assert study.user_attrs["adabatch_run"]["grace_period"] == 9
    assert study.user_attrs[FINGERPRINT_ATTR] == spec_from(TINY).fingerprint()


def test_an_in_memory_database_is_refused_before_anything_runs():
    with pytest.raises(StorageError, match="in-memory database"):
        run_study(spec_from(TINY), "sqlite://", progress=False)


def test_resuming_with_other_objectives_is_rejected(tmp_path):
    run_study(spec_from(TINY), url_in(tmp_path), n_trials=1, progress=False)
    other = spec_from(TINY.replace('n_trials = 2', 'n_trials = 2\nobjectives = ["metric", "seconds"]'))
    with pytest.raises(StudySpecError, match="already exists with directions"):
        run_study(other, url_in(tmp_path), n_trials=1, progress=False)


def test_unreachable_target_makes_every_trial_infeasible(tmp_path):
    # linreg's validation loss cannot fall below sigma^2 / 2 = 2, so target 0.1 is never reached.
    text = TINY.replace('n_trials = 2', 'n_trials = 2\nrequire_target = true\ntarget = 0.1\n'
                        'objectives = ["metric", "seconds"]')
    study = run_study(spec_from(text), url_in(tmp_path), progress=False)
    assert all(t.user_attrs["constraint"][0] > 0 for t in study.trials)
    assert best_trials(study) == []
    with pytest.raises(StudySpecError, match="no completed feasible trial"):
        export_config(study, tmp_path / "c.json")


def test_single_objective_reports_intermediate_metric_for_pruning(tmp_path):
    text = TINY.replace('n_trials = 2', 'n_trials = 5\npruner = "median"')
    study = run_study(spec_from(text), url_in(tmp_path), progress=False)
    for t in study.trials:
        assert sorted(t.intermediate_values) == [400, 800][:len(t.intermediate_values)]
        assert all(math.isfinite(v) for v in t.intermediate_values.values())


def test_a_trial_that_ran_its_whole_budget_keeps_its_value_under_the_harshest_pruner(tmp_path):
    # Keep only the top 1 %, from the first trial on: every report but the one at the end of the
    # budget would prune. With a single evaluation, at the end, every trial must complete.
    text = TINY.replace("n_trials = 2", 'n_trials = 4\npruner = "percentile"').replace(
        "eval_every = 400", "eval_every = 800") + "\n[pruner]\npercentile = 1.0\nstartup_trials = 0\nwarmup_samples = 0\n"
    study = run_study(spec_from(text), url_in(tmp_path), progress=False)
    assert [t.state for t in study.trials] == [States.COMPLETE] * 4
    for t in study.trials:
        assert t.value == pytest.approx(t.intermediate_values[800]) == pytest.approx(t.user_attrs["final_metric"])


def test_the_pruner_prunes_only_after_the_files_startup_trials_and_warmup():
    spec = spec_from(TINY.replace("n_trials = 2", 'n_trials = 2\npruner = "median"').replace(
        "sample_budget = 800", "sample_budget = 1600") + "\n[pruner]\nstartup_trials = 2\nwarmup_samples = 800\n")
    study = optuna.create_study(direction="minimize", pruner=make_pruner(spec))
    curve = {400: 3.0, 800: 2.5, 1200: 2.3, 1600: 2.2}
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def bad_trial_pruned_at(step: int) -> bool:
        trial = study.ask(dist)
        trial.report(9.0, step)  # far worse than every completed trial
        pruned = trial.should_prune()
        study.tell(trial, state=States.FAIL)
        return pruned

    study.add_trial(optuna.create_trial(params={"x": 0.5}, distributions=dist, value=2.2, intermediate_values=curve))
    assert not bad_trial_pruned_at(1200)  # one completed trial: still starting up
    study.add_trial(optuna.create_trial(params={"x": 0.4}, distributions=dist, value=2.2, intermediate_values=curve))
    assert not bad_trial_pruned_at(400)  # in the warm-up
    assert bad_trial_pruned_at(800) and bad_trial_pruned_at(1200)


def test_opening_a_study_fails_its_stale_trials_and_queues_their_retries(tmp_path):
    url, spec = url_in(tmp_path), spec_from(TINY)  # heartbeat every 1 s, grace 3 s
    open_study(spec, url)
    # A worker that claimed two trials and died: one after its first heartbeat, one before.
    rdb = open_optuna_storage(url)
    dead = optuna.load_study(study_name="tiny", storage=rdb)
    beat = dead.ask()
    rdb.record_heartbeat(beat._trial_id)
    silent = dead.ask()
    assert not load_study("tiny", url).trials[0].state.is_finished()  # within the grace period: left alone
    time.sleep(3 + 1 + 0.5)  # grace + heartbeat interval + slack
    notices = []
    study = load_study("tiny", url, notify=notices.append)
    by_number = {t.number: t for t in study.trials}
    assert by_number[beat.number].state == by_number[silent.number].state == States.FAIL
    retries = sorted(retried_trial_number(t) for t in study.trials if t.state == States.WAITING)
    assert retries == [beat.number, silent.number]
    assert len(notices) == 1 and "failed 2 stale trial(s)" in notices[0]
    # A run then finishes the study: two originals, their retries run, nothing left RUNNING or WAITING.
    study = run_study(spec, url, progress=False)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]


def test_user_workload_given_as_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_workloads.py").write_text(textwrap.dedent("""
        import dataclasses
        from adabatch.workloads import WORKLOADS

        def small():
            return dataclasses.replace(WORKLOADS["linreg"], name="my-linreg", micro_batch=8)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    study = run_study(spec_from(TINY.replace('"linreg"', '"my_workloads:small"')), url_in(tmp_path),
                      n_trials=1, progress=False)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert study.trials[0].user_attrs["metric_name"] == "val_loss"


def test_export_writes_a_config_the_controller_loads(tmp_path):
    import torch

    from adabatch import AdaptiveBatchController

    study = run_study(spec_from(TINY), url_in(tmp_path), progress=False)
    trial, path = export_config(load_study("tiny", url_in(tmp_path)), tmp_path / "best.json")
    cfg = ControllerConfig.load(path)
    assert cfg.cooldown_samples == trial.params["cooldown_samples"] and cfg.max_batch == 128
    model = torch.nn.Linear(4, 1)
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=16,
                                  config=cfg)
    assert ctl.config == cfg
    assert trial.number in {t.number for t in study.trials}
