"""Recipe: the online encoding service. `vaectl serve --entity item [--config serve.yaml]` deploys a Ray
Serve application that embeds rows as they arrive, with the version the feature store serves:

    POST /embed   {"rows": [{"item_id": 7, "pixels": [...]}, ...], "all_or_nothing": false}
                  or an Arrow IPC stream (Content-Type: application/vnd.apache.arrow.stream)
                  -> per row: latent, anomaly_score, is_anomaly, top_columns, top_shares, model_version
    GET  /version the version the replica serves (and its canary)
    GET  /metrics Prometheus metrics of the replica, by model version

Behind the feature store's auth (feast_embeddings.access): with `auth: {type: oidc}`, /embed and /version
take a bearer token, and Feast's permissions decide: writing through needs WRITE_ONLINE (the publisher),
embedding without writing READ_ONLINE (a consumer).

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
import torch

from feast_embeddings.access import AccessControl
from feast_embeddings.publication import resolve_version
from feast_embeddings.repo import EmbeddingsRepo
from feast_embeddings.stream import StreamWriter
from ray_jobs.config import ServeConfig
from vae.embeddings.catalog import model_version_info
from vae.embeddings.contract import latent_matrix
from vae.embeddings.requests import Encoded, RequestEncoder, stream_batch_id
from vae.errors import InputError
from vae.monitoring.canary import VersionHealth, breaches
from vae.pipeline.decisions import Decision, DecisionLog
from vae.versions.artifacts import anomaly_threshold, load_model_version, load_reference
from vae.versions.mlflow_registry import resolve_model_version

log = logging.getLogger(__name__)
ARROW = "application/vnd.apache.arrow.stream"


@dataclass(frozen=True)
class Serving:
    """One loaded version in a replica: its encoder, its write-through, its health under traffic."""

    encoder: RequestEncoder
    writer: StreamWriter | None
    health: VersionHealth
    reference: np.ndarray | None  # its validation posterior means: what its outputs' drift is judged by
    expected_anomaly_rate: float | None  # the share its calibration puts above its threshold

    @property
    def version(self) -> str:
        return self.encoder.version


class EmbeddingService:
    """The service's work without Ray or HTTP: load the current version (and a canary), follow them, embed
    requests, record each version's health and take a canary that breaches its limits out of traffic."""

    def __init__(self, config: ServeConfig, replica: str = "local"):
        self.config, self.replica = config, replica
        self.repo = EmbeddingsRepo(config.feature_repo, config.feature_store_yaml)
        found = self.repo.catalog.entity_set(config.entity)
        self.join_key = found.join_key
        self.key_type = pa.int64() if found.key_type == "int64" else pa.string()
        self.decisions = DecisionLog(self.repo.catalog, config.entity)
        self.access = AccessControl(self.repo.store)
        self.metrics = ServiceMetrics(config.entity)
        self.random = np.random.default_rng()
        self.serving = self.load(self.current_version())
        self.canary = self.load_canary()

    def current_version(self) -> str:
        return resolve_version(self.repo.catalog, self.config.entity, "current")

    def load(self, version: str) -> Serving:
        """A version ready to serve: its folder as its table records it, else under model_root."""
        catalog, entity = self.repo.catalog, self.config.entity
        root = self.config.model_root
        if version in catalog.versions(entity):
            info = model_version_info(catalog.table(entity, version), self.config.model_root)
            root = info.path.rstrip("/").rsplit("/", 1)[0]
        model_version = load_model_version(root, version)
        device = "cuda" if self.config.gpus_per_replica and torch.cuda.is_available() else "cpu"
        model_version.model.to(device).eval()
        threshold = anomaly_threshold(model_version)
        config = self.config
        encoder = RequestEncoder(
            model_version, threshold, self.key_type, config.unseen_categories, config.attribution, device
        )
        writer = self.writer(version) if self.config.write else None
        reference = load_reference(model_version)
        quantile = (model_version.metadata.get("anomaly") or {}).get("quantile")
        log.info("serving %s model version %s", entity, version)
        return Serving(
            encoder,
            writer,
            VersionHealth(version),
            None if reference is None else reference["posterior_mean"],
            None if quantile is None or threshold is None else 1 - quantile,
        )

    def writer(self, version: str) -> StreamWriter:
        from feast.errors import FeastObjectNotFoundException

        config = self.config
        try:
            return StreamWriter(self.repo, config.entity, version, config.commit_seconds, config.commit_rows)
        except FeastObjectNotFoundException:
            raise InputError(
                f"model version {version} has no view in the feature store to write through to: publish "
                f"it first (vaectl publish --model-version {version} --switch-current false), or set "
                "write: false"
            ) from None

    def load_canary(self) -> Serving | None:
        """The configured canary, unless it is the current version or was withdrawn (by any replica)."""
        if self.config.canary is None:
            return None
        fix = "set MLFLOW_TRACKING_URI, or tracking_uri in the feature store's mlflow block"
        _, version = resolve_model_version(self.config.canary.version, self.repo.settings.tracking_uri, fix)
        if version == self.serving.version:
            return None
        if self.withdrawn(version):
            log.warning("canary %s was withdrawn (see the decision log): not serving it", version)
            return None
        return self.load(version)

    def withdrawn(self, version: str) -> bool:
        return any(d.kind == "canary_withdrawn" and d.model_version == version for d in self.decisions.read())

    def follow(self) -> None:
        """Load the current version if it changed; judge the canary; commit the write-through rows due."""
        serving, canary = self.serving, self.canary
        version = self.current_version()
        if version != serving.version:
            promoted = canary is not None and canary.version == version
            self.serving = canary if promoted else self.load(version)  # requests under way keep theirs
            if promoted:
                self.canary = None
            log.info("switched from %s to %s", serving.version, version)
            if serving.writer is not None:
                serving.writer.flush()
        if self.canary is not None:
            self.judge(self.canary)
        for each in (self.serving, self.canary):
            if each is not None:
                self.metrics.observe(each, "canary" if each is self.canary else "current")
                if each.writer is not None and each.writer.due():
                    each.writer.flush()

    def judge(self, canary: Serving) -> None:
        """Withdraw the canary when it breaches a limit, or when another replica withdrew it."""
        if self.withdrawn(canary.version):
            self.canary = None
            log.warning("canary %s withdrawn by another replica", canary.version)
            return
        found = breaches(
            canary.health, self.config.canary.limits(), canary.expected_anomaly_rate, canary.reference
        )
        if not found:
            return
        self.canary = None
        health = canary.health
        detail = {
            "rows": health.rows,
            "requests": health.requests,
            "error_rate": health.error_rate,
            "p99_ms": health.p99_ms(),
            "anomaly_rate": health.anomaly_rate,
            "expected_anomaly_rate": canary.expected_anomaly_rate,
            "drift_p_value": health.drift_p_value(canary.reference),
            "current": self.serving.version,
            "replica": self.replica,
        }
        batch = stream_batch_id(datetime.now(UTC))
        reason = "; ".join(found)
        self.decisions.append([Decision(batch, "canary_withdrawn", canary.version, reason, detail)], "serve")
        log.warning("canary %s taken out of traffic: %s", canary.version, reason)
        if canary.writer is not None:
            canary.writer.flush()

    def close(self) -> None:
        for each in (self.serving, self.canary):
            if each is not None and each.writer is not None:
                each.writer.flush()

    def embed(self, requests: list[tuple[pa.Table, bool]]) -> list[Encoded]:
        """Embed a batch of requests (rows, all_or_nothing): each request goes to the current version or, for
        its share, to the canary; each version's requests are encoded together and written in one write."""
        serving, canary = self.serving, self.canary
        to_canary = np.zeros(len(requests), bool)
        if canary is not None:
            to_canary = self.random.random(len(requests)) < self.config.canary.fraction
        results: list[Encoded | None] = [None] * len(requests)
        for version, chosen in ((serving, np.flatnonzero(~to_canary)), (canary, np.flatnonzero(to_canary))):
            if len(chosen):
                for i, result in zip(
                    chosen, self.embed_with(version, [requests[i] for i in chosen]), strict=True
                ):
                    results[i] = result
        return results

    def embed_with(self, serving: Serving, requests: list[tuple[pa.Table, bool]]) -> list[Encoded]:
        now, started = datetime.now(UTC), time.perf_counter()
        batch_id = stream_batch_id(now)
        try:
            combined = pa.concat_tables([rows for rows, _ in requests], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # requests whose columns do not agree: one at a time
            results = [serving.encoder.encode(rows, now, batch_id) for rows, _ in requests]
        else:
            sizes = [rows.num_rows for rows, _ in requests]
            results = split(serving.encoder.encode(combined, now, batch_id), sizes)
        results = [
            Encoded(r.rows.slice(0, 0), r.errors, r.positions[:0], r.version) if strict and r.errors else r
            for r, (_, strict) in zip(results, requests, strict=True)
        ]
        if serving.writer is not None:
            serving.writer.write(pa.concat_tables([r.rows for r in results]))
        latency_ms = (time.perf_counter() - started) * 1000
        for result in results:
            latents = latent_matrix(result.rows.column("latent"), "the service's output")
            anomalous = result.rows.column("is_anomaly").fill_null(False).to_numpy(zero_copy_only=False)
            serving.health.record(latency_ms, latents, anomalous, result.failed)
            self.metrics.count(serving.version, result, latency_ms)
        return results


class ServiceMetrics:
    """Prometheus metrics of one replica, by model version (GET /<entity>/metrics): the labels the jobs'
    metrics use (entity, model_version), plus the version's role (current or canary)."""

    def __init__(self, entity: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.entity, self.registry = entity, CollectorRegistry()
        labels = ("entity", "model_version")
        self.requests = Counter("vae_serve_requests", "requests encoded", labels, registry=self.registry)
        self.rows = Counter("vae_serve_rows", "rows embedded", labels, registry=self.registry)
        self.bad_rows = Counter(
            "vae_serve_bad_rows", "rows refused as bad input", labels, registry=self.registry
        )
        self.failed_rows = Counter(
            "vae_serve_failed_rows",
            "rows the version failed to embed (outputs not finite)",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "vae_serve_encode_seconds",
            "encoding time of a request's batch",
            labels,
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        role_labels = (*labels, "role")
        self.anomaly_rate = Gauge(
            "vae_serve_anomaly_rate",
            "share of the version's rows above its threshold",
            role_labels,
            registry=self.registry,
        )
        self.drift = Gauge(
            "vae_serve_output_drift_p_value",
            "KS p of its recent outputs against its reference",
            role_labels,
            registry=self.registry,
        )
        self.p99 = Gauge("vae_serve_p99_ms", "p99 encoding time, ms", role_labels, registry=self.registry)

    def count(self, version: str, result: Encoded, latency_ms: float) -> None:
        labels = {"entity": self.entity, "model_version": version}
        self.requests.labels(**labels).inc()
        self.rows.labels(**labels).inc(result.rows.num_rows)
        self.bad_rows.labels(**labels).inc(len(result.errors) - result.failed)
        self.failed_rows.labels(**labels).inc(result.failed)
        self.latency.labels(**labels).observe(latency_ms / 1000)

    def observe(self, serving: Serving, role: str) -> None:
        labels = {"entity": self.entity, "model_version": serving.version, "role": role}
        self.anomaly_rate.labels(**labels).set(serving.health.anomaly_rate)
        self.p99.labels(**labels).set(serving.health.p99_ms())
        p_value = serving.health.drift_p_value(serving.reference)
        if p_value is not None:
            self.drift.labels(**labels).set(p_value)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def split(encoded: Encoded, sizes: list[int]) -> list[Encoded]:
    """One request's share of a batch's result: its rows and errors, positions counted from its first row."""
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)
    parts = []
    for start, end in zip(starts, ends, strict=True):
        first, last = np.searchsorted(encoded.positions, [start, end])
        errors = {p - int(start): e for p, e in encoded.errors.items() if start <= p < end}
        rows = encoded.rows.slice(first, last - first)
        parts.append(Encoded(rows, errors, encoded.positions[first:last] - start, encoded.version))
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
            from ray import serve as ray_serve

            replica = ray_serve.get_replica_context().replica_id.unique_id
            self.service = EmbeddingService(ServeConfig(**values), replica)
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
            return self.service.serving.version

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
        async def embed_batch(self, requests: list[tuple[pa.Table, bool]]) -> list[Encoded]:
            return await asyncio.to_thread(self.service.embed, requests)

        async def refused(self, request: Request, path: str) -> Response | None:
            """The feature store's auth and permissions (feast_embeddings.access); None when allowed."""
            from feast.permissions.action import AuthzedAction

            service = self.service
            if path.endswith("/version"):
                action = AuthzedAction.DESCRIBE
            else:  # with write-through, a caller's rows become vectors in the online store
                action = AuthzedAction.WRITE_ONLINE if service.config.write else AuthzedAction.READ_ONLINE
            view = service.repo.version_view_name(service.config.entity, self.version())
            refusal = await service.access.check(request.headers.get("authorization"), view, action)
            if refusal is None:
                return None
            headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
            return JSONResponse({"error": refusal.reason}, status_code=refusal.status, headers=headers)

        async def __call__(self, request: Request) -> Response:
            path = request.url.path.rstrip("/")
            if path.endswith("/version") and (refused := await self.refused(request, path)) is not None:
                return refused
            if path.endswith("/version"):
                canary = self.service.canary
                return JSONResponse(
                    {"model_version": self.version(), "canary": None if canary is None else canary.version}
                )
            if path.endswith("/metrics"):  # counts only, no vectors: open to the scraper (docs/security.md)
                return Response(self.service.metrics.text(), media_type="text/plain; version=0.0.4")
            if request.method != "POST" or not path.endswith("/embed"):
                return JSONResponse({"error": "POST /embed, GET /version or /metrics"}, status_code=404)
            if (refused := await self.refused(request, path)) is not None:
                return refused
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
            version = result.version
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


def build(args: dict):
    """Ray Serve's application builder, for a RayService's serveConfigV2 or `serve run`:
    import_path ray_jobs.serve:build, args {config: deploy/jobs/serve.yaml, <option>: <value>, ...}.
    The proxy's host and port are the cluster's there, not the config's."""
    from ray_jobs.config import read_yaml_mapping

    values = read_yaml_mapping(args["config"], "config", "option names to values") if "config" in args else {}
    return deployment(ServeConfig(**(values | {k: v for k, v in args.items() if k != "config"})))


def run(config: ServeConfig) -> str:
    """Deploy the service; serve until Ctrl-C unless detached. Returns its URL."""
    from ray import serve

    from ray_jobs.cluster import is_private_cluster, ray_session

    version = served_version(config)  # nothing published: one line, before Ray starts
    with ray_session():
        url = start(config, version)
        if config.detach and not is_private_cluster():
            log.info("deployed; `serve shutdown` or `vaectl serve` again to change it")
            return url
        try:
            while True:
                time.sleep(3600)
        finally:
            serve.shutdown()


def start(config: ServeConfig, version: str | None = None) -> str:
    """Deploy the application on the Ray cluster this process is connected to; returns its /embed URL."""
    from ray import serve

    version = version or served_version(config)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(deployment(config), name=f"vae-{config.entity}", route_prefix=f"/{config.entity}")
    url = f"http://{config.host}:{config.port}/{config.entity}/embed"
    log.info("serving %s embeddings (model version %s) at %s", config.entity, version, url)
    return url


def served_version(config: ServeConfig) -> str:
    """The version the service will serve first; InputError when the entity set has none published."""
    catalog = EmbeddingsRepo(config.feature_repo, config.feature_store_yaml).catalog
    return resolve_version(catalog, config.entity, "current")
