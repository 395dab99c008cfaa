"""The one error type users see: the CLI prints its message on one line and exits 2."""


class AslTuneError(Exception):
    """A problem with the user's input or environment, worded for the user."""
