"""A spy shared by the tests that check which bank the site's validation reads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fediim.federated.site_imputation as site_imputation
from fediim.federated.bank import ModelBank


def spy_bank_counts(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Record the cell counts of every bank site imputation fits models on (in call
    order), by wrapping its ``pattern_models``."""
    seen: list[np.ndarray] = []
    real = site_imputation.pattern_models

    def spy(bank: ModelBank, *args: Any) -> Any:
        seen.append(bank.counts.copy())
        return real(bank, *args)

    monkeypatch.setattr(site_imputation, "pattern_models", spy)
    return seen
