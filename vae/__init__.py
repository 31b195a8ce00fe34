"""The VAE library: model, ELBO terms, preprocessing, model versions and the embeddings contract.
No Ray, no Feast.

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
    "FeatureSchema": "vae.preprocessing",
    "FeatureStats": "vae.preprocessing",
    "Normalizer": "vae.preprocessing",
    "features_to_numpy": "vae.preprocessing",
    "infer_feature_schema": "vae.preprocessing",
    "InputError": "vae.errors",
    "ModelVersion": "vae.artifacts",
    "ModelVersionInfo": "vae.artifacts",
    "list_model_versions": "vae.artifacts",
    "load_model_version": "vae.artifacts",
    "read_model_version_info": "vae.artifacts",
    "save_model_version": "vae.artifacts",
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
    from vae.artifacts import (
        ModelVersion,
        ModelVersionInfo,
        list_model_versions,
        load_model_version,
        read_model_version_info,
        save_model_version,
    )
    from vae.encode import encode_matrix
    from vae.errors import InputError
    from vae.losses import ElboTerms, elbo_terms
    from vae.model import VAE, DiagonalGaussian, ModelConfig
    from vae.preprocessing import (
        FeatureSchema,
        FeatureStats,
        Normalizer,
        features_to_numpy,
        infer_feature_schema,
    )
