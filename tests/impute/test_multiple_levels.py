"""Multiple imputation of coded columns: every drawn cell a declared level, drawn with the
probability the cell's vote gives it; observed cells and labels as they were."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import chisquare

from fediim import IIMImputer
from fediim.impute.encoding import draw_levels, level_probabilities
from fediim.impute.estimator import missing_patterns
from fediim.impute.multiple import draw_imputations

KINDS = {"stage": ("categorical", ("a", "b", "c")), "flag": ("binary", (0, 1)),
         "grade": ("ordinal", (1, 2, 3))}


def _frame(n_rows: int = 160, seed: int = 0,
           hide: tuple[str, ...] = ("stage", "flag", "grade", "outcome")
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(truth, masked): a numeric driver decides a 3-level category (string labels), a
    binary flag and an ordinal grade, and a numeric outcome; 15% of each ``hide`` column
    hidden."""
    rng = np.random.default_rng(seed)
    driver = rng.normal(size=n_rows)
    stage = (driver + rng.normal(0, 0.6, n_rows) > -0.4).astype(int) + (driver > 0.6)
    flag = (driver + rng.normal(0, 1.0, n_rows) > 0).astype(int)
    grade = np.clip(np.round(driver + 2 + rng.normal(0, 0.5, n_rows)), 1, 3)
    truth = pd.DataFrame({"driver": driver, "stage": np.array(["a", "b", "c"])[stage],
                          "flag": flag, "grade": grade,
                          "outcome": 2 * driver + flag + rng.normal(0, 0.3, n_rows)})
    masked = truth.astype(object)
    for column in hide:
        masked.loc[rng.random(n_rows) < 0.15, column] = np.nan
    return truth, masked


def test_draw_levels_frequencies_match_the_probabilities() -> None:
    """4000 draws of one distribution: level counts pass a chi-square test, and a level of
    probability 0 is never drawn (argmax, or an off-by-one in the inverse CDF, fails)."""
    probabilities = np.tile([0.5, 0.3, 0.2, 0.0], (4000, 1))
    counts = np.bincount(draw_levels(probabilities, np.random.default_rng(0)), minlength=4)
    assert counts[3] == 0
    assert chisquare(counts[:3], 4000 * np.array([0.5, 0.3, 0.2])).pvalue > 1e-3


def test_draws_of_each_cell_follow_its_level_distribution() -> None:
    """With the full models (no resampling), 200 draws of every hidden categorical and
    binary cell: each cell's level frequencies match its voted distribution (within 4.5
    binomial standard errors; the least certain cell also by chi-square)."""
    _, masked = _frame(hide=("stage", "flag"))
    imputer = IIMImputer(column_kinds=KINDS).fit(masked)
    codes = imputer._codes(masked).to_numpy()
    encoded = imputer.encoding_.encode(codes)
    scores = imputer._impute_encoded(encoded).values
    draws = draw_imputations(imputer, codes, imputer.impute(masked),
                             list(missing_patterns(np.isnan(encoded))), 200,
                             np.random.default_rng(1), posterior="none")
    for column, kind in ((1, "categorical"), (2, "binary")):
        cells = np.flatnonzero(np.isnan(codes[:, column]))
        block = imputer.encoding_.blocks[column]
        expected = level_probabilities(scores[np.ix_(cells, block)], kind)
        drawn = np.stack([draw.values[cells, column] for draw in draws]).astype(int)
        frequencies = np.stack([(drawn == level).mean(axis=0)
                                for level in range(expected.shape[1])], axis=1)
        bound = 4.5 * np.sqrt(expected * (1 - expected) / len(draws)) + 1e-9
        assert np.all(np.abs(frequencies - expected) <= bound)
        least = np.argmin(expected.max(axis=1))
        assert expected[least].max() < 0.9  # a cell whose level is genuinely uncertain
        used = expected[least] > 0
        counts = np.bincount(drawn[:, least], minlength=expected.shape[1])[used]
        assert chisquare(counts, len(draws) * expected[least][used]
                         / expected[least][used].sum()).pvalue > 1e-3


def test_coded_draws_are_declared_labels_and_keep_observed_cells() -> None:
    _, masked = _frame(n_rows=120, seed=2)
    imputer = IIMImputer(column_kinds=KINDS, n_imputations=3, random_state=0).fit(masked)
    tables = imputer.multiple_imputations(masked)
    single = imputer.transform(masked)
    observed = masked.notna().to_numpy()
    for table in tables:
        assert table.shape == masked.shape and not table.isna().any().any()
        for column, (_, levels) in KINDS.items():
            assert set(table[column]) <= set(levels)
        assert (table.to_numpy()[observed] == masked.to_numpy()[observed]).all()
    # Draws differ where the level is uncertain (and from the single imputation's winner).
    for column in KINDS:
        hidden = masked[column].isna().to_numpy()
        drawn = np.stack([table[column].to_numpy()[hidden] for table in tables])
        assert (drawn != drawn[0]).any()
        assert (drawn != single[column].to_numpy()[hidden]).any()
    # The ordinal grade keeps its order: draws centre on the single imputation's rank.
    hidden = masked["grade"].isna().to_numpy()
    mean_draw = np.mean([table["grade"].to_numpy(float)[hidden] for table in tables], axis=0)
    assert np.corrcoef(mean_draw, single["grade"].to_numpy(float)[hidden])[0, 1] > 0.8


def test_coded_draws_repeat_under_a_seed() -> None:
    _, masked = _frame(n_rows=100, seed=3, hide=("stage", "flag"))

    def draws(seed: int) -> list[pd.DataFrame]:
        return IIMImputer(column_kinds=KINDS, n_imputations=1, random_state=seed).fit(
            masked).multiple_imputations(masked)

    first, again, other = draws(5), draws(5), draws(6)
    assert all(a.equals(b) for a, b in zip(first, again, strict=True))
    assert not first[0].equals(other[0])


def test_a_row_with_nothing_observed_draws_from_the_level_frequencies() -> None:
    """Cells no model can impute (the whole row hidden) draw declared levels, with the
    column's level frequencies: over 30 such rows both flags turn up."""
    _, masked = _frame(n_rows=100, seed=4, hide=())
    masked.iloc[:30, :] = np.nan
    table = IIMImputer(column_kinds=KINDS, n_imputations=1, random_state=0).fit(
        masked).multiple_imputations(masked)[0]
    for column, (_, levels) in KINDS.items():
        assert set(table[column].iloc[:30]) <= set(levels)
    assert set(table["flag"].iloc[:30]) == {0, 1}


def test_a_drawn_cell_reports_the_probability_of_the_level_it_drew() -> None:
    """Each drawn table's voted cells carry the voted probability of *their* drawn level
    (and uncertainty 1 - probability), not the single imputation's winner's: with the full
    models, the level distribution of every draw is the cell's vote."""
    _, masked = _frame(hide=("stage", "flag"))
    imputer = IIMImputer(column_kinds=KINDS).fit(masked)
    codes = imputer._codes(masked).to_numpy()
    encoded = imputer.encoding_.encode(codes)
    scores = imputer._impute_encoded(encoded).values
    single = imputer.impute(masked)
    draws = draw_imputations(imputer, codes, single,
                             list(missing_patterns(np.isnan(encoded))), 5,
                             np.random.default_rng(2), posterior="none")
    for column, kind in ((1, "categorical"), (2, "binary")):
        cells = np.flatnonzero(np.isnan(codes[:, column]))
        expected = level_probabilities(
            scores[np.ix_(cells, imputer.encoding_.blocks[column])], kind)
        for draw in draws:
            drawn = draw.values[cells, column].astype(int)
            want = expected[np.arange(len(cells)), drawn]
            np.testing.assert_allclose(draw.probability[cells, column], want)
            np.testing.assert_allclose(draw.uncertainty[cells, column], 1.0 - want)
        # some draw took a level other than the winner, whose probability is lower
        assert any((draw.probability[cells, column] < single.probability[cells, column]).any()
                   for draw in draws)
    assert np.isnan(draws[0].probability[:, 0]).all()  # a numeric column has none
