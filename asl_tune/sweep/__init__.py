"""The sweep wing: Ray Tune and Optuna around the shared trainer.

space (what to search) -> request (what was asked, the sweep folder and its lock) -> run (Tune, Optuna
and ASHA wired, started or resumed) -> trainable (the trainer in a Ray worker) -> recorder (each result
to Parquet); study keeps the Optuna study, cluster says where Ray runs, mirror is the
sweep's folder, local or at a URI (a working copy, copied there).
Nothing in the core (asl_tune/*.py) imports this package.

Calling this package runs a sweep: `asl_tune.sweep(space=..., ...)` is `asl_tune.api.sweep(...)`. The API's
function and the wing share the name `asl_tune.sweep`, and importing the wing binds that name to the package
(Python sets a package's submodules as its attributes), so the package itself forwards the call.
"""

import sys
import types


class _CallableWing(types.ModuleType):
    """The sweep wing's module type: calling it calls asl_tune.api.sweep."""

    def __call__(self, *args, **kwargs):
        from asl_tune.api import sweep

        return sweep(*args, **kwargs)


sys.modules[
    __name__
].__class__ = _CallableWing  # the documented way to give a module behaviour (Python's "Customizing module attribute access")
