"""The ``adabatch`` command end to end: run, resume, best, export, plot, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest

from adabatch.cli import main

STUDY = textwrap.dedent("""
    [study]
    name = "cli-tiny"
    workload = "linreg"
    n_trials = 3
    sample_budget = 800
    eval_every = 400

    [fixed]
    max_batch = 128

    [search]
    grow_threshold = { low = 1.2, high = 3.0 }
    target_factor = { low = 0.1, high = 2.0, log = true }
    lr_rule = { choices = ["linear", "sqrt"] }
""")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(STUDY)
    return tmp_path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_run_resume_best_export_plot_on_the_default_sqlite_file(workdir, capsys):
    import torch

    from adabatch import AdaptiveBatchController, ControllerConfig

    assert main(["study", "run", "tiny.toml", "--no-progress"]) == 0
    assert (workdir / "adabatch.db").exists()  # the default storage needs no server
    assert main(["study", "run", "tiny.toml", "--n-trials", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "'cli-tiny': 5 trials in total" in out  # the second run resumed the same study

    assert main(["study", "list"]) == 0
    assert "cli-tiny" in capsys.readouterr().out
    assert main(["study", "best", "cli-tiny"]) == 0
    best_line = capsys.readouterr().out.strip()
    assert best_line.startswith("trial ") and "val_loss=" in best_line
    best_number = int(best_line.split()[1])

    assert main(["study", "export", "cli-tiny", "-o", "best.json"]) == 0
    cfg = ControllerConfig.load(workdir / "best.json")
    assert cfg.max_batch == 128 and cfg.lr_rule in ("linear", "sqrt")
    model = torch.nn.Linear(32, 1)
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.01), micro_batch_size=16,
                                  config=cfg)
    assert ctl.config.grow_threshold == cfg.grow_threshold

    assert main(["study", "export", "cli-tiny", "--trial", "0", "-o", "t0.json"]) == 0
    assert ControllerConfig.load(workdir / "t0.json").max_batch == 128

    assert main(["study", "plot", "cli-tiny", "-o", "report"]) == 0
    report = workdir / "report"
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert "history.png" in pngs and "importances.png" in pngs and f"trial_{best_number}.png" in pngs
    page = (report / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(pngs)  # self-contained: images embedded

    assert main(["study", "show", "cli-tiny"]) == 0
    assert capsys.readouterr().out.count("COMPLETE") == 5


def test_multiobjective_best_lists_the_front_and_export_needs_a_trial(workdir, capsys):
    text = STUDY.replace('n_trials = 3', 'n_trials = 3\nobjectives = ["metric", "seconds"]\nsampler = "nsga2"')
    (workdir / "multi.toml").write_text(text)
    assert main(["study", "run", "multi.toml", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["study", "best", "cli-tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Pareto front of 'cli-tiny'")
    front = [line for line in out.splitlines() if line.startswith("  trial ")]
    if len(front) > 1:
        assert main(["study", "export", "cli-tiny", "-o", "c.json"]) == 2
        assert "--trial N" in one_error_line(capsys)
    first = front[0].split()[1]
    assert main(["study", "export", "cli-tiny", "--trial", first, "-o", "c.json"]) == 0
    assert main(["study", "plot", "cli-tiny", "-o", "r"]) == 0
    assert (workdir / "r" / "pareto_front.png").exists() and (workdir / "r" / "index.html").exists()


@pytest.mark.parametrize("argv, expected", [
    (["study", "run", "missing.toml"], "no study file at missing.toml"),
    (["study", "run", "broken.toml"], "broken.toml is not valid TOML"),
    (["study", "run", "bad_schema.toml"], "low=3.0 is above high=1.2"),
    (["study", "show", "nope"], "no study 'nope'"),
    (["study", "best", "nope", "--storage", "postgresql+psycopg://nobody@127.0.0.1:1/x"], "cannot reach database"),
    (["study", "list", "--storage", "definitely not a url"], "is not a database URL"),
    (["study", "export", "nope"], "the following arguments are required: -o/--output"),
    (["study", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["study", "run", "tiny.toml", "--n-trials", "0"], "0 must be >= 1"),
])
def test_bad_input_exits_2_with_one_line(workdir, capsys, argv, expected):
    (workdir / "broken.toml").write_text("[study\n")
    (workdir / "bad_schema.toml").write_text(STUDY.replace("low = 1.2, high = 3.0", "low = 3.0, high = 1.2"))
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    line = one_error_line(capsys)
    assert line.startswith("adabatch") and expected in line


def test_console_script_reports_an_unreachable_database_in_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "adabatch.cli", "study", "list", "--storage",
                           "postgresql+psycopg://nobody@127.0.0.1:1/x"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot reach database" in proc.stderr


def test_help_explains_storage_and_the_pruning_limit(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["study", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "adabatch.db" in text and "postgresql+psycopg" in text
    assert "cannot prune multi-objective" in " ".join(text.split())
    with pytest.raises(SystemExit):
        main(["study", "run", "--help"])
    assert "cannot prune multi-objective" in " ".join(capsys.readouterr().out.split())


def test_demo_subcommand_hands_its_arguments_to_the_demo_module(monkeypatch):
    seen = {}
    fake = types.ModuleType("adabatch.demo")
    fake.add_arguments = lambda parser: parser.add_argument("--steps", type=int, default=1)
    fake.run = lambda args: seen.setdefault("steps", args.steps) and 0
    monkeypatch.setitem(sys.modules, "adabatch.demo", fake)
    import adabatch

    monkeypatch.setattr(adabatch, "demo", fake, raising=False)
    assert main(["demo", "--steps", "7"]) == 0
    assert seen == {"steps": 7}
