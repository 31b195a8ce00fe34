"""Latent monitoring: drift tests calibrated (false alarms <= 5% over 40 random splits) and able to
see a planted input shift, version movement, the monitor job's report rendered in Chromium, the
publish gate, and bad inputs."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import catalog_options, commit_rows
from helpers.cli import flags

from feast_embeddings import EmbeddingsRepo, current_version
from ray_jobs.config import MonitorConfig, PublishConfig
from ray_jobs.monitor import monitor
from ray_jobs.publish import publish
from vae import InputError, encode_matrix, features_to_numpy, load_model_version
from vae.embeddings import contract
from vae.embeddings.catalog import EmbeddingsCatalog
from vae.monitoring.gate import LatentSample, Thresholds, evaluate
from vae.monitoring.statistics import DRIFT_TESTS, drift_test

# Detections out of 10 of a 1 sd shift on 10% of the inputs that each test must reach. Measured (seeded,
# so repeatable): 10 each, covariance 9; at 0.25 sd 6 / 6 / 7 / 2 / 4 (per_dimension, mmd, mean_shift,
# covariance, classifier). False alarms over the 40 halves: 0 / 1 / 1 / 1 / 3.
POWER_AT_ONE_SD = {"per_dimension": 9, "mmd": 9, "mean_shift": 9, "covariance": 7, "classifier": 9}


@pytest.fixture(scope="module")
def digits_encoder(trained):
    loaded = load_model_version(trained["model_root"], trained["version"])
    table = pq.read_table(trained["data"])
    return loaded, features_to_numpy(table, loaded.features)


def encode(loaded, matrix: np.ndarray) -> np.ndarray:
    return encode_matrix(loaded.model, loaded.normalizer, matrix)[0]


def test_drift_false_alarms_stay_below_5_percent_over_40_random_halves(digits_encoder):
    """Calibration: two random halves of one batch are one distribution. The power test below keeps a
    detector that never fires from passing this one."""
    loaded, matrix = digits_encoder
    latents = encode(loaded, matrix)
    alarms, per_test = 0, dict.fromkeys(DRIFT_TESTS, 0)
    for repeat in range(40):
        order = np.random.default_rng(repeat).permutation(len(latents))
        half = len(order) // 2
        result = drift_test(
            latents[order[:half]], latents[order[half:]], alpha=0.05, permutations=100, seed=repeat
        )
        alarms += result["detected"]
        for name, test in result["tests"].items():
            per_test[name] += test["p_value"] < 0.05
    print(f"false alarms over 40 random halves: combined {alarms}, per test {per_test}")
    assert alarms <= 2  # 5% of 40
    assert all(count <= 5 for count in per_test.values()), per_test  # each test's own p-value is valid too


def test_drift_detects_a_planted_shift_in_the_inputs_with_every_test(digits_encoder):
    """0.25 standard deviations added to 10% of the input features of one half (power reported), and a
    shift four times as large, which the combined test and each of the five tests must catch."""
    loaded, matrix = digits_encoder
    spread = matrix.std(axis=0)
    # 10% of the features, the ones that vary
    shifted_features = np.argsort(-spread)[: max(1, matrix.shape[1] // 10)]
    detections = {0.25: 0, 1.0: 0}
    per_test = {size: dict.fromkeys(DRIFT_TESTS, 0) for size in detections}
    for repeat in range(10):
        order = np.random.default_rng(100 + repeat).permutation(len(matrix))
        half = len(order) // 2
        reference = encode(loaded, matrix[order[:half]])
        for size in detections:
            moved = matrix[order[half:]].copy()
            moved[:, shifted_features] += size * spread[shifted_features]
            result = drift_test(reference, encode(loaded, moved), alpha=0.05, permutations=100, seed=repeat)
            detections[size] += result["detected"]
            for name, test in result["tests"].items():
                per_test[size][name] += test["p_value"] < 0.05
    print(
        f"planted shift detected: {detections[0.25]}/10 at 0.25 sd, {detections[1.0]}/10 at 1.0 sd on "
        f"{len(shifted_features)} features; per test {per_test}"
    )
    assert detections[1.0] == 10 and detections[0.25] >= 1
    assert all(count >= POWER_AT_ONE_SD[name] for name, count in per_test[1.0].items()), per_test[1.0]


def test_monitor_job_writes_json_and_an_html_report_that_chromium_renders(versions, tmp_path):
    v1, v2, _ = versions["names"]
    report = monitor(
        MonitorConfig(
            model_version=v2,
            baseline_version=v1,
            output=str(tmp_path / "monitoring"),
            model_root=str(versions["model_root"]),
            **catalog_options(versions),
        )
    )
    saved = json.loads(Path(report["report"]["json"]).read_text())
    assert saved["model_version"] == v2 and saved["rows"] == 1797 and saved["sampled_rows"] == 1797
    assert report["batches"] == ["digits"]  # the version's newest batch
    assert [c["name"] for c in saved["checks"]] == ["collapse", "drift", "movement_cka", "movement_knn"]
    # all rows vs its validation rows: one distribution
    assert saved["passed"] and saved["drift"]["tests"]["mmd"]["p_value"] > 0.01
    assert saved["movement"]["baseline_version"] == v1 and 0.5 < saved["movement"]["linear_cka"] <= 1.0
    assert len(saved["movement"]["top_movers"]) == 20 and saved["anomaly"]["threshold"] is not None

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: `make test` installs it (apt package chromium)"
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            *flags(disable_gpu="--virtual-time-budget=5000", dump_dom=f"file://{report['report']['html']}"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for plot in ("plot-dimensions", "plot-mmd-null", "plot-movement", "plot-anomaly-scores"):
        assert f'id="{plot}"' in dom
    assert 'data-plots-shown="4"' in dom  # every plot decoded as an image in the browser


def sample(latents: np.ndarray, version: str = "v") -> LatentSample:
    return LatentSample(
        "test",
        version,
        np.arange(len(latents)),
        latents,
        np.zeros(len(latents)),
        len(latents),
        latents.var(axis=0),
    )


def test_collapse_check_counts_active_units(versions):
    loaded = load_model_version(versions["model_root"], versions["names"][0])
    latents = np.random.default_rng(0).standard_normal((500, 8))
    latents[:, 2:] *= 0.01  # 6 of 8 units carry nothing
    report, _ = evaluate(sample(latents, versions["names"][0]), loaded, Thresholds(min_active_share=0.5))
    collapse = report["checks"][0]
    assert collapse["name"] == "collapse" and not collapse["passed"] and collapse["value"] == 0.25
    assert "2 of 8 latent units active" in report["failures"][0]
    # a batch too small to test for drift is reported as skipped, not a crash
    tiny, _ = evaluate(sample(latents[:10], versions["names"][0]), loaded, Thresholds())
    assert tiny["checks"][1]["name"] == "drift" and tiny["checks"][1]["detail"].startswith(
        "skipped: too few rows"
    )


def shifted(rows: pa.Table, by: float) -> pa.Table:
    latent = rows.column("latent").combine_chunks()
    moved = pa.ListArray.from_arrays(
        latent.offsets, pa.compute.add(latent.values, pa.scalar(by, pa.float32()))
    )
    return rows.set_column(rows.schema.get_field_index("latent"), "latent", moved)


def test_publish_gate_refuses_drift_and_movement_unless_forced(versions, feature_repo, tmp_path):
    v1, v2, _ = versions["names"]
    repo = EmbeddingsRepo(feature_repo)

    def config(**options) -> PublishConfig:
        return PublishConfig(
            feature_repo=str(feature_repo),
            verify_rows=0,
            monitoring=str(tmp_path / "monitoring"),
            model_root=str(versions["model_root"]),
            **options,
        )

    first = publish(config(model_version=v1))
    assert first["gate"]["passed"] and (tmp_path / "monitoring").is_dir()

    # v2's batch re-committed with its vectors shifted by half a unit: drift against v2's own validation
    # reference
    table = repo.catalog.table("item", v2)
    commit_rows(repo.catalog, table, shifted(repo.catalog.read(table), 0.5), "digits")
    with pytest.raises(
        InputError, match=r"refusing to make .* current: drift: combined p = .*Nothing was written"
    ) as refused:
        publish(config(model_version=v2))
    assert "--force" in str(refused.value)
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(feature_repo))
    assert current_version(repo) == v1
    assert repo.version_view_name("item", v2) not in {
        view.name for view in store.list_feature_views(allow_cache=False)
    }  # nothing applied

    # movement: a demanding CKA threshold fails, and names the value
    with pytest.raises(InputError, match=r"movement_cka: linear CKA 0\.\d+ to .* \(need 0\.9999\)"):
        publish(config(model_version=v2, drift_alpha=1e-300, min_linear_cka=0.9999))

    forced = publish(config(model_version=v2, force=True))
    assert not forced["gate"]["passed"] and current_version(repo) == v2
    # the gate runs where a publish switches "current": the next batch of the current version is not gated
    commit_rows(repo.catalog, table, shifted(repo.catalog.read(table, batches=["digits"]), 0.7), "day-2")
    assert publish(config(model_version=v2))["gate"] is None


def test_monitor_bad_inputs_are_clear_errors(versions, tmp_path):
    v1, v2, _ = versions["names"]
    options = {
        "model_root": str(versions["model_root"]),
        "output": str(tmp_path),
        **catalog_options(versions),
    }
    with pytest.raises(InputError, match="no embeddings for entity 'user' in catalog sqlite:///"):
        monitor(MonitorConfig(entity="user", **options))
    with pytest.raises(InputError, match="has no embeddings by model version 'nope'"):
        monitor(MonitorConfig(model_version="nope", **options))
    with pytest.raises(InputError, match="has no batch 'day-9' \\(newest: digits\\)"):
        monitor(MonitorConfig(model_version=v2, batch="day-9", **options))
    with pytest.raises(InputError, match="did not exist yet at 2020-01-01"):
        monitor(MonitorConfig(model_version=v2, as_of="2020-01-01T00:00:00Z", **options))
    with pytest.raises(InputError, match="a snapshot id or an ISO time"):
        monitor(MonitorConfig(model_version=v2, as_of="yesterday", **options))
    # a version that embedded other entities: movement cannot be measured, and says why
    (tmp_path / "catalog").mkdir()
    shutil.copy(versions["catalog_db"], tmp_path / "catalog" / "catalog.db")
    copy = {**options, "catalog": f"sqlite:///{tmp_path}/catalog/catalog.db"}
    catalog = EmbeddingsCatalog(copy["catalog"], copy["warehouse"])
    rows = catalog.read(catalog.table("item", v1))
    other = catalog.create_table(
        catalog.entity_set("item"), "other-entities", contract.schema("item_id", pa.int64()), {}
    )
    commit_rows(
        catalog, other, rows.set_column(0, "item_id", pa.compute.add(rows.column("item_id"), 100_000)), "b"
    )
    with pytest.raises(
        InputError, match="share 0 sampled entities; movement needs the same rows embedded by both versions"
    ):
        monitor(MonitorConfig(model_version=v2, baseline_version="other-entities", **copy))


def test_larger_than_memory_inputs_read_with_ray_data_give_the_same_sample(versions, ray_cluster):
    from ray_jobs.monitor import read_embeddings

    options = catalog_options(versions)
    catalog = EmbeddingsCatalog(options["catalog"], options["warehouse"])
    table = catalog.table("item", versions["names"][0])
    options = {"model_root": str(versions["model_root"]), "sample_rows": 500, **catalog_options(versions)}
    in_process = read_embeddings(catalog, table, None, MonitorConfig(**options))
    # Ray Data: moments pass + key-hash sample, over the snapshot's data files
    streamed = read_embeddings(catalog, table, ["digits"], MonitorConfig(**options, in_memory_rows=0))
    assert 350 < len(in_process.keys) < 650 and in_process.total_rows == streamed.total_rows == 1797
    order = np.argsort(streamed.keys)
    np.testing.assert_array_equal(np.sort(in_process.keys), streamed.keys[order])
    np.testing.assert_array_equal(in_process.latents[np.argsort(in_process.keys)], streamed.latents[order])
    np.testing.assert_allclose(in_process.variance, streamed.variance, rtol=1e-6, atol=1e-9)
