"""The VAE library. No Ray, no Feast.

    model, losses, encode, impute, diagnostics, training   the model core (torch only)
    data/         rows -> model inputs: feature schema, mixed tables, normalizer, key hash
    versions/     a trained model as an artifact: the version folder, the MLflow registry, the pyfunc
    embeddings/   embeddings as data: the row contract, the Iceberg catalog, the lease lock, runs
    monitoring/   drift and movement statistics, the gate and its thresholds, reports
    pipeline/     the daily step's pure state and policy: the decision log, trigger, watch, window
    errors, storage   the one error type for bad input; local paths and s3:// with clear errors

Names are imported on first use, so that `import vae.errors` (the job configs, `vaectl --help`)
does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "VAE": "vae.model",
    "DiagonalGaussian": "vae.model",
    "ModelConfig": "vae.model",
    "ElboTerms": "vae.losses",
    "elbo_terms": "vae.losses",
    "FeatureSchema": "vae.data.features",
    "FeatureStats": "vae.data.normalizer",
    "Normalizer": "vae.data.normalizer",
    "features_to_numpy": "vae.data.features",
    "infer_feature_schema": "vae.data.features",
    "InputError": "vae.errors",
    "ModelVersion": "vae.versions.artifacts",
    "ModelVersionInfo": "vae.versions.artifacts",
    "list_model_versions": "vae.versions.artifacts",
    "load_model_version": "vae.versions.artifacts",
    "read_model_version_info": "vae.versions.artifacts",
    "save_model_version": "vae.versions.artifacts",
    "encode_matrix": "vae.encode",
}

__all__ = [
    "VAE",
    "DiagonalGaussian",
    "ElboTerms",
    "FeatureSchema",
    "FeatureStats",
    "InputError",
    "ModelConfig",
    "ModelVersion",
    "ModelVersionInfo",
    "Normalizer",
    "elbo_terms",
    "encode_matrix",
    "features_to_numpy",
    "infer_feature_schema",
    "list_model_versions",
    "load_model_version",
    "read_model_version_info",
    "save_model_version",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vae' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


if TYPE_CHECKING:
    from vae.data.features import FeatureSchema, features_to_numpy, infer_feature_schema
    from vae.data.normalizer import FeatureStats, Normalizer
    from vae.encode import encode_matrix
    from vae.errors import InputError
    from vae.losses import ElboTerms, elbo_terms
    from vae.model import VAE, DiagonalGaussian, ModelConfig
    from vae.versions.artifacts import (
        ModelVersion,
        ModelVersionInfo,
        list_model_versions,
        load_model_version,
        read_model_version_info,
        save_model_version,
    )
