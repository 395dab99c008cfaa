"""What a sweep prints while it runs: one line per trial event, and a compact live status.

    trial 3f2a91c0 started (head 256, lr 0.0123, 4 epochs, 100% of the data)
    trial 3f2a91c0 at rung 1 (1 epoch of images): val_accuracy 0.2500, cutoff 0.1875 over 3 trials: continues
    trial 3f2a91c0 continues from its last checkpoint (head 256, ...)     # or: starts again from epoch 1 (no checkpoint yet)
    [1/8] trial 3f2a91c0 completed: val_accuracy 0.3125 (head 256, lr 0.0123, 4 epochs, 100% of the data)
    sweep: 1/8 done, 2 running, 5 pending; best val_accuracy 0.3125 (3f2a91c0); 1m40s elapsed, ~11m left

On a terminal the status line is rewritten in place (a carriage return, about once a second); in a log or
a pipe it is a plain line, at most once a minute (the event lines carry the news between), and never
carries a carriage return. `--verbose` brings back Ray Tune's own tables instead (`quiet(False)`).

A sweep whose trials errored ends with errors.TrialsErrored (exit status 3), naming each of them and its log
(`errored_message`); it exits 0 only when no trial of its run errored.

Rung lines come from the scheduler (schedule.py) through announce(). The recorder (recorder.py) owns one SweepProgress; it is pickled with the recorder when Tune saves its
state, so it holds no stream and no clock that would not survive that.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from typing import Iterator

TTY_EVERY_S = 1.0  # how often the in-place status line is redrawn on a terminal
LOG_EVERY_S = 60.0  # how often a status line is written to a log or a pipe: an 8-trial CPU sweep stays well under 60 lines
_QUIET = [True]  # False while a sweep runs with --verbose (Ray's tables shown, no status line)
_SHOWN: list["SweepProgress"] = []  # the sweep's progress that printed last: announce() prints through it


@contextmanager
def quiet(on: bool) -> Iterator[None]:
    """Show asl-tune's status line (on) or leave the terminal to Ray Tune's tables (off, --verbose) for the block."""
    _QUIET.append(on)
    try:
        yield
    finally:
        _QUIET.pop()


def shows_status() -> bool:
    """Whether the sweep now running shows asl-tune's status line (not --verbose)."""
    return _QUIET[-1]


def announce(line: str) -> None:
    """A trial event from elsewhere in the driver (the scheduler's rung decisions), printed as the recorder prints its own."""
    if _SHOWN:
        _SHOWN[-1].event(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class SweepProgress:
    """Event lines and the status line of one sweep (total trials; metric and mode to name the best)."""

    def __init__(self, total: int, metric: str, mode: str):
        self.total, self.metric, self.mode = total, metric, mode
        self._start: float | None = None  # time.monotonic() is per process: reset where the recorder is unpickled
        self._last = 0.0
        self._drawn = 0  # characters of the status line now on a terminal

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_start": None, "_last": 0.0, "_drawn": 0}

    def event(self, line: str) -> None:
        """One line for a trial event; on a terminal the status line is cleared first and redrawn at the next status()."""
        _SHOWN[:] = [self]
        self._clear()
        print(line, file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            self._last = 0.0  # redraw the status line under it at once

    def status(self, trials, final: bool = False) -> None:
        """Redraw (terminal) or write (log) the status line when due, or at once when final."""
        now = time.monotonic()
        self._start = self._start if self._start is not None else now
        tty = sys.stderr.isatty()
        if not _QUIET[-1] or not (final or now - self._last >= (TTY_EVERY_S if tty else LOG_EVERY_S)):
            return
        self._last = now
        _SHOWN[:] = [self]
        line = self.line(trials, now - self._start)
        if tty:
            sys.stderr.write("\r" + line.ljust(self._drawn) + ("\n" if final else ""))
            self._drawn = 0 if final else len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def line(self, trials, elapsed: float) -> str:
        """sweep: D/N done, R running, P pending; best METRIC V (trial); elapsed, ~left."""
        done = [t for t in trials if t.is_finished()]
        running = sum(1 for t in trials if t.status == "RUNNING")
        pending = max(self.total - len(done) - running, 0)
        text = f"sweep: {len(done)}/{self.total} done, {running} running, {pending} pending"
        scored = [
            (t.last_result.get(self.metric), t.trial_id) for t in done if isinstance((t.last_result or {}).get(self.metric), (int, float))
        ]
        scored = [(v, tid) for v, tid in scored if math.isfinite(v)]
        if scored:
            value, tid = (max if self.mode == "max" else min)(scored, key=lambda s: s[0])  # the first of equals, as the summary
            text += f"; best {self.metric} {value:.4f} ({tid})"
        text += f"; {_duration(elapsed)} elapsed"
        if done and len(done) < self.total:
            text += f", ~{_duration(elapsed / len(done) * (self.total - len(done)))} left"
        return text

    def _clear(self) -> None:
        if self._drawn and sys.stderr.isatty():
            sys.stderr.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0


def restart_line(trial_id: str, what: str, has_checkpoint: bool) -> str:
    """The event line of a trial that Tune starts again (after an error, a lost node, a resume): from its last
    checkpoint only when it has one; a trial that never saved one starts from its first epoch."""
    if has_checkpoint:
        return f"trial {trial_id} continues from its last checkpoint ({what})"
    return f"trial {trial_id} starts again from epoch 1: it has no checkpoint yet ({what})"


def errored_ids(grid) -> list[str]:
    """The ids of the trials of Tune's run (a ResultGrid) that ended in an error, in the run's order.

    Read from the run's trials as ResultGrid.num_errors reads them: building each Result would load every trial's
    metrics files from storage."""
    return [t.trial_id for t in grid._experiment_analysis.trials if t.status == "ERROR"]


def errored_message(name: str, total: int, errored: list[dict], folder) -> str:
    """One line for errors.TrialsErrored: how many of the run's trials errored, and each one's error and log file.

    errored: the errored trials' rows (trial_id, and error and log where recorded; log is relative to folder)."""

    def one(row: dict) -> str:
        error, log = row.get("error"), row.get("log")
        error = error if isinstance(error, str) else "no error recorded"
        return f"{row['trial_id']} ({error}; log: {f'{folder}/{log}' if isinstance(log, str) else 'none kept'})"

    named = "; ".join(one(row) for row in errored)
    return f"sweep {name!r} ended with {len(errored)} of {total} trials errored: {named}; the other trials' results are written"
