"""Candidate-distance voting: how IIM combines the candidates of a cell's neighbours."""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["Weighting", "vote_weights"]

Weighting = Literal["vote", "uniform"]


def vote_weights(cand: np.ndarray, weights: Weighting = "vote") -> np.ndarray:
    """Combination weights for candidates of shape (q, k) (Formulas 10-11 of the paper).

    w_i is proportional to 1 / sum_j |c_i - c_j|; a row whose candidates are all equal gets
    uniform weights. Normalising by the smallest distance sum avoids overflow for nearly
    equal candidates.
    """
    n_queries, n_candidates = cand.shape
    if weights == "uniform" or n_candidates <= 1:
        return np.full((n_queries, n_candidates), 1.0 / max(n_candidates, 1))
    distance = np.abs(cand[:, :, None] - cand[:, None, :]).sum(axis=2)
    smallest = distance.min(axis=1, keepdims=True)
    equal = (smallest[:, 0] <= 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        vote = np.where(equal[:, None], 1.0, smallest / distance)
    vote /= vote.sum(axis=1, keepdims=True)
    return vote
