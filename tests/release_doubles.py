"""Test doubles for privacy releases, shared by the privacy, partition and federated tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class RecordingNoise:
    """Noise source stub: counts calls, returns zeros (so a refused release can be shown to
    have drawn nothing)."""

    name = "recording-stub"

    def __init__(self) -> None:
        self.calls = 0

    def sample(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        self.calls += 1
        return np.zeros(shape)

    def sample_integer(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        self.calls += 1
        return np.zeros(shape, dtype=np.int64)


class ReleaseRecorder:
    """Stands in for ``release_gaussian``: records every exact input and released output.

    ``replay=None``: releases through the real mechanism. ``replay=[...]``: returns those
    vectors in order instead, so a neighbouring dataset is cut by the very same public tree.
    """

    def __init__(self, real: Callable[..., np.ndarray],
                 replay: list[np.ndarray] | None = None) -> None:
        self.real, self.replay = real, replay
        self.exact: list[np.ndarray] = []
        self.released: list[np.ndarray] = []

    def __call__(self, values: np.ndarray, **kw: Any) -> np.ndarray:
        self.exact.append(np.array(values, dtype=float))
        if self.replay is None:
            out = self.real(values, **kw)
        else:
            out = self.replay[len(self.exact) - 1]
            assert out.shape == np.shape(values), "the neighbour's tree differs"
        self.released.append(out)
        return out
