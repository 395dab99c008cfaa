"""The Python API: the README's notebook example run as it stands on a real tiny sweep, and refusals that match the CLI's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_dataset
from sweeps import write_space

import asl_tune
from asl_tune.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_blocks() -> list[str]:
    """The ```python blocks of the README's "Python API (notebooks)" section, in order."""
    section = README.read_text().split("## Python API (notebooks)\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.timeout(600)
def test_the_readme_example_runs_as_written(tmp_path):
    settings, example = readme_blocks()
    names: dict = {}
    exec(settings, names)  # the README's own settings are valid Python naming what the example reads
    assert {"space", "data", "results"} <= set(names)
    space = write_space(
        tmp_path / "tiny.yaml",
        1,
        params={"head_width": {"type": "categorical", "choices": [16, 24]}},
        fixed={"epochs": 1},
        early_stopping=False,
    )
    names.update(space=str(space), data=str(make_dataset(tmp_path / "data", per_class=16, size=32)), results=str(tmp_path / "results"))
    exec(example, names)

    run, tables, found = names["run"], names["tables"], names["found"]
    assert run == asl_tune.Sweep("notebook", names["results"], tmp_path / "results" / "notebook")
    assert len(tables.trials) == 1 and set(tables.trials["status"]) == {"completed"}
    assert len(tables.epochs) == 1 and set(tables.per_class["trial_id"]) == set(tables.confusion["trial_id"]) == set(
        tables.trials["trial_id"]
    )
    assert list(found.front["trial_id"]) == list(tables.trials["trial_id"]) == [names["best"]]
    assert found.report == run.folder / "report" / "report.md" and found.report.exists()
    assert type(found.figures["pareto"]).__name__ == "Figure" and (run.folder / "report" / "pareto.png").exists()
    assert len(names["guesses"]) == 10 and set(names["guesses"]) <= set(names["net"].classes)


@pytest.mark.parametrize(
    "call, argv",
    [
        (lambda tmp: asl_tune.sweep(extend=True, results=tmp), ["sweep", "--extend"]),
        (lambda tmp: asl_tune.sweep(num_samples=0, results=tmp), ["sweep", "--num-samples", "0"]),
        (lambda tmp: asl_tune.sweep(space="no-such-space", results=tmp), ["sweep", "--space", "no-such-space"]),
        (lambda tmp: asl_tune.resume("nope", results=tmp), ["resume", "nope"]),
        (lambda tmp: asl_tune.load("nope", results=tmp), ["analyze", "nope"]),
        (lambda tmp: asl_tune.analyze("nope", results=tmp, objectives="speed:max"), ["analyze", "nope", "--objectives", "speed:max"]),
        (lambda tmp: asl_tune.analyze(["nope"], results=tmp, speed_on="gpu"), ["analyze", "nope", "--speed-on", "gpu"]),
    ],
)
def test_the_api_refuses_with_the_commands_one_line_message(call, argv, tmp_path, capsys):
    with pytest.raises(asl_tune.AslTuneError) as refused:
        call(str(tmp_path))
    assert main([*argv, "--results", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"asl-tune: error: {refused.value}"
    assert "\n" not in str(refused.value) and list(tmp_path.iterdir()) == []  # nothing created


def test_objectives_as_pairs_are_checked_as_the_option_is(tmp_path):
    with pytest.raises(asl_tune.AslTuneError, match=r"^--objectives: must be known metric:max\|min pairs, got val_accuracy:max$"):
        asl_tune.analyze("nope", results=tmp_path, objectives=["val_accuracy:max"])
    with pytest.raises(asl_tune.AslTuneError, match=r"^--objectives: must be known metric:max\|min pairs, got speed:max$"):
        asl_tune.analyze("nope", results=tmp_path, objectives=[("speed", "max")])


def test_load_trained_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    with pytest.raises(asl_tune.AslTuneError, match=r"none: not a readable checkpoint \(FileNotFoundError"):
        asl_tune.load_trained(tmp_path / "none")


def test_import_is_light_and_sweep_stays_callable_once_the_wing_is_imported():
    script = """
import sys
import asl_tune
heavy = sorted({"ray", "optuna", "torch", "pandas", "matplotlib"} & set(sys.modules))
assert not heavy, heavy
assert callable(asl_tune.sweep) and asl_tune.sweep.__name__ == "asl_tune.sweep"
import asl_tune.sweep.run  # binds asl_tune.sweep to the package, as any import of the wing does
try:
    asl_tune.sweep(extend=True)
except asl_tune.AslTuneError as e:
    print(e)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "--extend: needs --name, the sweep to add trials to"
