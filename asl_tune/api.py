"""The Python API: what `asl-tune sweep`, `resume` and `analyze` do, as functions a notebook calls.

    import asl_tune
    run = asl_tune.sweep(space="cpu-quick", results="results")   # the sweep's handle once it ends
    tables = run.load()                                           # trials, epochs, confusion, per_class
    found = run.analyze(objectives="val_accuracy:max,n_parameters:min")
    found.front, found.summary, found.figures["pareto"]

Keywords are named as the commands' options (--num-samples: num_samples) and default as they do. A refusal
raises AslTuneError with the command's one-line message; a sweep stopped by a signal raises its subclass
Stopped. The wings (asl_tune.sweep: Ray and Optuna; asl_tune.analysis) and torch are imported inside the
functions, so `import asl_tune` stays light. `asl-tune` (cli.py) parses arguments, calls these and prints.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

from asl_tune.errors import AslTuneError

if TYPE_CHECKING:
    import pandas as pd

    from asl_tune.analysis.report import Analysis
    from asl_tune.train import Trained


class Results(NamedTuple):
    """A sweep's four tables, as results/README.md describes their columns."""

    trials: pd.DataFrame  # a row per trial: status, metrics, params_* settings, checkpoint
    epochs: pd.DataFrame  # a row per (trial_id, epoch)
    confusion: pd.DataFrame  # test-split counts per (trial_id, true_label, pred_label)
    per_class: pd.DataFrame  # precision, recall, fpr, fnr per (trial_id, class_name)


@dataclass(frozen=True)
class Sweep:
    """A sweep that ran: its name, the folder or URI holding it (results), and its folder on this machine."""

    name: str
    results: Path | str  # as given to sweep() or resume(): a folder, or a URI
    folder: Path  # <results>/<name>, or for a URI the working copy the sweep ran in

    def load(self) -> Results:
        """This sweep's tables (see `load`)."""
        return load(self.name, self.results)

    def analyze(self, **options) -> Analysis:
        """This sweep's report and what it found (see `analyze` for the options: objectives, speed_on, threads)."""
        return analyze(self.name, self.results, **options)


def sweep(
    space: str | Path | None = None,
    data: str | Path | None = None,
    results: str | Path = "results",
    name: str | None = None,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float | None = None,
    address: str | None = None,
    storage: str | None = None,
    seed: int = 0,
    extend: bool = False,
    external: str | Path | None = None,
    dashboard: bool = False,
    verbose: bool = False,
    tensorboard: bool = False,
    mlflow: str | None = None,
    ship_code: bool = True,
) -> Sweep:
    """Run a sweep as `asl-tune sweep` does (extend=True: add num_samples trials to the sweep `name`); return its handle once it ends."""
    from asl_tune.sweep.request import SweepRequest
    from asl_tune.sweep.run import run_sweep
    from asl_tune.sweep.space import resolve

    if extend and name is None:
        raise AslTuneError("--extend: needs --name, the sweep to add trials to")
    request = SweepRequest(
        space_path=resolve(space),
        data=_path(data),
        external=_path(external),
        name=name,
        results=results,
        num_samples=num_samples,
        max_concurrent=max_concurrent,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        address=address,
        storage=storage,
        seed=seed,
        extend=extend,
        dashboard=dashboard,
        verbose=verbose,
        tensorboard=tensorboard,
        mlflow=mlflow,
        ship_code=ship_code,
    )
    folder = run_sweep(request)
    return Sweep(folder.name, results, folder)


def resume(name: str, results: str | Path = "results", address: str | None = None, verbose: bool = False, ship_code: bool = True) -> Sweep:
    """Finish a sweep whose driver died, as `asl-tune resume NAME` does; return its handle once it ends.

    A sweep that already finished is left as it is, saying so on stderr (a retry loop may resume whatever happened)."""
    from asl_tune.sweep.request import NothingToResume
    from asl_tune.sweep.run import resume_sweep

    try:
        folder = resume_sweep(name, results, address, verbose=verbose, ship_code=ship_code)
    except NothingToResume as finished:
        print(finished, file=sys.stderr)
        folder = finished.folder
    return Sweep(name, results, folder)


def load(name: str, results: str | Path = "results") -> Results:
    """A sweep's tables as DataFrames, as they stand (a running sweep's too); a URI's files are first copied here, as analyze does."""
    from asl_tune.analysis.compute import checked_folder, local_results
    from asl_tune.results import CONFUSION, EPOCHS, PER_CLASS, TRIALS

    _, tables = checked_folder(local_results(results, [name]), name)  # each table read once, checked whole
    return Results(tables[TRIALS], tables[EPOCHS], tables[CONFUSION], tables[PER_CLASS])


def analyze(
    names: str | Sequence[str],
    results: str | Path = "results",
    objectives: str | Sequence[tuple[str, str]] | None = None,
    speed_on: str = "cpu",
    threads: int | None = None,
) -> Analysis:
    """Write the report of one sweep (or several, and their comparison) as `asl-tune analyze` does; return what it found.

    objectives: "val_accuracy:max,infer_img_per_s:max" as --objectives takes it, or (metric, mode) pairs;
    None: that default. The result's `front` and `summary` are DataFrames, `figures` the report's plots
    as matplotlib Figures, `text` what the command prints and `report` the report.md to read.
    """
    from asl_tune.analysis.report import analyze as write_reports
    from asl_tune.analysis.speed import speed_on as speed_setting

    names = [names] if isinstance(names, str) else list(names)
    return write_reports(names, results, _objectives(objectives), speed_setting(speed_on, threads))


def load_trained(path: str | Path) -> Trained:
    """The network a trial trained (a checkpoint.pt, the folder holding one, or a URI), ready to `classify` images."""
    from asl_tune.train import load_trained as load_checkpoint

    return load_checkpoint(path)


def _objectives(objectives: str | Sequence[tuple[str, str]] | None) -> list[tuple[str, str]] | None:
    """objectives as (metric, mode) pairs; a string is read as --objectives reads it."""
    from asl_tune.analysis.compute import parse_objectives

    if objectives is None:
        return None
    if isinstance(objectives, str):
        return parse_objectives(objectives)
    pairs = [tuple(item) if isinstance(item, (tuple, list)) else (item,) for item in objectives]
    for pair in pairs:
        if len(pair) != 2:
            raise AslTuneError(f"--objectives: must be known metric:max|min pairs, got {':'.join(map(str, pair))}")
    return pairs


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)
