"""The tree imputers users pick today, as peers of the paper protocol (``bench`` extra).

    missforest-pkg  the ``missforest`` package 4.2.3: LightGBM with linear trees,
                    ``n_jobs=1`` (its default takes every core and is 10-30x slower on a
                    shared 2-core machine), ``random_state=seed``, its other defaults
    miceforest      miceforest 6.0.5, one dataset, :data:`MICE_ITERATIONS` iterations,
                    ``mean_match_candidates=0`` (raw predictions: the fair point-accuracy
                    peer), one LightGBM thread

Both take and return a float matrix with NaN gaps; observed cells are kept as they were.
Not part of the fediim package: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["MICE_ITERATIONS", "PEERS", "miceforest_raw", "missforest_package"]

#: miceforest's iterations (its documentation's usual count).
MICE_ITERATIONS = 5


def _frame(x: np.ndarray) -> Any:
    import pandas as pd

    return pd.DataFrame(x, columns=[f"c{column}" for column in range(x.shape[1])])


def _keep_observed(x: np.ndarray, imputed: np.ndarray) -> np.ndarray:
    observed = ~np.isnan(x)
    out = np.asarray(imputed, dtype=np.float64).copy()
    out[observed] = x[observed]
    return out


def missforest_package(x: np.ndarray, seed: int) -> np.ndarray:
    """The ``missforest`` package's imputation of ``x`` (see the module docstring)."""
    from lightgbm import LGBMClassifier, LGBMRegressor
    from missforest import MissForest

    frame = _frame(x)
    options = {"n_jobs": 1, "verbosity": -1, "linear_tree": True, "random_state": seed}
    imputer = MissForest(clf=LGBMClassifier(**options), rgr=LGBMRegressor(**options),
                         verbose=0)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out = imputer.fit_transform(frame)
    return _keep_observed(x, out[frame.columns].to_numpy())  # it may reorder columns


def miceforest_raw(x: np.ndarray, seed: int) -> np.ndarray:
    """miceforest's imputation of ``x`` without mean matching (see the module docstring)."""
    import miceforest

    frame = _frame(x)
    kernel = miceforest.ImputationKernel(frame, num_datasets=1, mean_match_candidates=0,
                                         random_state=seed)
    kernel.mice(MICE_ITERATIONS, num_threads=1, verbosity=-1)
    out = kernel.complete_data(dataset=0)
    return _keep_observed(x, out[frame.columns].to_numpy())


#: benchmark method name -> peer imputer of one table and seed
PEERS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "missforest-pkg": missforest_package, "miceforest": miceforest_raw,
}
