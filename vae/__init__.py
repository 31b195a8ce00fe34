"""The VAE library: model, ELBO terms, preprocessing and model-version I/O. No Ray, no Feast."""

__version__ = "0.1.0"

from vae.artifacts import ModelVersion, list_model_versions, load_model_version, save_model_version
from vae.encode import encode_matrix
from vae.errors import InputError
from vae.losses import ElboTerms, elbo_terms
from vae.model import VAE, DiagonalGaussian, ModelConfig
from vae.preprocessing import FeatureSchema, FeatureStats, Normalizer, features_to_numpy, infer_feature_schema

__all__ = [
    "VAE",
    "DiagonalGaussian",
    "ElboTerms",
    "FeatureSchema",
    "FeatureStats",
    "InputError",
    "ModelConfig",
    "ModelVersion",
    "Normalizer",
    "elbo_terms",
    "encode_matrix",
    "features_to_numpy",
    "infer_feature_schema",
    "list_model_versions",
    "load_model_version",
    "save_model_version",
]
