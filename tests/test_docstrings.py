"""The Examples sections of the public estimators' docstrings run, and say what they do."""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

import fediim.federated.estimator
import fediim.impute.estimator


@pytest.mark.parametrize("module", [fediim.impute.estimator, fediim.federated.estimator],
                         ids=lambda module: module.__name__)
def test_docstring_examples_run(module: ModuleType) -> None:
    failed, attempted = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0, f"{module.__name__} has no docstring examples"
    assert failed == 0, f"{failed} of {attempted} docstring examples failed in {module.__name__}"
