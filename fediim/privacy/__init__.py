"""Differential privacy: OpenDP mechanisms under ρ-zCDP and the site's ledger.

A site releases only noised statistics (Gram matrices, counts) through
:func:`release_gaussian`, and private quantiles (clipping bounds) through
:func:`release_quantiles`; both calibrate their mechanism with OpenDP, charge the site's
:class:`PrivacyLedger` *before* any noise is drawn, and refuse a release that would pass the
site's ρ budget. :func:`release_distributed` releases one site's share of a secure sum:
integer statistics plus discrete Gaussian noise whose sum over sites is ρ-zCDP.
"""

from fediim.errors import BudgetExceeded, LedgerError
from fediim.privacy.distributed import (
    DDG_MECHANISM,
    ddg_rho,
    ddg_sigma,
    noise_bound,
    quantise,
    quantised_sensitivity,
    release_distributed,
)
from fediim.privacy.ledger import LEDGER_FORMAT, LedgerEntry, PrivacyLedger
from fediim.privacy.mechanisms import (
    IntegerNoiseSource,
    NoiseSource,
    OpenDPGaussianNoise,
    QuantileNoiseSource,
    SeededGaussianNoise,
    count_sensitivity,
    epsilon_to_rho,
    gaussian_sigma,
    gram_sensitivity,
    quantile_score_scale,
    quantile_score_sensitivity,
    rho_to_epsilon,
)
from fediim.privacy.quantiles import QUANTILE_GRID_SIZE, quantile_candidates, release_quantiles
from fediim.privacy.release import release_gaussian

__all__ = [
    "DDG_MECHANISM",
    "LEDGER_FORMAT",
    "QUANTILE_GRID_SIZE",
    "BudgetExceeded",
    "IntegerNoiseSource",
    "LedgerEntry",
    "LedgerError",
    "NoiseSource",
    "OpenDPGaussianNoise",
    "PrivacyLedger",
    "QuantileNoiseSource",
    "SeededGaussianNoise",
    "count_sensitivity",
    "ddg_rho",
    "ddg_sigma",
    "epsilon_to_rho",
    "gaussian_sigma",
    "gram_sensitivity",
    "noise_bound",
    "quantile_candidates",
    "quantise",
    "quantile_score_scale",
    "quantile_score_sensitivity",
    "quantised_sensitivity",
    "release_distributed",
    "release_gaussian",
    "release_quantiles",
    "rho_to_epsilon",
]
