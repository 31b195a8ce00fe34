"""The embed job on Ray Data: one row per input row, vectors equal to the library's encoder."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs.common import find_input_error
from ray_jobs.embed import EmbedConfig, embed
from vae import InputError, encode_matrix, features_to_numpy, load_model_version


@pytest.fixture(scope="module")
def embedded(trained, tmp_path_factory):
    output = tmp_path_factory.mktemp("embed") / "embeddings"
    config = EmbedConfig(data=str(trained["data"]), model_root=str(trained["model_root"]), output=str(output), batch_size=500)
    return embed(config), trained


def test_one_row_per_input_row_keys_unchanged(embedded):
    directory, _ = embedded
    table = pq.read_table(directory)
    assert table.num_rows == 1797
    assert sorted(table.column("item_id").to_pylist()) == list(range(1797))


def test_output_follows_the_embeddings_contract(embedded):
    directory, trained = embedded
    schema = pq.read_schema(next(directory.glob("*.parquet")))
    assert schema.field("latent").type == pa.list_(pa.float32())
    assert schema.field("anomaly_score").type == pa.float32()
    assert schema.field("model_version").type == pa.string()
    assert schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    table = pq.read_table(directory)
    assert set(table.column("model_version").to_pylist()) == {trained["version"]}
    assert directory.name == trained["version"]


def test_vectors_equal_the_library_encoder(embedded):
    directory, trained = embedded
    table = pq.read_table(directory).sort_by("item_id")
    loaded = load_model_version(trained["model_root"], trained["version"])
    source = pq.read_table(trained["data"]).sort_by("item_id")
    posterior_mean, anomaly_score = encode_matrix(loaded.model, loaded.normalizer, features_to_numpy(source, loaded.features))
    latent = np.stack(table.column("latent").to_numpy(zero_copy_only=False))
    assert latent.shape == (1797, 8)
    np.testing.assert_allclose(latent, posterior_mean, atol=1e-5)
    np.testing.assert_allclose(table.column("anomaly_score").to_numpy(), anomaly_score, rtol=1e-5, atol=1e-4)


def test_rerun_replaces_the_version_without_duplicates(embedded):
    directory, trained = embedded
    config = EmbedConfig(data=str(trained["data"]), model_root=str(trained["model_root"]), output=str(directory.parent))
    again = embed(config)
    assert again == directory
    assert pq.read_table(directory).num_rows == 1797
    assert [p.name for p in directory.parent.parent.iterdir() if ".staging-" in p.name or ".retired-" in p.name] == []


def test_bad_row_fails_and_commits_nothing(trained, tmp_path):
    values = pq.read_table(trained["data"]).column("pixels").combine_chunks().flatten().to_numpy().reshape(-1, 64).copy()
    values[1234, 5] = np.inf
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"item_id": np.arange(len(values)), "pixels": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 64)}), bad)
    output = tmp_path / "embeddings"
    with pytest.raises(Exception) as raised:
        embed(EmbedConfig(data=str(bad), model_root=str(trained["model_root"]), output=str(output)))
    error = find_input_error(raised.value)
    assert error is not None and "row item_id=1234 has NaN or infinite" in str(error)
    assert list(output.iterdir()) == []  # nothing committed
    assert [p for p in tmp_path.iterdir() if ".staging-" in p.name] == []  # staging cleaned up


def test_missing_model_version_is_a_clear_error(trained, tmp_path):
    with pytest.raises(InputError, match="model version 'nope' not found"):
        embed(EmbedConfig(data=str(trained["data"]), model_root=str(trained["model_root"]), model_version="nope",
                          output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_pool_that_would_starve_reads_is_refused(trained, tmp_path):
    with pytest.raises(InputError, match="leave none for reading and writing"):
        embed(EmbedConfig(data=str(trained["data"]), model_root=str(trained["model_root"]), output=str(tmp_path / "out"),
                          num_encoders=2, cpus_per_encoder=1.0))
