"""Missing values as part of the anomaly score (mixed tables, missing: model): the decoder predicts
which values are present, so a row lacking what the table always holds is surprising, a row with the
table's usual gaps is not, and the attribution names the column as "(missing)"."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vae.data.keys import key_hash
from vae.data.tabular import TableStats, fit_table, infer_kinds
from vae.embeddings.contract import attribution_columns
from vae.encode import encode_with_attribution
from vae.losses import ElboTerms, column_nll, elbo_terms, missingness_nll, reconstruction_nll, value_nll
from vae.model import VAE, DiagonalGaussian, ModelConfig

ROWS = 4000
ALWAYS_PRESENT = ("c0", "c1", "c2")
PLANTED = np.arange(50, ROWS, 100)  # 40 rows without c0, c1, c2, which every other row holds
VALUE_OUTLIERS = np.arange(75, ROWS, 100)  # 40 rows with c3 far off the others' prediction


def generated(seed: int = 0, usual_gaps: float = 0.3) -> tuple[pa.Table, np.ndarray]:
    """Six numeric columns from two factors; c5 missing in `usual_gaps` of the rows at random (the
    table's usual missingness); the planted rows miss the three columns that are otherwise present."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(ROWS, 2))
    columns = {f"c{i}": factors @ rng.normal(size=2) + 0.3 * rng.normal(size=ROWS) for i in range(6)}
    columns["c3"][VALUE_OUTLIERS] += 6.0
    usual = rng.random(ROWS) < usual_gaps
    usual[PLANTED] = False
    columns["c5"][usual] = np.nan
    for name in ALWAYS_PRESENT:
        columns[name][PLANTED] = np.nan
    return pa.table({"item_id": np.arange(ROWS), **columns}), usual


def trained(table: pa.Table, missingness: bool, epochs: int = 25, batch: int = 64):
    """The library's path without Ray: kinds, fitted transforms, codes, a mixed VAE trained on the
    ELBO (KL warm-up over 5 epochs), then scores and attribution as the embed job computes them."""
    columns = tuple(table.column_names[1:])
    kinds = infer_kinds(table.schema, "table", columns, {})
    stats = TableStats.of(table, kinds, key_hash(table.column(0)))
    schema = fit_table(stats, kinds, {}, "auto", 64)
    codes = schema.codes(table)[0]
    torch.manual_seed(0)
    config = ModelConfig(
        len(kinds), 2, (32, 16), "mixed", column_layout=schema.layout, missingness=missingness
    )
    model = VAE(config)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.from_numpy(codes)
    for epoch in range(epochs):
        for rows in torch.randperm(len(codes)).split(batch):
            loss = elbo_terms(model, x[rows]).loss(beta=min(1.0, (epoch + 1) / 5))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    _, score, surprise = encode_with_attribution(model, lambda matrix: matrix, codes)
    return schema, codes, score, surprise


@pytest.fixture(scope="module")
def informative():
    table, usual = generated()
    return (table, usual, *trained(table, missingness=True))


def test_rows_missing_what_the_table_always_holds_rank_as_anomalies(informative):
    table, usual, schema, codes, score, surprise = informative
    planted = np.zeros(ROWS, bool)
    planted[PLANTED] = True
    assert roc_auc_score(planted, score) >= 0.95
    # the table's usual gaps are not anomalies: few such rows above the 99th percentile of the rest
    ordinary = ~planted & ~usual
    threshold = np.quantile(score[ordinary], 0.99)
    assert (score[usual] > threshold).mean() <= 0.05
    # and their attribution says what is missing
    columns, _ = attribution_columns(surprise, schema.names, missing=np.isnan(codes))
    firsts = [row[0] for row in columns.to_pylist()]
    lacking = {f"{c} (missing)" for c in ALWAYS_PRESENT}
    assert sum(firsts[i] in lacking for i in PLANTED) >= 0.8 * len(PLANTED), [firsts[i] for i in PLANTED]
    assert all(lacking & set(columns[int(i)].as_py()) for i in PLANTED)  # among the top three
    assert not any("(missing)" in firsts[i] for i in VALUE_OUTLIERS)


def test_without_the_head_the_same_rows_look_normal(informative):
    """What a version from before the head (missing: skip) scores: the planted rows are among the
    most normal, as the issue measured on a real table; and the value outliers rank the same."""
    table, *_, score_with_head, _ = informative
    _, _, score, _ = trained(table, missingness=False)
    planted = np.zeros(ROWS, bool)
    planted[PLANTED] = True
    assert roc_auc_score(planted, score) < 0.5
    outliers = np.zeros(ROWS, bool)
    outliers[VALUE_OUTLIERS] = True
    keep = ~planted  # value anomalies among the rows with the usual missingness
    with_head = roc_auc_score(outliers[keep], score_with_head[keep])
    assert with_head >= roc_auc_score(outliers[keep], score[keep]) - 0.01 and with_head >= 0.95


@torch.no_grad()
def test_the_presence_terms_are_a_normalized_likelihood_and_count_in_the_elbo():
    layout = (("categorical", 3), ("numeric", 1), ("binary", 1))
    torch.manual_seed(0)
    model = VAE(ModelConfig(3, 2, (8,), "mixed", column_layout=layout, missingness=True))
    decoded = torch.randn(1, model.layout.decoded)
    assert model.layout.decoded == 5 + 3
    # each column: p(present) + p(missing) = 1, the value's probability given presence unchanged
    row = torch.tensor([[1.0, 0.5, 1.0]])
    for j in range(3):
        absent = row.clone()
        absent[0, j] = math.nan
        present_nll = missingness_nll(model, decoded, row)[0, j]
        missing_nll = column_nll(model, decoded, absent)[0, j]  # a missing entry: its presence term only
        assert missing_nll == missingness_nll(model, decoded, absent)[0, j]
        assert math.exp(-present_nll.item()) + math.exp(-missing_nll.item()) == pytest.approx(1.0)
        assert column_nll(model, decoded, row)[0, j] == pytest.approx(
            (value_nll(model, decoded, row)[0, j] + present_nll).item()
        )
    # the reconstruction term of the ELBO is the sum of every column's value and presence terms
    assert reconstruction_nll(model, decoded, row).item() == pytest.approx(
        column_nll(model, decoded, row).sum().item()
    )


def test_versions_from_before_the_head_load_as_they_were():
    layout = (("numeric", 1), ("numeric", 1))
    before = ModelConfig(2, 2, (8,), "mixed", column_layout=layout)
    assert "missingness" not in before.to_dict()  # model.json of versions before the head, unchanged
    assert ModelConfig.from_dict(before.to_dict()) == before and not before.missingness
    now = ModelConfig(2, 2, (8,), "mixed", column_layout=layout, missingness=True)
    assert ModelConfig.from_dict(now.to_dict()) == now
    assert VAE(now).decoder[-1].out_features == VAE(before).decoder[-1].out_features + 2
    with pytest.raises(ValueError, match="mixed tables only"):
        ModelConfig(4, 2, (8,), "gaussian", missingness=True)


def test_penguins_without_any_measurement_are_the_anomalies_of_a_real_table():
    """palmerpenguins, a public table not made for this test: species, island and sex strings, four
    measurements, sex missing for 11 birds; two birds have no measurement at all."""
    from palmerpenguins import load_penguins

    frame = load_penguins()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.add_column(0, "penguin_id", pa.array(np.arange(table.num_rows)))
    unmeasured = frame["bill_length_mm"].isna().to_numpy()
    assert unmeasured.sum() == 2
    schema, codes, score, surprise = trained(table, missingness=True, epochs=60, batch=32)
    rank = np.argsort(np.argsort(-score))  # 0: the most unusual bird
    assert (rank[unmeasured] < 5).all(), rank[unmeasured]
    columns, _ = attribution_columns(surprise, schema.names, missing=np.isnan(codes))
    measured = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g")
    lacking = {f"{name} (missing)" for name in measured}
    where = [schema.names.index(name) for name in measured]
    for i in np.flatnonzero(unmeasured):  # what it lacks makes most of its surprise, and leads
        assert surprise[i, where].sum() >= 0.5 * surprise[i].sum()
        assert columns[int(i)].as_py()[0] in lacking
    # what the same table scores with missing values skipped: the two birds look the most ordinary
    _, _, skipped, _ = trained(table, missingness=False, epochs=60, batch=32)
    assert (np.argsort(np.argsort(-skipped))[unmeasured] > table.num_rows // 2).all()


def test_trimming_leaves_out_the_rows_with_the_worst_values_and_keeps_every_presence_term():
    """Otherwise rows with missing values would be trimmed first and the head would learn missing
    values rarer than they are (measured: PR AUC 0.89 against 0.97 on the mixed table)."""
    values, presence = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 0.0, 0.0])
    posterior = DiagonalGaussian(torch.zeros(3, 1), torch.zeros(3, 1))  # KL 0
    terms = ElboTerms(values + presence, posterior.kl(), posterior, presence)
    assert terms.loss(trim_fraction=1 / 3).item() == pytest.approx((1.0 + 2.0) / 2 + 5.0 / 3)
    assert terms.negative_elbo.tolist() == [6.0, 2.0, 3.0]  # the score keeps every term
