"""Encoding rows that arrive one request at a time (the online service), into the same embedding rows the
batch job writes: the same checks, the same encoder, the same contract (vae.embeddings.contract).

A bad row does not fail the others: each gets the message the embed job would give it, by its position in
the request.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np
import pyarrow as pa

from vae.data.features import features_to_numpy, row_problems
from vae.data.tabular import with_unseen
from vae.embeddings import contract
from vae.embeddings.runs import NOT_FINITE
from vae.encode import attributes, encode_matrix, encode_with_attribution
from vae.versions.artifacts import ModelVersion


@dataclass(frozen=True)
class Encoded:
    """A request's embedding rows (contract schema, request order, bad rows left out) and, per bad row's
    position in the request, why it was not embedded."""

    rows: pa.Table
    errors: dict[int, str]
    positions: np.ndarray  # each embedded row's position in the request
    version: str  # the model version that encoded it

    @property
    def failed(self) -> int:
        """Rows the version failed to embed (its outputs not finite), as opposed to bad input."""
        return sum(message == NOT_FINITE for message in self.errors.values())


class RequestEncoder:
    """One loaded model version, ready to encode requests: as `vae.embeddings.runs.UnitEncoder` does for a
    file, with the threshold and key type fixed when the version is loaded."""

    def __init__(
        self,
        model_version: ModelVersion,
        threshold: float | None,
        key_type: pa.DataType,
        unseen_categories: str = "refuse",
        attribution: bool = True,
        device: str = "cpu",  # where the model is (a GPU replica moves it there)
    ):
        if model_version.features.table is not None:
            table = with_unseen(model_version.features.table, unseen_categories)
            model_version = replace(model_version, features=replace(model_version.features, table=table))
        self.model_version, self.threshold, self.key_type = model_version, threshold, key_type
        self.device = device
        features = model_version.features
        self.attributes = attribution and attributes(model_version.model) and bool(features.feature_columns)

    @property
    def version(self) -> str:
        return self.model_version.version

    def encode(self, request: pa.Table, event_time: datetime, batch_id: str) -> Encoded:
        """Embed a request's rows as of `event_time` (UTC), labelled with `batch_id`."""
        features = self.model_version.features
        errors: dict[int, str] = {}
        absent = [name for name in features.columns if name not in request.column_names]
        if absent:  # no row has the column: every row is bad, and says which column
            reason = f"has no value in column '{absent[0]}'"
            errors = dict.fromkeys(range(request.num_rows), reason)
            return Encoded(self._empty(), errors, np.zeros(0, int), self.version)
        problems = row_problems(request, features)
        good = np.ones(request.num_rows, bool) if problems is None else np.equal(problems, None)
        if problems is not None:
            errors |= {int(i): str(problems[i]) for i in np.flatnonzero(~good)}
        positions = np.flatnonzero(good)
        rows = request.take(pa.array(positions)) if not good.all() else request
        matrix = features_to_numpy(rows, features, validated=True)
        posterior_mean, anomaly_score, surprise = self._encode(matrix)
        finite = np.isfinite(posterior_mean).all(axis=1) & np.isfinite(anomaly_score)
        if not finite.all():
            errors |= {int(positions[i]): NOT_FINITE for i in np.flatnonzero(~finite)}
            rows, positions = rows.filter(pa.array(finite)), positions[finite]
            posterior_mean, anomaly_score, matrix = (
                posterior_mean[finite],
                anomaly_score[finite],
                matrix[finite],
            )
            surprise = None if surprise is None else surprise[finite]
        attribution = None
        if surprise is not None:
            attribution = contract.attribution_columns(
                surprise, features.feature_columns, missing=np.isnan(matrix)
            )
        table = contract.embedding_table(
            rows.column(features.key_column),
            features.key_column,
            self.key_type,
            posterior_mean,
            anomaly_score,
            self.threshold,
            self.version,
            batch_id,
            contract.constant_timestamps(event_time, rows.num_rows),
            attribution,
        )
        return Encoded(table, errors, positions, self.version)

    def _encode(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        model, normalizer = self.model_version.model, self.model_version.normalizer
        if self.attributes:
            return encode_with_attribution(model, normalizer, matrix, self.device)
        return (*encode_matrix(model, normalizer, matrix, self.device), None)

    def _empty(self) -> pa.Table:
        return contract.schema(self.model_version.features.key_column, self.key_type).empty_table()


STREAM_PREFIX = "stream-"


def stream_batch_id(moment: datetime) -> str:
    """The batch that rows embedded on request on a day belong to, e.g. stream-2026-12-07."""
    return f"{STREAM_PREFIX}{moment:%Y-%m-%d}"


def is_stream_batch(batch_id: str) -> bool:
    """Rows embedded on request: no input file to embed again (a backfill leaves them to the daily batch)."""
    return batch_id.startswith(STREAM_PREFIX)
