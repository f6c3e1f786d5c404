"""simulations package: declarative privacy–utility studies of federated IIM.

A study is a TOML file (see ``simulations/studies/README.md``)::

    from simulations import load_study, run_study
    run = run_study(load_study("simulations/studies/heart.toml"), "out/heart")

or ``fediim study simulations/studies/heart.toml --out out/heart``.
"""

from simulations.config import Study, StudyConfigError, load_study, study_from_dict
from simulations.runner import StudyRun, run_study

__all__ = ["Study", "StudyConfigError", "StudyRun", "load_study", "run_study",
           "study_from_dict"]
