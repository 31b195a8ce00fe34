"""Immutable model versions: safetensors weights + one JSON document, committed atomically.

    <model_root>/<version>/model.safetensors   weights (never pickle: loading runs no code)
    <model_root>/<version>/model.json          architecture, normalizer, feature schema,
                                               training config, metrics, data fingerprint,
                                               code version, sha256 of the weights
    <model_root>/<version>/report/*.png        training report (loss curves, KL per dim, PCA)
    <model_root>/<version>/reference.safetensors  validation rows' posterior means and anomaly
                                               scores: the drift reference and the source of the
                                               anomaly thresholds in model.json
    <model_root>/<version>/profile.json        the training inputs' profile, per column
                                               (vae.monitoring.profile): what batches are checked
                                               against before they count
    <model_root>/<version>/manifest.json       sha256 of every file above (and, once registered, of
                                               MLflow's files), optionally signed (vae.versions.manifest)

model_root is a local path or an s3:// URL. Locally a version is written under
<model_root>/.staging-*/ and renamed into place; on S3 (no rename) the files are uploaded with
model.json last, and only a directory holding model.json counts as a version. Either way a crash
never leaves a version that looks complete. Reading model.json checks it against the manifest (and
the manifest's signature when a key is set); loading checks every file of the folder and every
tensor shape before building the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from vae.data.features import FeatureSchema
from vae.data.normalizer import Normalizer
from vae.errors import InputError
from vae.model import VAE, ModelConfig
from vae.secrets import redact_values
from vae.storage import filesystem, is_local, storage_errors, url_of, write_bytes_atomically
from vae.versions import manifest

log = logging.getLogger("vae.versions.artifacts")

FORMAT = "vae-model-version/1"
WEIGHTS_FILE = "model.safetensors"
REFERENCE_FILE = "reference.safetensors"  # the version's monitoring reference (cf. the checkpoint's .npz)
METADATA_FILE = "model.json"
PROFILE_FILE = "profile.json"
STAGING_PREFIX = ".staging-"


@dataclass
class ModelVersionInfo:
    """A committed version's name, location and model.json, read without touching the weights."""

    version: str
    path: str  # local directory or s3:// URL
    metadata: dict[str, Any]


@dataclass
class ModelVersion(ModelVersionInfo):
    """A loaded, verified model version: everything needed to encode a dataset."""

    model: VAE
    normalizer: Normalizer
    features: FeatureSchema


def save_model_version(
    model_root: str | os.PathLike,
    model: VAE,
    normalizer: Normalizer,
    features: FeatureSchema,
    training: dict[str, Any],
    metrics: dict[str, Any],
    data: dict[str, Any],
    report_dir: str | os.PathLike | None = None,
    reference: dict[str, np.ndarray] | None = None,
    anomaly: dict[str, Any] | None = None,
    profile: str | None = None,
) -> str:
    """Write a new immutable version under model_root and return its name.

    report_dir: files (the training report) copied into <version>/report/ before the commit.
    reference: named float32 arrays (validation posterior means, anomaly scores) saved as
    reference.safetensors; anomaly: the calibrated thresholds, stored in model.json; profile: the
    training inputs' profile (JSON), saved as profile.json.
    """
    fs, root = filesystem(model_root)
    local = is_local(fs)
    if local:
        os.makedirs(root, exist_ok=True)
        # In the root, so that the commit is one rename on one filesystem.
        staging = Path(root) / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
    else:
        staging = Path(tempfile.mkdtemp(prefix="vae-version-"))
    try:
        weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        save_file(weights, staging / WEIGHTS_FILE)
        weights_sha256 = _sha256(staging / WEIGHTS_FILE)
        created = datetime.now(UTC)
        # Sortable by time; the hash suffix tells apart versions made in the same second.
        version = f"{created:%Y%m%dT%H%M%SZ}-{weights_sha256[:8]}"
        metadata = {
            "format": FORMAT,
            "version": version,
            "created_at": created.isoformat(),
            "architecture": model.config.to_dict(),
            "normalizer": normalizer.to_dict(),
            "features": features.to_dict(),
            # whatever a config or a data location carried in a URI stays out of the folder
            "training": redact_values(training),
            "metrics": metrics,
            "data": redact_values(data),
            "code_version": code_version(),
            "weights_sha256": weights_sha256,
        }
        metadata |= _write_extras(staging, reference, anomaly, report_dir)
        if profile is not None:
            (staging / PROFILE_FILE).write_text(profile)
            metadata["profile_sha256"] = _sha256(staging / PROFILE_FILE)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        manifest.write_manifest(staging, version)
        _commit(fs, root, staging, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return version


def _write_extras(staging: Path, reference: dict | None, anomaly: dict | None, report_dir) -> dict[str, Any]:
    """The reference sample, the anomaly calibration and the report: files and their model.json entries."""
    entries: dict[str, Any] = {}
    if reference is not None:
        tensors = {
            name: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for name, v in reference.items()
        }
        save_file(tensors, staging / REFERENCE_FILE)
        entries["reference_sha256"] = _sha256(staging / REFERENCE_FILE)
    if anomaly is not None:
        entries["anomaly"] = anomaly
    if report_dir is not None:
        shutil.copytree(report_dir, staging / "report")
        entries["report"] = sorted(p.name for p in (staging / "report").iterdir())
    return entries


def _commit(fs, root: str, staging: Path, version: str) -> None:
    """Locally one rename (atomic on one filesystem); on S3 every file uploaded, model.json last."""
    if is_local(fs):
        os.rename(staging, Path(root) / version)
        return
    with storage_errors(url_of(fs, root)):
        for path in sorted(staging.rglob("*")):
            if path.is_file() and path.name != METADATA_FILE:
                fs.put_file(str(path), f"{root}/{version}/{path.relative_to(staging).as_posix()}")
        fs.put_file(str(staging / METADATA_FILE), f"{root}/{version}/{METADATA_FILE}")


def list_model_versions(model_root: str | os.PathLike) -> list[str]:
    """Committed versions under model_root (those with model.json), oldest first."""
    fs, root = filesystem(model_root)
    with storage_errors(url_of(fs, root)):
        if not fs.isdir(root):
            return []
        names = [entry.rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False, refresh=True)]
        return sorted(n for n in names if not n.startswith(".") and fs.isfile(f"{root}/{n}/{METADATA_FILE}"))


def resolve_model_version(model_root: str | os.PathLike, version: str = "latest") -> str:
    versions = list_model_versions(model_root)
    if version == "latest":
        if not versions:
            raise InputError(f"no model version under {model_root}; train one first (vaectl train)")
        return versions[-1]
    if version not in versions:
        known = ", ".join(versions[-5:]) or "none"
        raise InputError(f"model version '{version}' not found under {model_root} (latest: {known})")
    return version


def read_model_version_info(model_root: str | os.PathLike, version: str = "latest") -> ModelVersionInfo:
    """A version's model.json (for its metadata, thresholds, reference), without loading the weights."""
    version = resolve_model_version(model_root, version)
    fs, root = filesystem(model_root)
    path = url_of(fs, f"{root}/{version}")
    try:
        with storage_errors(path):
            metadata_bytes = fs.cat_file(f"{root}/{version}/{METADATA_FILE}")
        metadata = json.loads(metadata_bytes)
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(
            f"model version {path}: {METADATA_FILE} is unreadable ({error}); the version is corrupt"
        ) from None
    listed = read_manifest(path)
    if listed is not None:
        if listed.get(METADATA_FILE) != manifest.sha256(metadata_bytes):
            raise manifest.ManifestError(
                f"model version {path} does not match its manifest: {METADATA_FILE} changed; someone or "
                "something changed the folder after it was saved. Restore it or train a new version"
            )
    if metadata.get("format") != FORMAT:
        raise InputError(f"model version {path}: format {metadata.get('format')!r} is not {FORMAT!r}")
    return ModelVersionInfo(version, path, metadata)


def load_model_version(model_root: str | os.PathLike, version: str = "latest") -> ModelVersion:
    """Load and verify a version; raise InputError if it is missing, incomplete or tampered with."""
    info = read_model_version_info(model_root, version)
    fs, path = filesystem(info.path)
    try:
        with storage_errors(info.path):
            weights_bytes = fs.cat_file(f"{path}/{WEIGHTS_FILE}")
    except OSError:
        weights_bytes = None
    verify_folder(info.path, {WEIGHTS_FILE: weights_bytes} if weights_bytes is not None else {})
    if weights_bytes is None or hashlib.sha256(weights_bytes).hexdigest() != info.metadata.get(
        "weights_sha256"
    ):
        raise InputError(
            f"model version {info.path}: {WEIGHTS_FILE} is missing or does not match the checksum in "
            f"{METADATA_FILE} (truncated or modified); restore it or train a new version"
        )
    try:
        config = ModelConfig.from_dict(info.metadata["architecture"])
        normalizer = Normalizer.from_dict(info.metadata["normalizer"])
        features = FeatureSchema.from_dict(info.metadata["features"])
        weights = load_safetensors(weights_bytes)
    except (KeyError, TypeError, ValueError, SafetensorError) as error:
        raise InputError(f"model version {info.path} is corrupt: {error}") from None
    model = VAE(config)
    _check_shapes(model, weights, info.path)
    model.load_state_dict(weights, strict=True)
    model.eval()
    return ModelVersion(info.version, info.path, info.metadata, model, normalizer, features)


_UNLISTED: set[str] = set()  # folders without a manifest already warned about


def read_manifest(where: str) -> dict[str, str] | None:
    """The files a version folder's manifest lists (path -> sha256), its signature checked; None for a
    folder saved before manifests (then only the checksums in model.json are checked), refused when a
    manifest key is set."""
    fs, path = filesystem(where)
    try:
        with storage_errors(where):
            data = fs.cat_file(f"{path}/{manifest.MANIFEST_FILE}")
    except FileNotFoundError:
        if manifest.signing_required():
            raise manifest.ManifestError(
                f"model version {where} has no {manifest.MANIFEST_FILE} (saved before manifests, or it was "
                "removed) and a manifest key is set; refusing to load it"
            ) from None
        if where not in _UNLISTED:
            _UNLISTED.add(where)
            log.warning(
                "model version %s has no manifest (saved before manifests): only its weights, reference "
                "and profile are checked; train a new version to have every file checked",
                where,
            )
        return None
    return manifest.parse(where, data)


def verify_folder(where: str, already_read: dict[str, bytes] | None = None) -> dict[str, str] | None:
    """Refuse a version folder with a file changed, added or missing against its manifest, naming it;
    the files the manifest lists (None, and nothing checked, for a folder saved before manifests)."""
    listed = read_manifest(where)
    if listed is None:
        return None
    fs, path = filesystem(where)
    hashes = {}
    with storage_errors(where):
        for found in sorted(fs.find(path)):
            name = found[len(path) :].lstrip("/")
            if name == manifest.MANIFEST_FILE or name.startswith(f"{manifest.MANIFEST_FILE}.tmp-"):
                continue  # the manifest itself, or what a crash left of rewriting it (never loaded)
            data = (already_read or {}).get(name)
            hashes[name] = manifest.sha256(data if data is not None else fs.cat_file(found))
    manifest.check_files(where, listed, hashes)
    return listed


def load_reference(version: ModelVersionInfo) -> dict[str, np.ndarray] | None:
    """The version's reference sample (validation posterior means and anomaly scores), checksum
    verified; None for a version saved without one."""
    data = _verified_file(version, REFERENCE_FILE, "reference_sha256")
    return None if data is None else {name: t.numpy() for name, t in load_safetensors(data).items()}


def load_profile_text(version: ModelVersionInfo) -> str | None:
    """The version's training input profile (JSON), checksum verified; None for a version saved
    without one (before input profiles)."""
    data = _verified_file(version, PROFILE_FILE, "profile_sha256")
    return None if data is None else data.decode()


def _verified_file(version: ModelVersionInfo, name: str, checksum: str) -> bytes | None:
    """A file of the version whose sha256 model.json records under `checksum`; None if it records none."""
    expected = version.metadata.get(checksum)
    if expected is None:
        return None
    fs, path = filesystem(version.path)
    try:
        with storage_errors(version.path):
            data = fs.cat_file(f"{path}/{name}")
    except OSError:
        data = None
    if data is None or hashlib.sha256(data).hexdigest() != expected:
        raise InputError(
            f"model version {version.path}: {name} is missing or does not match its checksum; the "
            "version is corrupt"
        )
    return data


def anomaly_threshold(version: ModelVersionInfo, quantile: float | None = None) -> float | None:
    """The anomaly_score above which a row is flagged: the version's calibrated threshold, or the
    given quantile of its validation scores; None for a version saved without a calibration."""
    from vae.monitoring.statistics import anomaly_thresholds

    if quantile is None:
        return (version.metadata.get("anomaly") or {}).get("threshold")
    reference = load_reference(version)
    if reference is None:
        raise InputError(
            f"model version {version.version} has no validation reference to take the {quantile} quantile of "
            "(saved before anomaly calibration); leave anomaly_quantile unset or train a new version"
        )
    return anomaly_thresholds(reference["anomaly_score"], (quantile,))[str(quantile)]


def _check_shapes(model: VAE, weights: dict[str, torch.Tensor], path: str) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if expected != found:
        differences = sorted(
            f"{name}: expected {expected.get(name)}, found {found.get(name)}"
            for name in expected.keys() | found.keys()
            if expected.get(name) != found.get(name)
        )
        raise InputError(
            f"model version {path}: weights do not fit the architecture ({'; '.join(differences[:3])})"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    from vae import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+g{commit}" if commit else __version__


def resign_model_version(model_root: str | os.PathLike, version: str) -> None:
    """Sign a version's manifest again with the environment's signing key (key rotation): only a folder
    that matches its manifest, under a signature one of the accepted keys verifies, is re-signed."""
    info = read_model_version_info(model_root, version)
    listed = verify_folder(info.path)
    if listed is None:
        raise manifest.ManifestError(
            f"model version {info.path} has no manifest to sign (saved before manifests)"
        )
    fs, path = filesystem(info.path)
    with storage_errors(info.path):
        write_bytes_atomically(
            fs, f"{path}/{manifest.MANIFEST_FILE}", manifest.manifest_bytes(version, listed)
        )


if __name__ == "__main__":  # python -m vae.versions.artifacts resign <model_root> [version ...]
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "resign":
        sys.exit("usage: python -m vae.versions.artifacts resign <model_root> [version ...]")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in sys.argv[3:] or list_model_versions(sys.argv[2]):
        resign_model_version(sys.argv[2], name)
        log.info("re-signed %s", name)
