"""Study files, their validation, and the trial runner (in-process, on the linreg workload)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import optuna
import pytest

from adabatch.study import (
    StudySpec,
    StudySpecError,
    best_trials,
    export_config,
    load_study,
    run_study,
)
from adabatch import ControllerConfig

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
cooldown_steps = { low = 0, high = 20 }
lr_rule = { choices = ["linear", "sqrt"] }
"""


def spec_from(text: str) -> StudySpec:
    import tomllib

    return StudySpec.from_dict(tomllib.loads(text))


def url_in(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def test_shipped_study_files_are_valid():
    specs = {p.name: StudySpec.from_toml(p) for p in sorted((ROOT / "studies").glob("*.toml"))}
    assert {"mnist1d_quick.toml", "mnist1d_multiobjective.toml"} <= set(specs)
    assert any(s.workload == "charlm" for s in specs.values())
    quick = specs["mnist1d_quick.toml"]
    assert quick.directions() == ["maximize"] and quick.pruner != "none"
    multi = specs["mnist1d_multiobjective.toml"]
    assert len(multi.directions()) == 3 and "energy" in multi.objectives and multi.require_target
    assert multi.pruner == "none"


@pytest.mark.parametrize("change, message", [
    (("[study]", "[study]\ncolour = 'red'"), "unknown key(s) colour"),
    (('n_trials = 2', 'n_trials = "two"'), "n_trials='two' is invalid"),
    (('workload = "linreg"', 'workload = 3'), "workload=3 has the wrong type"),
    (('grow_threshold = { low = 1.2, high = 3.0 }', 'grow_threshold = { low = 3.0, high = 1.2 }'),
     "low=3.0 is above high=1.2"),
    (('cooldown_steps = { low = 0, high = 20 }', 'cooldown_steps = { low = 0, high = 20, log = true }'),
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
])
def test_schema_errors_name_the_problem(change, message):
    old, new = change
    assert old in TINY
    with pytest.raises(StudySpecError) as err:
        spec_from(TINY.replace(old, new, 1))
    assert message in str(err.value)


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


def test_resume_adds_trials_to_the_same_study(tmp_path):
    spec = spec_from(TINY)
    run_study(spec, url_in(tmp_path), n_trials=1, progress=False)
    study = run_study(spec, url_in(tmp_path), n_trials=2, progress=False)
    assert [t.number for t in study.trials] == [0, 1, 2]


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
    assert cfg.cooldown_steps == trial.params["cooldown_steps"] and cfg.max_batch == 128
    model = torch.nn.Linear(4, 1)
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=16,
                                  config=cfg)
    assert ctl.config == cfg
    assert trial.number in {t.number for t in study.trials}
