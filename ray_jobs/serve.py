"""Recipe: the online encoding service. `vaectl serve --entity item [--config serve.yaml]` deploys a Ray
Serve application that embeds rows as they arrive, with the version the feature store serves:

    POST /embed   {"rows": [{"item_id": 7, "pixels": [...]}, ...], "all_or_nothing": false}
                  or an Arrow IPC stream (Content-Type: application/vnd.apache.arrow.stream)
                  -> per row: latent, anomaly_score, is_anomaly, top_columns, top_shares, model_version
    GET  /version the version the replica serves

Requests are batched (@serve.batch); each replica follows 'current' (a publish switch or a rollback) by
loading the new version beside the old one and swapping them between batches, so no request fails during
a switch, and every response names the version that made it. Write-through (write: true): each batch to
Feast's online store in one write, and to the version's Iceberg table as the day's `stream-<date>` batch in
micro-commits (feast_embeddings.stream).

A bad row gets the embed job's message by its position; the others are embedded, and the answer is 422
with both ("rows" and "errors"). all_or_nothing: one bad row and nothing is embedded or written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from feast_embeddings.publication import resolve_version
from feast_embeddings.repo import EmbeddingsRepo
from feast_embeddings.stream import StreamWriter
from ray_jobs.config import ServeConfig
from vae.embeddings.catalog import model_version_info
from vae.embeddings.requests import Encoded, RequestEncoder, stream_batch_id
from vae.errors import InputError
from vae.versions.artifacts import anomaly_threshold, load_model_version

log = logging.getLogger(__name__)
ARROW = "application/vnd.apache.arrow.stream"


@dataclass(frozen=True)
class Serving:
    """What a replica serves now: one loaded version and its write-through."""

    encoder: RequestEncoder
    writer: StreamWriter | None


class EmbeddingService:
    """The service's work without Ray or HTTP: load the current version, follow it, embed requests."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.repo = EmbeddingsRepo(config.feature_repo, config.feature_store_yaml)
        found = self.repo.catalog.entity_set(config.entity)
        self.join_key = found.join_key
        self.key_type = pa.int64() if found.key_type == "int64" else pa.string()
        self.serving = self.load(self.current_version())

    def current_version(self) -> str:
        return resolve_version(self.repo.catalog, self.config.entity, "current")

    def load(self, version: str) -> Serving:
        """A version ready to serve: its folder as its table records it (else under model_root)."""
        table = self.repo.catalog.table(self.config.entity, version)
        info = model_version_info(table, self.config.model_root)
        model_version = load_model_version(info.path.rstrip("/").rsplit("/", 1)[0], version)
        model_version.model.eval()
        encoder = RequestEncoder(
            model_version,
            anomaly_threshold(model_version),
            self.key_type,
            self.config.unseen_categories,
            self.config.attribution,
        )
        writer = None
        if self.config.write:
            config = self.config
            writer = StreamWriter(
                self.repo, config.entity, version, config.commit_seconds, config.commit_rows
            )
        log.info("serving %s model version %s", self.config.entity, version)
        return Serving(encoder, writer)

    def follow(self) -> None:
        """Load the current version if it changed; commit the write-through rows that are due."""
        serving = self.serving
        version = self.current_version()
        if version != serving.encoder.version:
            self.serving = self.load(version)  # requests already encoding keep the version they took
            log.info("switched from %s to %s", serving.encoder.version, version)
            if serving.writer is not None:
                serving.writer.flush()
        elif serving.writer is not None and serving.writer.due():
            serving.writer.flush()

    def close(self) -> None:
        if self.serving.writer is not None:
            self.serving.writer.flush()

    def embed(self, requests: list[tuple[pa.Table, bool]]) -> list[Encoded]:
        """Embed a batch of requests (rows, all_or_nothing) with one version, written through in one write."""
        serving, now = self.serving, datetime.now(UTC)
        batch_id = stream_batch_id(now)
        try:
            combined = pa.concat_tables([rows for rows, _ in requests], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # requests whose columns do not agree: one at a time
            results = [serving.encoder.encode(rows, now, batch_id) for rows, _ in requests]
        else:
            results = split(
                serving.encoder.encode(combined, now, batch_id), [r.num_rows for r, _ in requests]
            )
        results = [
            Encoded(r.rows.slice(0, 0), r.errors, r.positions[:0]) if strict and r.errors else r
            for r, (_, strict) in zip(results, requests, strict=True)
        ]
        if serving.writer is not None:
            serving.writer.write(pa.concat_tables([r.rows for r in results]))
        return results


def split(encoded: Encoded, sizes: list[int]) -> list[Encoded]:
    """One request's share of a batch's result: its rows and errors, positions counted from its first row."""
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)
    parts = []
    for start, end in zip(starts, ends, strict=True):
        first, last = np.searchsorted(encoded.positions, [start, end])
        errors = {p - int(start): e for p, e in encoded.errors.items() if start <= p < end}
        parts.append(
            Encoded(encoded.rows.slice(first, last - first), errors, encoded.positions[first:last] - start)
        )
    return parts


def request_rows(
    body: bytes, content_type: str, join_key: str, key_type: pa.DataType
) -> tuple[pa.Table, bool]:
    """(rows, all_or_nothing) of a request body; InputError for a body that is not rows."""
    if content_type.startswith(ARROW):
        try:
            rows, strict = pa.ipc.open_stream(body).read_all(), False
        except pa.ArrowInvalid as error:
            raise InputError(f"the body is not an Arrow IPC stream: {error}") from None
    else:
        try:
            payload = json.loads(body or b"null")
        except ValueError as error:
            raise InputError(f"the body is not JSON: {error}") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
            raise InputError('expected a JSON object {"rows": [{...}, ...]}, one object per row')
        if not all(isinstance(row, dict) for row in payload["rows"]):
            raise InputError('each of "rows" must be an object of column names to values')
        try:
            rows = pa.Table.from_pylist(payload["rows"])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise InputError(f"rows whose columns hold values of different types: {error}") from None
        strict = bool(payload.get("all_or_nothing", False))
    if join_key not in rows.column_names:
        raise InputError(f"no row has the key column '{join_key}'")
    try:
        rows = rows.set_column(
            rows.column_names.index(join_key), join_key, rows.column(join_key).cast(key_type)
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"column '{join_key}' must hold {key_type} keys") from None
    return rows, strict


def response_body(result: Encoded, version: str) -> dict:
    rows = result.rows.drop_columns(["batch_id"])
    rows = rows.set_column(
        rows.column_names.index("event_timestamp"),
        "event_timestamp",
        pa.array([t.isoformat() for t in rows.column("event_timestamp").to_pylist()], pa.string()),
    )
    errors = [{"row": row, "error": f"row {row} {message}"} for row, message in sorted(result.errors.items())]
    return {"model_version": version, "rows": rows.to_pylist(), "errors": errors}


def deployment(config: ServeConfig):
    """The Serve application: one deployment of `config.replicas` replicas (or autoscaled)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    # no access log: a line per request through the driver costs more than encoding the request
    quiet = {"enable_access_log": False}

    @serve.deployment(
        name=f"vae-{config.entity}-encoder", logging_config=quiet, **config.deployment_options()
    )
    class Encoder:
        def __init__(self, values: dict):
            logging.basicConfig(level=logging.INFO)
            logging.getLogger("feast").setLevel(logging.WARNING)
            self.service = EmbeddingService(ServeConfig(**values))
            self.embed_batch.set_max_batch_size(values["max_batch_size"])
            self.embed_batch.set_batch_wait_timeout_s(values["batch_wait_seconds"])
            self.stopped = threading.Event()
            threading.Thread(target=self.follow, daemon=True).start()

        def follow(self) -> None:
            while not self.stopped.wait(self.service.config.follow_seconds):
                try:
                    self.service.follow()
                except Exception:  # the catalog or a folder unreachable for a moment: keep serving
                    log.exception("following the current version failed; serving %s", self.version())

        def version(self) -> str:
            return self.service.serving.encoder.version

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
        async def embed_batch(self, requests: list[tuple[pa.Table, bool]]) -> list[Encoded]:
            return await asyncio.to_thread(self.service.embed, requests)

        async def __call__(self, request: Request) -> Response:
            if request.url.path.rstrip("/").endswith("/version"):
                return JSONResponse({"model_version": self.version()})
            if request.method != "POST" or not request.url.path.rstrip("/").endswith("/embed"):
                return JSONResponse({"error": "POST /embed, or GET /version"}, status_code=404)
            service = self.service
            try:
                rows = request_rows(
                    await request.body(),
                    request.headers.get("content-type", ""),
                    service.join_key,
                    service.key_type,
                )
            except InputError as error:
                return JSONResponse({"error": str(error)}, status_code=422)
            result = await self.embed_batch(rows)
            version = (
                result.rows.column("model_version")[0].as_py() if result.rows.num_rows else self.version()
            )
            if request.headers.get("content-type", "").startswith(ARROW) and not result.errors:
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, result.rows.schema) as stream:
                    stream.write_table(result.rows)
                return Response(
                    sink.getvalue().to_pybytes(), media_type=ARROW, headers={"x-model-version": version}
                )
            return JSONResponse(response_body(result, version), status_code=422 if result.errors else 200)

        def __del__(self):
            self.stopped.set()
            self.service.close()

    return Encoder.bind(config.model_dump())


def run(config: ServeConfig) -> str:
    """Deploy the service; serve until Ctrl-C unless detached. Returns its URL."""
    from ray import serve

    from ray_jobs.cluster import is_private_cluster, ray_session

    served_version(config)  # nothing published: one line, before Ray starts
    with ray_session():
        url = start(config)
        if config.detach and not is_private_cluster():
            log.info("deployed; `serve shutdown` or `vaectl serve` again to change it")
            return url
        try:
            while True:
                time.sleep(3600)
        finally:
            serve.shutdown()


def start(config: ServeConfig) -> str:
    """Deploy the application on the Ray cluster this process is connected to; returns its /embed URL."""
    from ray import serve

    version = served_version(config)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(deployment(config), name=f"vae-{config.entity}", route_prefix=f"/{config.entity}")
    url = f"http://{config.host}:{config.port}/{config.entity}/embed"
    log.info("serving %s embeddings (model version %s) at %s", config.entity, version, url)
    return url


def served_version(config: ServeConfig) -> str:
    """The version the service will serve first; InputError when the entity set has none published."""
    catalog = EmbeddingsRepo(config.feature_repo, config.feature_store_yaml).catalog
    return resolve_version(catalog, config.entity, "current")
