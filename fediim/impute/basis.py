"""Quadratic terms for IIM's richer individual models.

A row whose neighbourhood is wide (large ell) may fit its target better with a local
quadratic model than with a local plane; adaptive learning then offers both and lets
validation choose per row. The terms: every product ``x_a x_b`` (a <= b) while there are
at most :data:`FULL_MAX_FEATURES` features, only the squares beyond that (the number of
products grows with f^2). A quadratic model is offered only at an ell of at least
:data:`MIN_ROWS_PER_COEFFICIENT` times its coefficients, and only in patterns with at least
:data:`MIN_PATTERN_ROWS_PER_COEFFICIENT` times as many training rows: each row picks among
more candidates on the same k validation tuples, and on small tables (130 rows of UCI
Heart's VA, 80-row tables) that selection chose quadratic fits that did not hold up.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FULL_MAX_FEATURES", "MIN_PATTERN_ROWS_PER_COEFFICIENT", "MIN_ROWS_PER_COEFFICIENT",
           "n_terms", "offers_quadratic", "quadratic_terms"]

#: Up to this many features the quadratic terms include the interactions.
FULL_MAX_FEATURES = 5
#: A quadratic model needs at least this many learning rows per coefficient.
MIN_ROWS_PER_COEFFICIENT = 4
#: A pattern offers quadratic models only with this many training rows per coefficient.
MIN_PATTERN_ROWS_PER_COEFFICIENT = 10


def n_terms(n_features: int) -> int:
    """How many quadratic terms rows with ``n_features`` features get."""
    if n_features > FULL_MAX_FEATURES:
        return n_features
    return n_features * (n_features + 1) // 2


def offers_quadratic(n_rows: int, n_features: int) -> bool:
    """Whether a pattern of ``n_rows`` training rows offers quadratic models."""
    width = 1 + n_features + n_terms(n_features)
    return n_rows >= MIN_PATTERN_ROWS_PER_COEFFICIENT * width


def quadratic_terms(features: np.ndarray) -> np.ndarray:
    """The quadratic terms of rows ``features`` (n, f), shape (n, q)."""
    n_features = features.shape[1]
    if n_features > FULL_MAX_FEATURES:
        return features**2
    first, second = np.triu_indices(n_features)
    return features[:, first] * features[:, second]
