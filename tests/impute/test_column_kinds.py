"""IIMImputer with coded columns: encoding and its scale, levels out, probabilities,
string labels and pandas categories, ordinal order, numeric tables unchanged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fediim import IIMImputer
from fediim.impute.encoding import ColumnCoding, MixedEncoding, level_probabilities


def _table(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A numeric driver, a 3-level category it decides, a binary and a numeric outcome;
    returns (truth, masked, hidden) with 20% of the category hidden."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    level = (a > -0.4).astype(int) + (a > 0.6).astype(int)
    flag = (rng.random(n) < 0.5).astype(float)
    b = 2 * a + level + flag + rng.normal(scale=0.3, size=n)
    truth = np.column_stack([a, b, level + 1.0, flag])
    hidden = np.zeros_like(truth, dtype=bool)
    hidden[:, 2] = rng.random(n) < 0.2
    hidden[:, 3] = rng.random(n) < 0.1
    return truth, np.where(hidden, np.nan, truth), hidden


KINDS = {2: ("categorical", (1.0, 2.0, 3.0)), 3: ("binary", (0.0, 1.0))}


def test_encoding_one_hot_block_and_mismatch_distance() -> None:
    """A level mismatch adds 1 to the squared distance (see the module), for a
    categorical and for a binary column."""
    encoding = MixedEncoding([ColumnCoding(), ColumnCoding("categorical", ("a", "b", "c")),
                              ColumnCoding("binary", (0, 1)), ColumnCoding("ordinal", (1, 2))])
    encoded = encoding.encode(np.array([[0.5, 2.0, 1.0, 1.0], [0.5, 0.0, 0.0, np.nan],
                                        [1.0, np.nan, 1.0, 0.0]]))
    assert encoded.shape == (3, 6)
    assert encoded[0].tolist() == [0.5, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert np.isnan(encoded[2, 1:4]).all() and encoded[2, 4] == 1.0
    scale = encoding.fixed_scale()
    scaled = (encoded[:2, 1:5]) / scale[1:5]
    assert np.sum((scaled[0, :3] - scaled[1, :3]) ** 2) == pytest.approx(1.0)
    assert (scaled[0, 3] - scaled[1, 3]) ** 2 == pytest.approx(1.0)
    assert encoding.onehot_blocks() == [[1, 2, 3], [4]]
    assert encoding.encoded_bounds(np.array([[0, 1]] * 4)).tolist() == [
        [0, 1], [-1, 1], [-1, 1], [-1, 1], [-1, 1], [0, 1]]


def test_level_probabilities_clip_and_normalise() -> None:
    probabilities = level_probabilities(np.array([[0.7, 0.5, -0.2], [0.0, 0.0, 0.0]]),
                                        "categorical")
    assert probabilities[0].tolist() == pytest.approx([0.7 / 1.2, 0.5 / 1.2, 0.0])
    assert probabilities[1].tolist() == pytest.approx([1 / 3] * 3)
    assert level_probabilities(np.array([[1.3]]), "binary").tolist() == [[0.0, 1.0]]


def test_imputed_coded_cells_are_declared_levels_with_probabilities() -> None:
    truth, masked, hidden = _table()
    imputer = IIMImputer(column_kinds=KINDS).fit(masked)
    result = imputer.impute(masked)
    out = imputer.transform(masked)
    assert np.isin(out[hidden[:, 2], 2], [1, 2, 3]).all()
    assert np.isin(out[hidden[:, 3], 3], [0, 1]).all()
    observed = ~hidden
    assert np.array_equal(out[observed], truth[observed])
    # The category is a function of the driver: IIM gets almost all of it right, far
    # above the column mode.
    accuracy = np.mean(out[hidden[:, 2], 2] == truth[hidden[:, 2], 2])
    mode_share = np.max(np.bincount(truth[:, 2].astype(int))) / len(truth)
    assert accuracy >= 0.85 > mode_share + 0.2
    probability = result.probability[hidden]
    assert np.all((probability >= 0.5 - 1e-12) & (probability <= 1.0))
    assert np.allclose(result.uncertainty[hidden], 1.0 - probability)
    assert np.isnan(result.probability[~hidden]).all()
    assert imputer.encoding_ is not None and imputer.mean_.shape == (6,)


def test_string_labels_and_pandas_categories() -> None:
    truth, masked, hidden = _table(seed=1)
    names = np.array(["low", "mid", "high"], dtype=object)
    frame = pd.DataFrame({"a": masked[:, 0], "b": masked[:, 1],
                          "grade": pd.Categorical(
                              [None if np.isnan(v) else names[int(v) - 1] for v in masked[:, 2]],
                              categories=list(names)),
                          "flag": masked[:, 3]})
    out = IIMImputer(column_kinds={"flag": ("binary", (0.0, 1.0))}).fit_transform(frame)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == list(frame.columns)
    assert set(out["grade"]) <= set(names) and out["grade"].notna().all()
    assert np.mean(out["grade"][hidden[:, 2]].to_numpy()
                   == names[truth[hidden[:, 2], 2].astype(int) - 1]) >= 0.85
    with pytest.raises(ValueError, match=r"column 'grade', row 1: 'top' is not a declared"):
        IIMImputer(column_kinds={"grade": ("categorical", ("low", "mid", "high"))}).fit(
            frame.assign(grade=["top"] + list(frame["grade"][1:])))


def test_ordinal_target_is_rounded_to_a_level_in_order() -> None:
    truth, masked, hidden = _table(seed=2)
    imputer = IIMImputer(column_kinds={2: ("ordinal", (1.0, 2.0, 3.0))})
    out = imputer.fit_transform(masked[:, :3])
    cells = hidden[:, 2]
    assert np.isin(out[cells, 2], [1, 2, 3]).all()
    # Order kept: the imputed rank grows with the driver.
    order = np.argsort(masked[cells, 0])
    assert np.corrcoef(masked[cells, 0][order], out[cells, 2][order])[0, 1] > 0.8


def test_no_coded_column_leaves_the_engine_unchanged() -> None:
    _, masked, _ = _table(seed=3)
    plain = IIMImputer().fit(masked).impute(masked)
    numeric = IIMImputer(column_kinds={0: "numeric"}).fit(masked)
    assert numeric.encoding_ is None
    again = numeric.impute(masked)
    assert np.array_equal(plain.values, again.values) and again.probability is None


def test_unknown_column_in_column_kinds_is_refused() -> None:
    _, masked, _ = _table(seed=4)
    with pytest.raises(ValueError, match="unknown column"):
        IIMImputer(column_kinds={"nope": "binary"}).fit(masked)
