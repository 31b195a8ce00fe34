"""The old import path of vae.data.features. Model folders registered in MLflow before the library was
split into subpackages carry a copy of mlflow_pyfunc.py that imports this name from here; they keep
loading. New code imports vae.data.features."""

from vae.data.features import features_to_numpy

__all__ = ["features_to_numpy"]
