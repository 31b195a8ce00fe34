"""Immutable model versions: safetensors weights + one JSON document, committed atomically.

    <model_root>/<version>/model.safetensors   weights (never pickle: loading runs no code)
    <model_root>/<version>/model.json          architecture, normalizer, feature schema,
                                               training config, metrics, data fingerprint,
                                               code version, sha256 of the weights
    <model_root>/<version>/report/*.png        training report (loss curves, KL per dim, PCA)

A version is written under <model_root>/.staging-*/ and renamed into place last, so a crash
never leaves a directory that looks complete. Loading verifies the checksum and every tensor
shape before building the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vae.errors import InputError
from vae.model import VAE, ModelConfig
from vae.preprocessing import FeatureSchema, Normalizer

FORMAT = "vae-model-version/1"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
STAGING_PREFIX = ".staging-"


@dataclass
class ModelVersion:
    """A loaded, verified model version: everything needed to encode a dataset."""

    version: str
    path: Path
    model: VAE
    normalizer: Normalizer
    features: FeatureSchema
    metadata: dict[str, Any]


def save_model_version(
    model_root: str | os.PathLike,
    model: VAE,
    normalizer: Normalizer,
    features: FeatureSchema,
    training: dict[str, Any],
    metrics: dict[str, Any],
    data: dict[str, Any],
    report_dir: str | os.PathLike | None = None,
) -> str:
    """Write a new immutable version under model_root and return its name.

    report_dir: files (the training report) copied into <version>/report/ before the commit.
    """
    root = Path(model_root)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
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
            "training": training,
            "metrics": metrics,
            "data": data,
            "code_version": code_version(),
            "weights_sha256": weights_sha256,
        }
        if report_dir is not None:
            shutil.copytree(report_dir, staging / "report")
            metadata["report"] = sorted(p.name for p in (staging / "report").iterdir())
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        os.rename(staging, root / version)  # the commit: atomic on one filesystem
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return version


def list_model_versions(model_root: str | os.PathLike) -> list[str]:
    """Committed versions under model_root, oldest first."""
    root = Path(model_root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / METADATA_FILE).is_file())


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


def load_model_version(model_root: str | os.PathLike, version: str = "latest") -> ModelVersion:
    """Load and verify a version; raise InputError if it is missing, incomplete or tampered with."""
    version = resolve_model_version(model_root, version)
    path = Path(model_root) / version
    try:
        metadata = json.loads((path / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"model version {path}: {METADATA_FILE} is unreadable ({error}); the version is corrupt") from None
    if metadata.get("format") != FORMAT:
        raise InputError(f"model version {path}: format {metadata.get('format')!r} is not {FORMAT!r}")
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file() or _sha256(weights_path) != metadata.get("weights_sha256"):
        raise InputError(
            f"model version {path}: {WEIGHTS_FILE} is missing or does not match the checksum in "
            f"{METADATA_FILE} (truncated or modified); restore it or train a new version"
        )
    try:
        config = ModelConfig.from_dict(metadata["architecture"])
        normalizer = Normalizer.from_dict(metadata["normalizer"])
        features = FeatureSchema.from_dict(metadata["features"])
        weights = load_file(weights_path)
    except (KeyError, TypeError, ValueError, SafetensorError) as error:
        raise InputError(f"model version {path} is corrupt: {error}") from None
    model = VAE(config)
    _check_shapes(model, weights, path)
    model.load_state_dict(weights, strict=True)
    model.eval()
    return ModelVersion(version, path, model, normalizer, features, metadata)


def _check_shapes(model: VAE, weights: dict[str, torch.Tensor], path: Path) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if expected != found:
        differences = sorted(
            f"{name}: expected {expected.get(name)}, found {found.get(name)}"
            for name in expected.keys() | found.keys()
            if expected.get(name) != found.get(name)
        )
        raise InputError(f"model version {path}: weights do not fit the architecture ({'; '.join(differences[:3])})")


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
            ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+g{commit}" if commit else __version__
