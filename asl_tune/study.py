"""Where the Optuna study of a sweep is stored: study.db (SQLite) in the sweep's folder.

Tune pickles the searcher, with its storage, into the run's experiment state, and `asl-tune resume`
unpickles it. A plain RDBStorage keeps the absolute path it was opened with; for a sweep whose
`--results` is a URI that path is a staging folder on the first driver's machine, so `StagedStudyStorage`
finds the study in this process's staging folder again when it is unpickled.
"""

from __future__ import annotations

from pathlib import Path

from optuna.storages import RDBStorage

from asl_tune.remote import Mirror


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


class StagedStudyStorage(RDBStorage):
    """An RDBStorage on `<staging folder>/<study file>`, the staging folder worked out where it is unpickled."""

    def __init__(self, mirror: Mirror, study_file: str):
        self._mirror = mirror
        self._study_file = study_file
        super().__init__(sqlite_url(mirror.folder / study_file))

    def __setstate__(self, state: dict) -> None:
        state["url"] = sqlite_url(state["_mirror"].folder / state["_study_file"])
        super().__setstate__(state)


def study_storage(folder: Path, study_file: str, mirror: Mirror | None = None) -> RDBStorage:
    """The storage for a sweep's study: in its folder, or in its staging folder when its results are at a URI."""
    if mirror is not None:
        return StagedStudyStorage(mirror, study_file)
    return RDBStorage(sqlite_url(folder / study_file))
