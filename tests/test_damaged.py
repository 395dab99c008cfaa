"""A damaged sweep folder: resume, --extend and analyze refuse it in one line naming the file, exit 2, and leave
every byte of the folder as it was; where the command does not need the damaged piece, it goes on and says so.

One real tiny sweep is run once for the module; each case damages a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import make_dataset
from sweeps import run_cli, write_space

from asl_tune.cli import main
from asl_tune.results import ResultsStore, read_trials
from asl_tune.sweep.integrity import _at


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-trial sweep `whole` (1 epoch each, 32 px) in <tmp>/results/whole."""
    root = tmp_path_factory.mktemp("damaged")
    data = make_dataset(root / "data", per_class=8)
    space = write_space(
        root / "whole.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 1},
        early_stopping=False,
    )
    run_cli(["sweep", "--space", str(space), "--data", str(data), "--results", str(root / "results")], root, 300)
    return root / "results" / "whole"


def digest(folder: Path) -> dict[str, str]:
    """Every file under folder (the lock file aside) and a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def interrupted(folder: Path) -> None:
    """Mark the sweep's last run unfinished, as a driver killed mid-run leaves it."""
    record = json.loads((folder / "sweep.json").read_text())
    record["runs"][-1]["finished"] = False
    (folder / "sweep.json").write_text(json.dumps(record))


def a_part(folder: Path, table: str) -> Path:
    """One file of a table: a part of its folder, or the table's one file in the older layout."""
    path = folder / table
    return (
        sorted(p for p in path.glob("*.parquet") if p.name != "schema.parquet")[0] if path.is_dir() else path
    )  # a sealed part once compacted


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def running_without_checkpoint(folder: Path) -> None:
    """A trial that resume would continue (running) whose checkpoint folder is gone."""
    trials = read_trials(folder)
    tid = trials["trial_id"].iloc[0]
    shutil.rmtree(_at(folder, trials["checkpoint"].iloc[0]))
    store = ResultsStore(folder)
    store.put_trial({"trial_id": tid, "status": "running"})
    store.flush()


def garble_journal(path: Path) -> None:
    """A line in the middle of the study's journal overwritten (a last line cut short is what a kill leaves: not damage)."""
    lines = path.read_bytes().splitlines(keepends=True)
    lines[len(lines) // 2] = b"not a journal entry\n"
    path.write_bytes(b"".join(lines))


def legacy_garbage(folder: Path) -> None:
    """A sweep made before study.log, whose study.db is garbage."""
    (folder / "study.log").unlink()
    (folder / "study.db").write_bytes(b"not a database " * 64)


DAMAGE = {
    "sweep.json truncated": (lambda f: (f / "sweep.json").write_text((f / "sweep.json").read_text()[:40]), "sweep.json"),
    "space.yaml invalid": (lambda f: (f / "space.yaml").write_text("name: whole\nnum_samples: -3\nparams: {}\n"), "space.yaml"),
    "study.log garbage": (lambda f: garble_journal(f / "study.log"), "study.log"),
    "study.db garbage (made before study.log)": (lambda f: legacy_garbage(f), "study.db"),
    "a Parquet file truncated": (lambda f: truncate(a_part(f, "epochs.parquet")), "epochs.parquet"),
    "ray/run-1 deleted": (lambda f: shutil.rmtree(f / "ray" / "run-1"), "ray/run-1"),
    "a continued trial's checkpoint missing": (running_without_checkpoint, "checkpoint_"),
}
REFUSED = (
    [("resume", d) for d in DAMAGE]
    + [
        ("extend", d)
        for d in (
            "sweep.json truncated",
            "space.yaml invalid",
            "study.log garbage",
            "study.db garbage (made before study.log)",
            "a Parquet file truncated",
        )
    ]
    + [("analyze", "a Parquet file truncated")]
)


def command(verb: str, results: Path) -> list[str]:
    flag = ["--results", str(results)]
    return {
        "resume": ["resume", "whole", *flag],
        "extend": ["sweep", "--name", "whole", "--extend", "--num-samples", "1", *flag],
        "analyze": ["analyze", "whole", *flag],
    }[verb]


@pytest.mark.slow
@pytest.mark.parametrize("verb, damage", REFUSED, ids=[f"{v}: {d}" for v, d in REFUSED])
def test_a_damaged_sweep_folder_is_refused_in_one_line_and_left_byte_for_byte(finished, tmp_path, capsys, verb, damage):
    folder = tmp_path / "results" / "whole"
    shutil.copytree(finished, folder)
    if verb == "resume":
        interrupted(folder)
    harm, named = DAMAGE[damage]
    harm(folder)
    before = digest(folder)
    capsys.readouterr()

    assert main(command(verb, tmp_path / "results")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("asl-tune: error: ") and named in err, err
    assert digest(folder) == before


@pytest.mark.slow
def test_resume_of_a_finished_sweep_says_so_and_succeeds_running_and_changing_nothing(finished, tmp_path, capsys):
    """Not damage, the whole sweep: a retry loop, or a requeued Slurm job, runs `resume` whatever became of the last
    driver (killed after the sweep finished, before it exited): on a finished sweep that is a success in one line."""
    folder = tmp_path / "results" / "whole"
    shutil.copytree(finished, folder)

    def times() -> dict[str, int]:
        return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}

    before, made = digest(folder), times()
    capsys.readouterr()

    assert main(command("resume", tmp_path / "results")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    extend = f"asl-tune sweep --name whole --extend --num-samples K --results {tmp_path / 'results'}"
    assert err == [f"sweep 'whole' has nothing to resume: all 2 trials finished; add trials with `{extend}`"]
    assert digest(folder) == before  # every byte as it was
    assert times() == made  # nothing written or made, not even the lock


@pytest.mark.slow
def test_analyze_goes_on_without_what_it_does_not_need_and_names_it(finished, tmp_path, capsys):
    """analyze reads only the Parquet tables: a garbage study, a broken sweep record and a finished trial's missing
    weights are each named in a note, and the report is written."""
    folder = tmp_path / "results" / "whole"
    shutil.copytree(finished, folder)
    DAMAGE["study.log garbage"][0](folder)
    DAMAGE["sweep.json truncated"][0](folder)
    trials = read_trials(folder)
    gone = _at(folder, trials["checkpoint"].iloc[0])
    shutil.rmtree(gone)
    capsys.readouterr()

    assert (
        main([*command("analyze", tmp_path / "results"), "--speed-on", "training"]) == 0
    )  # no speed to time alone: the notes are the point
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("asl-tune: note: ")]
    assert any("study.log" in n and "goes on" in n for n in notes), notes
    assert any("sweep.json" in n for n in notes), notes
    assert any(str(gone) in n and "weights cannot be loaded" in n for n in notes), notes
    assert (folder / "report" / "report.md").is_file()


@pytest.mark.slow
def test_a_sweep_made_before_study_log_is_extended_in_its_sqlite_study(finished, tmp_path):
    """The older layout: the study in study.db (SQLite), no study.log. --extend learns from it and grows it there,
    and writes no study.log beside it (the same study, copied into SQLite with Optuna's own copy_study)."""
    import optuna
    from sweeps import load_study

    from asl_tune.sweep.study import sqlite_url

    folder = tmp_path / "results" / "whole"
    shutil.copytree(finished, folder)
    journal = load_study(folder)
    optuna.copy_study(from_study_name="whole", from_storage=journal._storage, to_storage=sqlite_url(folder / "study.db"))
    (folder / "study.log").unlink()
    assert main(command("extend", tmp_path / "results")) == 0
    assert not (folder / "study.log").exists()
    study = optuna.load_study(study_name="whole", storage=sqlite_url(folder / "study.db"))
    assert len(study.trials) == 3 and {t.state.name for t in study.trials} == {"COMPLETE"}
    assert len(read_trials(folder)) == 3
