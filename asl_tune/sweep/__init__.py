"""The sweep wing: Ray Tune and Optuna around the shared trainer.

space (what to search) -> request (what was asked, the sweep folder and its lock) -> run (Tune, Optuna
and ASHA wired, started or resumed) -> trainable (the trainer in a Ray worker) -> recorder (each result
to Parquet); study keeps the Optuna study, cluster says where Ray runs, mirror is the
sweep's folder, local or at a URI (a working copy, copied there).
Nothing in the core (asl_tune/*.py) imports this package.
"""
