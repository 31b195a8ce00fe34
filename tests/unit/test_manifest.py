"""Version manifests: every file a consumer loads or MLflow executes is covered; a changed, added or
missing file is refused by name; with a key, a writer without it cannot forge a manifest."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from vae import (
    VAE,
    FeatureSchema,
    FeatureStats,
    ModelConfig,
    Normalizer,
    load_model_version,
    save_model_version,
)
from vae.versions import manifest
from vae.versions.artifacts import load_reference, read_model_version_info, verify_folder
from vae.versions.manifest import ManifestError


def save(root, **keys):
    torch.manual_seed(0)
    model = VAE(ModelConfig(input_dim=6, latent_dim=2, hidden_dims=(8,), likelihood="gaussian"))
    normalizer = Normalizer.fit(
        FeatureStats.of(np.random.default_rng(0).random((20, 6), dtype=np.float32)), "gaussian"
    )
    reference = {"posterior_mean": np.zeros((5, 2), np.float32), "anomaly_score": np.ones(5, np.float32)}
    return save_model_version(
        root,
        model,
        normalizer,
        FeatureSchema("item_id", 6, vector_column="vec"),
        {"epochs": 1},
        {"loss": 1.0},
        {"rows": 20},
        reference=reference,
        anomaly={"threshold": 1.0},
        profile='{"columns": {}}',
    )


def forge(folder) -> None:
    """What a writer who knows the format but not the key does after changing a file: rewrite the
    manifest's hashes to match."""
    document = json.loads((folder / manifest.MANIFEST_FILE).read_text())
    document["files"] = manifest.folder_hashes(folder)
    (folder / manifest.MANIFEST_FILE).write_text(json.dumps(document))


def ed25519_pair(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "signing.pem").write_bytes(private)
    return str(tmp_path / "signing.pem"), public.decode()


@pytest.fixture(autouse=True)
def no_keys(monkeypatch):
    for name in (manifest.HMAC_ENV, manifest.SIGNING_ENV, manifest.VERIFY_ENV):
        monkeypatch.delenv(name, raising=False)


def test_the_manifest_lists_every_file_of_the_folder(tmp_path):
    version = save(tmp_path)
    folder = tmp_path / version
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    expected = {"model.safetensors", "model.json", "reference.safetensors", "profile.json"}
    assert set(listed) == on_disk == expected
    assert listed["model.safetensors"] == manifest.sha256((folder / "model.safetensors").read_bytes())


@pytest.mark.parametrize(
    "change, named",
    [
        (
            lambda f: (f / "model.json").write_text(
                (f / "model.json").read_text().replace('"loss"', '"lost"')
            ),
            "model.json changed",
        ),
        (lambda f: (f / "reference.safetensors").write_bytes(b"x" * 64), "reference.safetensors changed"),
        (lambda f: (f / "profile.json").unlink(), "profile.json missing"),
        (lambda f: (f / "mlflow_pyfunc.py").write_text("import os\n"), "mlflow_pyfunc.py added"),
    ],
    ids=["model.json", "reference", "missing", "added"],
)
def test_a_changed_added_or_missing_file_is_refused_by_name(tmp_path, change, named):
    version = save(tmp_path)
    change(tmp_path / version)
    with pytest.raises(ManifestError, match=named):
        load_model_version(tmp_path, version)


def test_model_json_is_checked_even_when_only_the_metadata_is_read(tmp_path):
    version = save(tmp_path)
    metadata = tmp_path / version / "model.json"
    metadata.write_text(metadata.read_text().replace('"threshold": 1.0', '"threshold": 99.0'))
    with pytest.raises(ManifestError, match="model.json changed"):
        read_model_version_info(tmp_path, version)


def test_without_a_key_a_forged_manifest_passes_which_is_what_signing_is_for(tmp_path):
    version = save(tmp_path)
    folder = tmp_path / version
    (folder / "reference.safetensors").write_bytes((folder / "reference.safetensors").read_bytes())
    load_reference(read_model_version_info(tmp_path, version))  # untouched: loads
    shutil.copy(folder / "profile.json", folder / "extra.json")
    forge(folder)
    verify_folder(str(folder))  # no key: the hashes are all there is


def test_hmac_signed_manifests_refuse_a_forger_and_a_wrong_key(tmp_path, monkeypatch):
    monkeypatch.setenv(manifest.HMAC_ENV, "publisher-secret")
    version = save(tmp_path)
    folder = tmp_path / version
    assert json.loads((folder / "manifest.json").read_text())["signature"].startswith("hmac-sha256:")
    load_model_version(tmp_path, version)
    monkeypatch.setenv(manifest.HMAC_ENV, "another-secret")
    with pytest.raises(ManifestError, match="signature the HMAC key does not accept"):
        load_model_version(tmp_path, version)
    monkeypatch.setenv(manifest.HMAC_ENV, "publisher-secret")
    (folder / "mlflow_pyfunc.py").write_text("import os\n")
    forge(folder)
    with pytest.raises(ManifestError, match="signature the HMAC key does not accept"):
        load_model_version(tmp_path, version)


def test_ed25519_readers_need_only_the_public_key_and_refuse_unsigned_versions(tmp_path, monkeypatch):
    signing, public = ed25519_pair(tmp_path)
    unsigned = save(tmp_path / "a")  # saved with no key
    monkeypatch.setenv(manifest.SIGNING_ENV, signing)
    version = save(tmp_path / "b")
    monkeypatch.delenv(manifest.SIGNING_ENV)
    monkeypatch.setenv(manifest.VERIFY_ENV, public)  # a consumer: the public key only
    assert load_model_version(tmp_path / "b", version).version == version
    with pytest.raises(ManifestError, match="manifest.json is not signed"):
        load_model_version(tmp_path / "a", unsigned)
    with pytest.raises(ManifestError, match="VAE_MANIFEST_SIGNING_KEY .* is not"):
        save(tmp_path / "c")  # a reader cannot write a version the others would accept
    folder = tmp_path / "b" / version
    (folder / "model.json").write_text((folder / "model.json").read_text().replace('"loss"', '"lost"'))
    forge(folder)
    with pytest.raises(ManifestError, match="signature the ed25519 key does not accept"):
        read_model_version_info(tmp_path / "b", version)


def test_a_version_saved_before_manifests_loads_with_a_warning_unless_a_key_is_set(
    tmp_path, monkeypatch, caplog
):
    version = save(tmp_path)
    (tmp_path / version / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        load_model_version(tmp_path, version)
    assert "has no manifest (saved before manifests)" in caplog.text
    monkeypatch.setenv(manifest.HMAC_ENV, "publisher-secret")
    with pytest.raises(ManifestError, match="has no manifest.json .* a manifest key is set"):
        load_model_version(tmp_path, version)


def test_keys_rotate_readers_accept_old_and_new_while_the_publisher_re_signs(tmp_path, monkeypatch):
    import subprocess
    import sys

    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old_signing, old_public = ed25519_pair(tmp_path / "old")
    new_signing, new_public = ed25519_pair(tmp_path / "new")
    monkeypatch.setenv(manifest.SIGNING_ENV, old_signing)
    version = save(tmp_path / "models")
    # readers first accept both keys; the publisher then signs with the new one and re-signs what is kept
    monkeypatch.delenv(manifest.SIGNING_ENV)
    monkeypatch.setenv(manifest.VERIFY_ENV, old_public + new_public)
    load_model_version(tmp_path / "models", version)
    env = {**os.environ, manifest.SIGNING_ENV: new_signing}
    resigned = subprocess.run(
        [sys.executable, "-m", "vae.versions.artifacts", "resign", str(tmp_path / "models")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resigned.returncode == 0 and f"re-signed {version}" in resigned.stderr, resigned.stderr
    monkeypatch.setenv(manifest.VERIFY_ENV, new_public)  # the old key dropped
    assert load_model_version(tmp_path / "models", version).version == version
    monkeypatch.setenv(manifest.VERIFY_ENV, old_public)
    with pytest.raises(ManifestError, match="ed25519 key does not accept"):
        load_model_version(tmp_path / "models", version)


def test_hmac_rotation_the_first_key_signs_and_any_listed_key_verifies(tmp_path, monkeypatch):
    monkeypatch.setenv(manifest.HMAC_ENV, "old-secret")
    version = save(tmp_path)
    monkeypatch.setenv(manifest.HMAC_ENV, "new-secret,old-secret")
    load_model_version(tmp_path, version)
    from vae.versions.artifacts import resign_model_version

    resign_model_version(tmp_path, version)
    monkeypatch.setenv(manifest.HMAC_ENV, "new-secret")
    load_model_version(tmp_path, version)
