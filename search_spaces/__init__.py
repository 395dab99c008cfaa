"""The shipped search spaces (the YAML files beside this one), installed as the package data of asl_tune.search_spaces.

pyproject.toml maps that package onto this folder, so the files stay here and ship in every install;
asl_tune.sweep.space finds them with importlib.resources.
"""
