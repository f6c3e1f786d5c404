"""A site refuses a principal-axis frame that would break a sum's sensitivity or that its
plan did not ask for, before it releases anything over it."""

from __future__ import annotations

import numpy as np
import pytest

from fediim.federated.plan import plan_privacy
from fediim.federated.principal import Frame
from fediim.protocol.secure_run import PublicState
from site_client.secure import _check_frame

BOX = (np.full(4, -0.5), np.full(4, 0.5))
CODED = np.array([False, False, True, True])  # one one-hot block of two indicators
CLIP = ~CODED


def _frame(matrix: np.ndarray, offset: np.ndarray | None = None) -> Frame:
    return Frame(matrix, np.zeros(4) if offset is None else offset)


def test_a_frame_that_rotates_only_numeric_columns_is_accepted() -> None:
    rotation = np.eye(4)
    rotation[:2, :2] = [[1.8, 2.4], [-2.4, 1.8]]
    state = PublicState(BOX, 4, frame=_frame(rotation, np.array([0.1, -0.2, 0, 0])))
    _check_frame(state, CODED, plan_privacy(1.0, 1e-6, 4), CLIP)


@pytest.mark.parametrize("how", ["mixes", "scales", "shifts"])
def test_a_frame_that_moves_a_coded_column_is_refused(how: str) -> None:
    matrix, offset = np.eye(4), np.zeros(4)
    if how == "mixes":
        matrix[0, 2] = 0.5
    elif how == "scales":
        matrix[3, 3] = 2.0
    else:
        offset[2] = 0.1
    with pytest.raises(ValueError, match="coded column"):
        _check_frame(PublicState(BOX, 4, frame=_frame(matrix, offset)), CODED,
                     plan_privacy(1.0, 1e-6, 4), CLIP)


def test_a_frame_the_plan_did_not_ask_for_or_a_missing_one_is_refused() -> None:
    framed = PublicState(BOX, 4, frame=_frame(np.eye(4)))
    with pytest.raises(ValueError, match="frame"):
        _check_frame(framed, CODED, plan_privacy(1.0, 1e-6, 4, principal_axes=False), CLIP)
    with pytest.raises(ValueError, match="frame"):
        _check_frame(PublicState(BOX, 4), CODED, plan_privacy(1.0, 1e-6, 4), CLIP)
