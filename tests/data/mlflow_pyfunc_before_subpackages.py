"""A model folder registered before the library was split into subpackages holds this copy of its pyfunc
code (vae/mlflow_pyfunc.py as it was); tests/integration/test_registry.py checks that such a folder still
loads. Never imported by the project.

A model version as an MLflow pyfunc model, from code (MLflow's "models from code"): registering a
version copies this file into its folder, and `mlflow.pyfunc.load_model(...)` runs it there. It loads
the folder through the project's own loader (checksum verified, safetensors: no pickled object).

predict(frame) takes the columns the version was trained on (its key column too, if present) and
returns what the embed job writes for each row: latent (the posterior mean), anomaly_score and
is_anomaly.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
from mlflow.pyfunc import PythonModel


class VaeModelVersion(PythonModel):
    def __init__(self, folder: Path):
        self.folder = folder

    def load_context(self, context) -> None:
        from vae.artifacts import anomaly_threshold, load_model_version

        self.version = load_model_version(self.folder.parent, self.folder.name)
        self.threshold = anomaly_threshold(self.version)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from vae.encode import encode_matrix
        from vae.preprocessing import features_to_numpy

        table = pa.Table.from_pandas(model_input, preserve_index=False)
        features = self.version.features
        posterior_mean, anomaly_score = encode_matrix(
            self.version.model, self.version.normalizer, features_to_numpy(table, features)
        )
        output = {"latent": list(posterior_mean), "anomaly_score": anomaly_score}
        output["is_anomaly"] = None if self.threshold is None else anomaly_score > self.threshold
        if features.key_column in model_input:
            output = {features.key_column: model_input[features.key_column].to_numpy(), **output}
        return (
            pd.DataFrame(output)
            .assign(model_version=self.version.version)
            .astype({"anomaly_score": np.float32})
        )


mlflow.models.set_model(VaeModelVersion(Path(__file__).parent))
