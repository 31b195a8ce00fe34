"""The old import path of vae.versions.artifacts. Model folders registered in MLflow before the library
was split into subpackages carry a copy of mlflow_pyfunc.py that imports these names from here; they
keep loading. New code imports vae.versions.artifacts."""

from vae.versions.artifacts import anomaly_threshold, load_model_version

__all__ = ["anomaly_threshold", "load_model_version"]
