"""Differential privacy: OpenDP Gaussian mechanisms under ρ-zCDP and the site's ledger.

A site releases only noised statistics (Gram matrices, counts) through
:func:`release_gaussian`, which calibrates the Gaussian mechanism with OpenDP, charges the
site's :class:`PrivacyLedger` *before* any noise is drawn, and refuses a release that would
pass the site's ρ budget.
"""

from fediim.errors import BudgetExceeded, LedgerError
from fediim.privacy.ledger import LEDGER_FORMAT, LedgerEntry, PrivacyLedger
from fediim.privacy.mechanisms import (
    NoiseSource,
    OpenDPGaussianNoise,
    SeededGaussianNoise,
    count_sensitivity,
    epsilon_to_rho,
    gaussian_sigma,
    gram_sensitivity,
    rho_to_epsilon,
)
from fediim.privacy.release import release_gaussian

__all__ = [
    "LEDGER_FORMAT",
    "BudgetExceeded",
    "LedgerEntry",
    "LedgerError",
    "NoiseSource",
    "OpenDPGaussianNoise",
    "PrivacyLedger",
    "SeededGaussianNoise",
    "count_sensitivity",
    "epsilon_to_rho",
    "gaussian_sigma",
    "gram_sensitivity",
    "release_gaussian",
    "rho_to_epsilon",
]
