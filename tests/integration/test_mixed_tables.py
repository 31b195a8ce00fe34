"""Mixed tables end to end on a generated table (categorical structure, values missing at random and
not at random, planted anomalies): the schema and transforms stored in the version and applied again
at embed time, missing values modelled rather than refused, unseen categories and wrong types
refused naming the column, and each row's score attributed to the column that made it unusual,
through the embed job's Iceberg table and Feast's online store."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from feast_embeddings import fetch_online
from feast_embeddings.settings import StoreSettings
from ray_jobs.config import EmbedConfig, PublishConfig, TrainConfig
from ray_jobs.embed import embed
from ray_jobs.publish import publish
from ray_jobs.train import train
from vae import InputError, features_to_numpy, load_model_version

ROWS = 4000
SEGMENTS = ("grocery", "travel", "online", "fuel")
PLANTED_AMOUNT = np.arange(100, 4000, 100)  # 39 rows with an amount 300x their segment's
PLANTED_SCORE = np.arange(150, 4000, 100)  # 39 rows with a score far outside their segment's


def mixed_table(seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    segment = rng.choice(len(SEGMENTS), ROWS, p=[0.4, 0.3, 0.2, 0.1])
    amount = np.exp(rng.normal(np.array([3.0, 6.0, 4.0, 3.5])[segment], 0.4))
    card_present = rng.random(ROWS) < np.array([0.9, 0.5, 0.02, 0.95])[segment]
    score = rng.normal(np.array([0.0, 2.0, -1.0, 1.0])[segment], 0.5)
    amount[PLANTED_AMOUNT] *= 300.0
    score[PLANTED_SCORE] += 12.0
    score_missing = rng.random(ROWS) < 0.1  # missing at random
    amount_missing = (segment == 3) & (rng.random(ROWS) < 0.5)  # missing not at random: fuel only
    amount_missing[PLANTED_AMOUNT] = False
    score_missing[PLANTED_SCORE] = False
    return pa.table(
        {
            "item_id": np.arange(ROWS, dtype=np.int64),
            "segment": pa.array([SEGMENTS[s] for s in segment]).dictionary_encode(),
            "amount": pa.array(amount, mask=amount_missing),
            "card_present": pa.array(card_present),
            "score": np.where(score_missing, np.nan, score),
        }
    )


@pytest.fixture(scope="module")
def mixed(ray_cluster, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("mixed")
    table = mixed_table()
    pq.write_table(table, work / "data.parquet")
    config = TrainConfig(
        data=str(work / "data.parquet"),
        likelihood="mixed",
        # amounts are multiplicative (lognormal per segment): log is their scale; the score gets auto
        column_transforms={"amount": "log"},
        latent_dim=4,
        hidden_dims=[64, 32],
        epochs=30,
        batch_size=128,
        lr_schedule="constant",
        kl_warmup_epochs=5,
        early_stopping_patience=0,
        num_workers=1,
        iw_samples=50,
        report_rows=0,
        model_root=str(work / "models"),
        storage_path=str(work / "ray_results"),
    )
    version = train(config)
    return {"work": work, "table": table, "version": version, "config": config}


def test_the_schema_and_transforms_are_inferred_stored_and_applied_again(mixed):
    loaded = load_model_version(mixed["work"] / "models", mixed["version"])
    table = loaded.features.table
    kinds = {c.name: c.kind for c in table.columns}
    assert kinds == {
        "segment": "categorical",
        "amount": "numeric",
        "card_present": "binary",
        "score": "numeric",
    }
    segment = table.columns[0]
    assert set(segment.categories) == set(SEGMENTS) and segment.width == 5  # + the other bucket
    transforms = {c.name: c.transform for c in table.columns if c.kind == "numeric"}
    assert transforms == {"amount": "log", "score": "asinh"}  # declared; auto: robust, then a signed log
    assert loaded.metadata["architecture"]["column_layout"] == [
        ["categorical", 5],
        ["numeric", 1],
        ["binary", 1],
        ["numeric", 1],
    ]
    # the codes a reloaded version computes: categories by index, missing as NaN, the fitted transform
    codes = features_to_numpy(mixed["table"], loaded.features)
    segments = mixed["table"].column("segment").cast(pa.string()).to_pylist()
    np.testing.assert_array_equal(codes[:, 0], [segment.categories.index(s) for s in segments])
    amount = mixed["table"].column("amount").to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(np.isnan(codes[:, 1]), np.isnan(amount))
    spec = table.columns[1]
    np.testing.assert_allclose(
        codes[~np.isnan(amount), 1],
        (np.log1p(amount[~np.isnan(amount)]) - spec.center) / spec.scale,
        rtol=1e-5,
    )
    score, spec = mixed["table"].column("score").to_numpy(), table.columns[3]
    np.testing.assert_allclose(
        codes[~np.isnan(score), 3],
        np.arcsinh((score[~np.isnan(score)] - spec.center) / spec.scale),
        rtol=1e-5,
    )
    # the ELBO stays a likelihood in nats: the importance-weighted NLL bounds it from below
    metrics = loaded.metadata["metrics"]
    assert np.isfinite(metrics["iw_nll"]) and metrics["iw_nll"] <= metrics["val_negative_elbo"] + 0.05


def embed_config(mixed, data, repo, **options) -> EmbedConfig:
    return EmbedConfig(
        data=str(data),
        model_root=str(mixed["work"] / "models"),
        model_version=mixed["version"],
        feature_store_yaml=str(repo / "feature_store.yaml"),
        **options,
    )


def test_scores_find_the_planted_rows_and_name_their_column_in_iceberg_and_feast(mixed, feature_repo):
    embed(embed_config(mixed, mixed["work"] / "data.parquet", feature_repo, batch="2026-12-01"))
    catalog = StoreSettings.read(feature_repo / "feature_store.yaml").open_catalog()
    rows = catalog.read(catalog.table("item", mixed["version"])).sort_by("item_id")
    assert rows.num_rows == ROWS  # missing values are modelled, not bad rows
    scores = rows.column("anomaly_score").to_numpy()
    planted = np.zeros(ROWS, bool)
    planted[np.r_[PLANTED_AMOUNT, PLANTED_SCORE]] = True
    assert roc_auc_score(planted, scores) > 0.95
    top = rows.column("top_columns").to_pylist()
    shares = rows.column("top_shares").to_pylist()
    assert np.mean([top[i][0] == "amount" for i in PLANTED_AMOUNT]) >= 0.9
    assert np.mean([top[i][0] == "score" for i in PLANTED_SCORE]) >= 0.9
    assert all(len(t) == 3 and len(set(t)) == 3 for t in top)
    assert all(1.0 + 1e-5 >= s[0] >= s[1] >= s[2] >= 0.0 for s in shares)
    assert np.median([shares[i][0] for i in PLANTED_AMOUNT]) > 0.8

    published = publish(PublishConfig(feature_repo=str(feature_repo), model_version=mixed["version"]))
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(feature_repo))
    keys = [int(k) for k in PLANTED_AMOUNT[:5]] + [7]
    fetched = fetch_online(store, published["view"], keys, "item_id")
    for row in fetched:
        assert row["top_columns"] == top[row["item_id"]]
        np.testing.assert_allclose(row["top_shares"], shares[row["item_id"]], rtol=1e-6)
    assert fetched[0]["top_columns"][0] == "amount"


def test_unseen_categories_and_types_are_refused_naming_the_column(mixed, feature_repo, tmp_path):
    table = mixed["table"].slice(0, 200)
    segment = table.column("segment").cast(pa.string()).to_pylist()
    segment[17] = "casino"
    unseen = table.set_column(1, "segment", pa.array(segment))
    pq.write_table(unseen, tmp_path / "unseen.parquet")
    with pytest.raises(InputError, match=r"row item_id=17 has category 'casino' in column 'segment'.*other"):
        embed(embed_config(mixed, tmp_path / "unseen.parquet", feature_repo, batch="b1"))
    catalog = StoreSettings.read(feature_repo / "feature_store.yaml").open_catalog()
    assert catalog.batches(catalog.table("item", mixed["version"])) == []  # nothing committed
    # mapped to the other bucket on request: every row embedded, the unseen one scored as unusual
    embed(
        embed_config(mixed, tmp_path / "unseen.parquet", feature_repo, batch="b1", unseen_categories="other")
    )
    rows = catalog.read(catalog.table("item", mixed["version"])).sort_by("item_id")
    assert rows.num_rows == 200
    assert rows.column("top_columns")[17].as_py()[0] == "segment"
    options = {"unseen_categories": "other", "attribution": False}
    embed(embed_config(mixed, tmp_path / "unseen.parquet", feature_repo, batch="b3", **options))
    plain = catalog.read(catalog.table("item", mixed["version"]), batches=["b3"]).sort_by("item_id")
    assert plain.column("top_columns").to_pylist() == [[]] * 200  # off: empty lists, same scores
    np.testing.assert_allclose(
        plain.column("anomaly_score").to_numpy(), rows.column("anomaly_score").to_numpy(), rtol=1e-5
    )

    wrong = table.set_column(2, "amount", pa.array([str(v) for v in table.column("amount").to_pylist()]))
    pq.write_table(wrong, tmp_path / "wrong.parquet")
    with pytest.raises(
        InputError, match=r"column 'amount' is string; the model version was trained on it as a numeric"
    ):
        embed(embed_config(mixed, tmp_path / "wrong.parquet", feature_repo, batch="b2"))


def test_training_refuses_what_it_cannot_model_naming_the_column(mixed, tmp_path):
    table = mixed["table"].append_column("tags", pa.array([[1, 2]] * ROWS))
    pq.write_table(table, tmp_path / "lists.parquet")
    base = mixed["config"].model_dump(exclude={"data", "run_name"})
    unreadable = r"feature column 'tags' is list<element: int64>, which a mixed model cannot read"
    with pytest.raises(InputError, match=unreadable):
        train(TrainConfig(**base, data=str(tmp_path / "lists.parquet")))
    with pytest.raises(
        InputError, match=r"row item_id=\d+ has no value in column 'amount' \(missing: refuse\)"
    ):
        train(TrainConfig(**{**base, "missing": "refuse"}, data=str(mixed["work"] / "data.parquet")))
    with pytest.raises(InputError, match=r"binary column 'segment'|'segment' is dictionary"):
        train(
            TrainConfig(
                **{**base, "column_types": {"segment": "binary"}}, data=str(mixed["work"] / "data.parquet")
            )
        )


def test_embed_imputes_missing_values_on_request_better_than_mean_and_mode(mixed, feature_repo):
    from vae.impute import imputation_quality

    result = embed(
        embed_config(mixed, mixed["work"] / "data.parquet", feature_repo, batch="imputed", impute=True)
    )
    catalog = StoreSettings.read(feature_repo / "feature_store.yaml").open_catalog()
    location = catalog.table("item", mixed["version"]).location().removeprefix("file://")
    files = list(__import__("pathlib").Path(location).glob("runs/*/imputed/*.parquet"))
    assert files and result.embedded_rows == ROWS
    filled = pq.read_table(files).sort_by("item_id")
    original = mixed["table"]
    assert filled.num_rows == ROWS
    amount, score = (
        original.column("amount").to_numpy(zero_copy_only=False),
        original.column("score").to_numpy(),
    )
    assert filled.column("amount").null_count == 0 and filled.column("score").null_count == 0
    observed = ~np.isnan(amount)
    np.testing.assert_allclose(filled.column("amount").to_numpy()[observed], amount[observed], rtol=1e-4)
    imputed = filled.column("imputed").to_pylist()
    assert [i for i, names in enumerate(imputed) if "amount" in names] == np.flatnonzero(~observed).tolist()
    # amounts missing not at random (fuel only): the model fills them in fuel's range, the mean does not
    fuel = np.asarray(original.column("segment").cast(pa.string()).to_pylist()) == "fuel"
    typical_fuel = np.median(amount[fuel & observed])
    model_miss = abs(np.log(np.median(filled.column("amount").to_numpy()[~observed])) - np.log(typical_fuel))
    mean_miss = abs(np.log(np.mean(amount[observed])) - np.log(typical_fuel))
    assert model_miss < 0.8 * mean_miss
    # held-out entries: the model beats the column mean and mode where the segment explains the column
    loaded = load_model_version(mixed["work"] / "models", mixed["version"])
    report = imputation_quality(
        loaded.model, loaded.features.table, features_to_numpy(original, loaded.features)
    )
    columns = report["columns"]
    assert columns["amount"]["model"] < 0.8 * columns["amount"]["mean"]
    assert columns["score"]["model"] < columns["score"]["mean"]
    assert columns["segment"]["model"] > columns["segment"]["mode"]
    assert columns["card_present"]["model"] >= columns["card_present"]["mode"]
    assert np.isfinite(score[~np.isnan(score)]).all()


def test_a_warm_started_retrain_on_a_window_missing_a_category_keeps_the_layout(mixed, tmp_path):
    """The daily step's retrain warm-starts from the champion: a window where one category never occurs
    (fuel) and a new one appears (rail) used to refit the vocabulary, change the architecture and make
    init_from refuse, on every retry. The vocabulary is inherited: the same layout, the weights carry
    over, the new category trains as other."""
    from vae import load_model_version

    table = mixed["table"]
    segments = pa.array(["rail" if s == "fuel" else s for s in table.column("segment").to_pylist()])
    window = table.set_column(table.schema.get_field_index("segment"), "segment", segments)
    pq.write_table(window, tmp_path / "window.parquet")
    base = mixed["config"].model_dump(exclude={"data", "run_name", "epochs", "init_from"})
    challenger = train(
        TrainConfig(**base, data=str(tmp_path / "window.parquet"), init_from=mixed["version"], epochs=2)
    )
    champion = load_model_version(mixed["config"].model_root, mixed["version"])
    trained = load_model_version(mixed["config"].model_root, challenger)
    assert trained.model.config.column_layout == champion.model.config.column_layout
    segment = {c.name: c for c in trained.features.table.columns}["segment"]
    assert segment.categories == {c.name: c for c in champion.features.table.columns}["segment"].categories
    assert "rail" not in segment.categories and "fuel" in segment.categories
