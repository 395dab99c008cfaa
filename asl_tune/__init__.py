"""asl-tune: hyperparameter sweeps of DexNet on the ASL alphabet. The Python API (asl_tune.api) is here:

    asl_tune.sweep(...)  resume(name)  load(name)  analyze(name)  load_trained(path)

`asl_tune.sweep` is also the sweep wing's package, which calling runs a sweep (asl_tune.api.sweep). Nothing
heavy (Ray, Optuna, torch, pandas) is imported until a function needs it.
"""

from asl_tune.api import Results, Sweep, analyze, load, load_trained, resume
from asl_tune.errors import AslTuneError, Stopped

__all__ = ["AslTuneError", "Results", "Stopped", "Sweep", "analyze", "load", "load_trained", "resume", "sweep"]


def __getattr__(name: str):
    """`asl_tune.sweep` before anything imported the wing: the package (callable, see asl_tune/sweep/__init__.py)."""
    if name == "sweep":
        import importlib

        return importlib.import_module("asl_tune.sweep")
    raise AttributeError(f"module 'asl_tune' has no attribute {name!r}")
