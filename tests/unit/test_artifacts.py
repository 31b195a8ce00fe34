"""Model versions: bit-exact round trip; anything incomplete, tampered or pickled is refused."""

import json

import numpy as np
import pytest
import torch

from vae import (
    VAE,
    FeatureSchema,
    FeatureStats,
    InputError,
    ModelConfig,
    Normalizer,
    load_model_version,
    save_model_version,
)
from vae.versions.artifacts import list_model_versions


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = VAE(ModelConfig(input_dim=6, latent_dim=2, hidden_dims=(8,), likelihood="gaussian"))
    normalizer = Normalizer.fit(
        FeatureStats.of(np.random.default_rng(0).random((20, 6), dtype=np.float32)), "gaussian"
    )
    features = FeatureSchema("item_id", 6, vector_column="vec")
    version = save_model_version(
        tmp_path, model, normalizer, features, {"epochs": 1}, {"loss": 1.0}, {"rows": 20}
    )
    return tmp_path, version, model, normalizer


def test_round_trip_is_bit_exact(saved):
    root, version, model, normalizer = saved
    loaded = load_model_version(root, "latest")
    assert loaded.version == version and list_model_versions(root) == [version]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.normalizer == normalizer
    assert loaded.features == FeatureSchema("item_id", 6, vector_column="vec")
    metadata = json.loads((root / version / "model.json").read_text())
    assert metadata["training"] == {"epochs": 1} and metadata["data"] == {"rows": 20}
    assert not [p for p in root.iterdir() if p.name.startswith(".staging")]


def saved_before_manifests(root, version) -> None:
    """A folder as versions were saved before manifests: model.json's checksums are the only defence."""
    (root / version / "manifest.json").unlink()


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "before-manifests"])
def test_truncated_weights_are_refused(saved, manifest):
    root, version, *_ = saved
    if not manifest:
        saved_before_manifests(root, version)
    weights = root / version / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    expected = "model.safetensors changed" if manifest else "does not match the checksum"
    with pytest.raises(InputError, match=expected):
        load_model_version(root, version)


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "before-manifests"])
def test_tampered_weights_are_refused(saved, manifest):
    root, version, *_ = saved
    if not manifest:
        saved_before_manifests(root, version)
    weights = root / version / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    expected = "model.safetensors changed" if manifest else "does not match the checksum"
    with pytest.raises(InputError, match=expected):
        load_model_version(root, version)


def test_architecture_that_does_not_fit_the_weights_is_refused(saved):
    root, version, *_ = saved
    saved_before_manifests(root, version)  # else the manifest refuses the changed model.json first
    metadata_path = root / version / "model.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["architecture"]["latent_dim"] = 3
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(InputError, match="weights do not fit the architecture"):
        load_model_version(root, version)


def test_pickle_in_place_of_safetensors_is_refused_without_running_it(saved, tmp_path):
    root, version, model, _ = saved
    saved_before_manifests(root, version)  # else the manifest refuses the changed files first
    weights = root / version / "model.safetensors"
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state": model.state_dict(), "payload": Payload()}, weights)
    metadata_path = root / version / "model.json"
    metadata = json.loads(metadata_path.read_text())
    import hashlib

    metadata["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # a careful attacker
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(InputError, match="is corrupt"):
        load_model_version(root, version)
    assert not marker.exists()


def test_incomplete_and_missing_versions_are_refused(saved):
    root, version, *_ = saved
    (root / ".staging-abc").mkdir()  # a crashed save
    (root / "20990101T000000Z-deadbeef").mkdir()  # no model.json: never committed
    assert list_model_versions(root) == [version]
    with pytest.raises(InputError, match="model version '20990101T000000Z-deadbeef' not found"):
        load_model_version(root, "20990101T000000Z-deadbeef")
    with pytest.raises(InputError, match="no model version under"):
        load_model_version(root / "nothing-here")


def test_version_info_reads_the_metadata_without_the_weights(saved):
    from vae.versions.artifacts import read_model_version_info

    root, version, *_ = saved
    (root / version / "model.safetensors").write_bytes(b"not read")  # loading would refuse this version
    info = read_model_version_info(root, "latest")
    assert (info.version, info.metadata["version"], info.metadata["data"]) == (version, version, {"rows": 20})
    with pytest.raises(InputError, match="model.safetensors changed"):
        load_model_version(root, version)
