"""The error types users see: the CLI prints the message on one line and exits 2 (or, when a signal stopped
a sweep after it saved its state, 128 + the signal's number, as a shell reports a process a signal ended)."""


class AslTuneError(Exception):
    """A problem with the user's input or environment, worded for the user."""


class Stopped(AslTuneError):
    """A sweep stopped by a signal (SIGTERM from a scheduler, Ctrl-C) once Tune saved its state; resumable."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.status = 128 + signum
