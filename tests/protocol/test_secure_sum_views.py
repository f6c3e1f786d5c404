"""Every message the coordinator receives is independent of the data beyond the sum.

(a) The masked inputs are uniform in Z_{2^64}, whatever the inputs (chi-square on the top
and bottom bytes and on each bit's frequency); (b) two datasets with the same sum give
identically distributed views, even after the coordinator removes the self masks it
learns at unmasking (two-sample chi-square over many runs), and every other message has
the same shape. Significance 1e-6 per test keeps them from flaking; each test first shows
its statistic rejecting the unmasked data, so it can fail.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from fediim.protocol.secure_sum import MaskedInput, UnmaskReply, secure_sums
from tests.protocol.secure_sum_parties import as_group, config, self_unmasked

ALPHA = 1e-6
BOUND = 10 ** 15


def _uniformity_p_values(words: np.ndarray) -> list[float]:
    """p-values of uniformity: top byte, bottom byte, the 64 bit frequencies jointly."""
    top = np.bincount((words >> np.uint64(56)).astype(np.int64), minlength=256)
    bottom = np.bincount((words & np.uint64(255)).astype(np.int64), minlength=256)
    bits = np.array([((words >> np.uint64(b)) & np.uint64(1)).sum() for b in range(64)],
                    dtype=float)
    n = words.size
    bit_statistic = float((((bits - n / 2) ** 2) / (n / 4)).sum())
    return [float(stats.chisquare(top).pvalue), float(stats.chisquare(bottom).pvalue),
            float(stats.chi2.sf(bit_statistic, 64))]


def _run(inputs: dict[str, list[np.ndarray]], n_sites: int = 3, length: int = 2048
         ) -> list[tuple[str, bytes]]:
    seen: list[tuple[str, bytes]] = []
    secure_sums(config(n_sites, 2, (length,), max_abs=BOUND), inputs,
                observe=lambda kind, data: seen.append((kind, data)))
    return seen


def _structured(length: int, scale: int) -> dict[str, list[np.ndarray]]:
    """Extreme, data-like inputs: +bound, a ramp, -bound (sum = the ramp)."""
    ramp = (np.arange(length, dtype=np.int64) * 7919) % (BOUND + 1) * scale
    return {"site-0": [np.full(length, BOUND * scale)], "site-1": [ramp],
            "site-2": [np.full(length, -BOUND * scale)]}


def test_masked_inputs_are_uniform_whatever_the_inputs() -> None:
    inputs = _structured(2048, 1)
    raw = np.concatenate([as_group(v[0]) for v in inputs.values()])
    assert min(_uniformity_p_values(raw)) < ALPHA  # the statistic sees unmasked data
    seen = _run(inputs)
    masked = np.concatenate([MaskedInput.decode(d).vector for k, d in seen
                             if k == "masked_input"])
    assert masked.size == 3 * 2048
    assert min(_uniformity_p_values(masked)) > ALPHA


def _views(inputs: dict[str, list[np.ndarray]], runs: int
           ) -> tuple[dict[str, np.ndarray], list[list[tuple[str, int]]]]:
    """Over ``runs`` runs: each site's masked input minus its self mask (all the coordinator
    can unmask), and the kind and size of every message it received."""
    cfg = config(3, 2, (inputs["site-0"][0].size,), max_abs=BOUND)
    unmasked: dict[str, list[np.ndarray]] = {site: [] for site in cfg.sites}
    shapes = []
    for _ in range(runs):
        seen = _run(inputs, length=cfg.vector_lengths[0])
        masked = [MaskedInput.decode(d) for k, d in seen if k == "masked_input"]
        replies = [UnmaskReply.decode(d) for k, d in seen if k == "unmask_reply"]
        for site, view in self_unmasked(masked, replies, cfg).items():
            unmasked[site].append(view)
        shapes.append([(kind, len(data)) for kind, data in seen])
    return {site: np.concatenate(v) for site, v in unmasked.items()}, shapes


def _same_distribution_p(a: np.ndarray, b: np.ndarray) -> float:
    """The smaller two-sample chi-square p-value, on the top 4 bits and on the bottom 4
    bits (bins that neither sample hits left out)."""
    p_values = []
    for shift in (60, 0):
        nibbles = [((words >> np.uint64(shift)) & np.uint64(15)).astype(np.int64)
                   for words in (a, b)]
        table = np.stack([np.bincount(n, minlength=16) for n in nibbles])
        p_values.append(float(stats.chi2_contingency(table[:, table.sum(axis=0) > 0]).pvalue))
    return min(p_values)


def test_two_datasets_with_the_same_sum_give_identically_distributed_views() -> None:
    length, runs = 32, 50
    dataset_a = _structured(length, 1)
    ramp = dataset_a["site-1"][0]
    dataset_b = {"site-0": [ramp], "site-1": [np.zeros(length, np.int64)],
                 "site-2": [np.zeros(length, np.int64)]}  # the same sum: the ramp
    assert _same_distribution_p(as_group(dataset_a["site-0"][0].repeat(runs)),
                                as_group(dataset_b["site-0"][0].repeat(runs))) < ALPHA
    views_a, shapes_a = _views(dataset_a, runs)
    views_b, shapes_b = _views(dataset_b, runs)
    assert shapes_a == shapes_b  # every message's kind and size: independent of the data
    for site in views_a:
        assert _same_distribution_p(views_a[site], views_b[site]) > ALPHA
    for views in (views_a, views_b):  # what the views share: the sum, exactly
        total = sum(views.values())
        assert np.array_equal(total, np.tile(as_group(ramp), runs))
