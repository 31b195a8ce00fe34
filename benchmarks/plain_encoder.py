"""The baseline of benchmarks.serve: a plain FastAPI + torch process encoding requests with the same
encoder (vae.embeddings.requests), one request at a time, no Ray, no batching, no write-through.

    PLAIN_MODEL_ROOT=models PLAIN_MODEL_VERSION=<version> python -m uvicorn benchmarks.plain_encoder:app
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pyarrow as pa
import torch
from fastapi import FastAPI, Request

from vae.embeddings.requests import RequestEncoder, stream_batch_id
from vae.versions.artifacts import anomaly_threshold, load_model_version

torch.set_num_threads(1)
version = load_model_version(os.environ["PLAIN_MODEL_ROOT"], os.environ["PLAIN_MODEL_VERSION"])
encoder = RequestEncoder(version, anomaly_threshold(version), pa.int64())
app = FastAPI()


@app.post("/embed")
async def embed(request: Request) -> dict:
    rows = pa.Table.from_pylist((await request.json())["rows"])
    now = datetime.now(UTC)
    result = encoder.encode(rows, now, stream_batch_id(now)).rows.drop_columns(
        ["batch_id", "event_timestamp"]
    )
    return {"model_version": encoder.version, "rows": result.to_pylist()}
