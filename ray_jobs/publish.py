"""Publish a model version's embeddings into the Feast feature store, verify them, and switch "current".

    register the repo's definitions + this version's feature view (feast apply) -> write the
    version's embeddings to the online store -> read a sample back through Feast and compare ->
    point the "current" feature service at the version (one registry write) -> take versions
    beyond `keep_online` out of the online store (their offline data stays)

Downstream models pin a version by its view (`item_embeddings_<version>:latent`) or follow the
latest through the `item_embeddings_current` feature service; every vector carries its
`model_version`. `--rollback` points "current" back at the previous version: no re-encoding, no
writes, visible to readers within the registry cache TTL (2 s in the repo's feature_store.yaml).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from pydantic import Field

from ray_jobs import feast_online
from ray_jobs.common import parquet_schema, parse_config, run_cli
from ray_jobs.monitor import GateThresholds, comparable, evaluate, find_model_version, read_embeddings, write_report
from vae import InputError
from vae.storage import filesystem, storage_errors, url_of

log = logging.getLogger("ray_jobs.publish")

EMBEDDING_COLUMNS = ("latent", "anomaly_score", "is_anomaly", "model_version", "event_timestamp")
VERSION_TAG = "vae_model_version"
PUBLISHED_TAG = "vae_published_at"


class PublishConfig(GateThresholds):
    """Register the Feast definitions, write a model version's embeddings online, switch "current"."""

    embeddings: str = Field("feature_repo/data/embeddings", description="embeddings root written by the embed job (local or s3://)")
    model_version: str = Field("latest", description="version directory under the embeddings root, or 'latest'")
    feature_repo: str = Field("feature_repo", description="Feast repo directory (feature_store.yaml + definitions)")
    feature_store_yaml: str | None = Field(None, description="another feature_store.yaml for the same definitions, e.g. "
                                           "deploy/feature_store.yaml: registry on S3, Redis (default: the repo's)")
    switch_current: bool = Field(True, description="point the 'current' feature service at this version after verifying it")
    rollback: bool = Field(False, description="only point 'current' back at the previous version (no writes)")
    keep_online: int = Field(2, ge=1, description="model versions kept in the online store (current always kept)")
    write_batch_rows: int = Field(65_536, gt=0, description="rows per online write call (SQLite: per transaction)")
    # 1 by default: on the 2-core dev machine one in-process writer beat two Ray writers (Redis
    # shares the cores); more pay off where Redis runs on its own machines.
    writers: int = Field(1, gt=0, description="online writers for Redis: 1 = this process, N > 1 = N Ray actors; SQLite has one writer")
    cpus_per_writer: float = Field(1.0, gt=0, description="CPUs reserved by each Ray writer (asks for no GPU: kept off GPU nodes)")
    writer_resources: dict[str, float] = Field({}, description="extra Ray resources each Ray writer needs (pins it to node types)")
    parallel_min_rows: int = Field(100_000, ge=0, description="below this many rows write in this process (Ray start-up costs more)")
    verify_rows: int = Field(256, ge=0, description="rows read back through Feast and compared after writing")
    vector_search: bool = Field(False, description="also index the version for similarity search (Milvus Lite, <feature_repo>/vector_search)")
    show: int = Field(3, ge=0, description="entities to fetch and print at the end")
    # the gate before switching "current" (thresholds: min_active_share, drift_alpha, min_linear_cka, min_knn_overlap)
    force: bool = Field(False, description="switch 'current' even when a monitoring check fails (the report is still written)")
    model_root: str = Field("models", description="where the model version lives, if not at the path in the embeddings manifest")
    monitoring: str | None = Field(None, description="the gate's reports go to <monitoring>/<version>-<time>/, local or s3:// "
                                   "(default: <feature_repo>/data/monitoring)")
    gate_sample_rows: int = Field(5000, ge=100, description="rows per side the gate's drift and movement checks use")


def publish(config: PublishConfig) -> dict:
    """Run the whole publish job; returns a summary (version, rows, timings, sample)."""
    try:
        return _publish(config)
    except Exception as error:
        # The online store's client errors (Redis: wrong password, unreachable) are configuration a user fixes.
        if type(error).__module__.split(".")[0] in {"redis", "sqlite3"}:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"online store: {type(error).__name__}: {first_line}; check online_store in "
                             f"{store_yaml(config)} (for Redis: REDIS_CONNECTION_STRING and its password)") from None
        raise


def _publish(config: PublishConfig) -> dict:
    from feast import FeatureStore

    started = time.perf_counter()
    # The definitions read the embeddings location from here, as `feast apply` would.
    os.environ["VAE_EMBEDDINGS_PATH"] = root = embeddings_root(config)
    repo = load_repo(Path(config.feature_repo))
    store = FeatureStore(repo_path=str(Path(config.feature_repo).absolute()), fs_yaml_file=store_yaml(config))
    if config.rollback:
        return {"model_version": rollback(store, repo), "rows": 0, "write_seconds": 0.0, "sample": []}

    version_dir = _version_directory(root, config.model_version)
    version = version_dir.rpartition("/")[2]
    view = repo.version_view(version)
    view.tags[PUBLISHED_TAG] = datetime.now(UTC).isoformat()  # keep_online keeps the most recently published
    join_key = view.entity_columns[0].name  # the entity's join key, known from the view's schema
    schema = parquet_schema(version_dir)
    missing = [c for c in (join_key, *EMBEDDING_COLUMNS) if c not in schema.names]
    if missing:
        raise InputError(
            f"{version_dir}: missing column(s) {', '.join(missing)}; the feature views join on "
            f"'{join_key}' (edit {config.feature_repo}/features.py if your key column is named differently)"
        )
    gate = None
    if config.switch_current:
        gate = check_gate(config, store, repo, version, version_dir)  # before any write: a refusal leaves everything as it was
    store.apply([*definitions(repo), view])

    fs, path = filesystem(version_dir)
    with storage_errors(version_dir):
        table = pads.dataset(path, format="parquet", filesystem=fs).to_table(columns=[join_key, *EMBEDDING_COLUMNS])
    rows, writers = write_online(store, config, view.name, version_dir, table, join_key)
    write_seconds = time.perf_counter() - started
    log.info("wrote %d rows of %s to the online store with %d writer(s) in %.1fs (%.0f rows/s, counted in the store)",
             rows, version, writers, write_seconds, rows / write_seconds)
    verify_online(store, view.name, table, join_key, config.verify_rows)
    if config.vector_search:
        index_vectors(config, repo, version, table, join_key)

    if config.switch_current:
        switch_current(store, repo, version)
    retired = retire_old_versions(store, config.keep_online, current_version(store, repo), repo.version_view)
    sample = fetch_online(store, view.name, table.column(join_key).to_pylist()[: config.show], join_key)
    for entity in sample:
        latent = ", ".join(f"{v:+.3f}" for v in entity["latent"][:4])
        log.info("online %s=%s: latent [%s, ...] anomaly_score %.2f is_anomaly %s model_version %s",
                 join_key, entity[join_key], latent, entity["anomaly_score"], entity["is_anomaly"], entity["model_version"])
    return {"model_version": version, "view": view.name, "rows": rows, "writers": writers, "write_seconds": write_seconds,
            "sample": sample, "retired": retired, "gate": gate}


def check_gate(config: PublishConfig, store, repo: ModuleType, version: str, version_dir: str) -> dict:
    """Collapse, drift (against the version's validation reference) and movement (against the
    current version, on the entities both embedded): refuse the switch when a check fails, unless forced."""
    new = read_embeddings(version_dir, config.gate_sample_rows)
    try:
        model = find_model_version(version_dir, config.model_root, version)
    except InputError as error:
        raise InputError(f"the publish gate needs model version {version}'s metadata: {error}; set model_root") from None
    current = current_version(store, repo)
    baseline = None
    fs, root = filesystem(embeddings_root(config))
    if current and current != version and fs.isdir(f"{root}/{current}"):
        baseline = read_embeddings(url_of(fs, f"{root}/{current}"), config.gate_sample_rows)
        if not comparable(new, baseline):
            log.info("gate: %s and current %s share no sampled entities; movement not checked", version, current)
            baseline = None
    report, arrays = evaluate(new, model, config, baseline=baseline)
    _, html_path = write_report(config.monitoring or Path(config.feature_repo) / "data" / "monitoring", report, arrays)
    if report["passed"]:
        log.info("gate passed (%s); report %s", ", ".join(c["name"] for c in report["checks"]), html_path)
    elif config.force:
        log.warning("gate failed, switching anyway (force): %s; report %s", "; ".join(report["failures"]), html_path)
    else:
        raise InputError(f"refusing to make {version} current: {'; '.join(report['failures'])}. Nothing was written; "
                         f"report: {html_path}. Publish with --force to switch anyway, or --switch-current false to only pin it")
    return {"passed": report["passed"], "failures": report["failures"], "report": str(html_path)}


def write_online(store, config: PublishConfig, view_name: str, version_dir: str, table: pa.Table, join_key: str) -> tuple[int, int]:
    """Write a version's rows to its view's online table in Feast's stored format, in this process
    or spread over Ray actors; returns (rows written, writers) after checking that the store holds
    exactly one row per key.

    SQLite takes one writer at a time, so it is written here, in key order. Redis takes parallel
    writers: with `writers` > 1, versions of at least `parallel_min_rows` go to that many Ray actors."""
    view = store.get_feature_view(view_name)
    parallel = store.config.online_store.type != "sqlite" and config.writers != 1 and table.num_rows >= config.parallel_min_rows
    if parallel:
        written, writers = _write_online_on_ray(config, view_name, version_dir, join_key)
    else:
        writers = 1
        order = feast_online.sqlite_key_order(table.column(join_key)) if store.config.online_store.type == "sqlite" else None
        ordered = table.take(pa.array(order)) if order is not None else table
        for batch in ordered.to_batches(max_chunksize=config.write_batch_rows):
            feast_online.write_batch(store, view, batch, join_key)
        written = table.num_rows
    stored = online_row_count(store, view)
    distinct = len(pc.unique(table.column(join_key)))
    if written != table.num_rows or (stored is not None and stored != distinct):
        raise RuntimeError(f"online write of {view_name} did not complete: {table.num_rows} rows to write, {written} written, "
                           f"{stored} keys in the online store for {distinct} distinct keys")
    return written, writers


class OnlineWriter:
    """A Ray Data actor: opens the feature store once, then writes one row group of embeddings per call."""

    def __init__(self, feature_repo: str, fs_yaml_file: Path, environment: dict[str, str], view_name: str, join_key: str,
                 write_batch_rows: int):
        from feast import FeatureStore

        os.environ.update(environment)
        self.store = FeatureStore(repo_path=feature_repo, fs_yaml_file=fs_yaml_file)
        self.view = self.store.get_feature_view(view_name)
        self.join_key, self.write_batch_rows = join_key, write_batch_rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        written = []
        for url, row_group in zip(batch["path"], batch["row_group"]):
            fs, path = filesystem(str(url))
            with fs.open(path, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(int(row_group), columns=[self.join_key, *EMBEDDING_COLUMNS])
            for chunk in table.to_batches(max_chunksize=self.write_batch_rows):
                feast_online.write_batch(self.store, self.view, chunk, self.join_key)
            written.append(table.num_rows)
        return {"rows": np.array(written)}


def _write_online_on_ray(config: PublishConfig, view_name: str, version_dir: str, join_key: str) -> tuple[int, int]:
    import pyarrow.parquet as pq
    import ray

    from ray_jobs.common import alive_node_resources, describe, node_capacity, ray_session

    fs, root = filesystem(version_dir)
    units = []
    with storage_errors(version_dir):
        for path in sorted(fs.glob(f"{root}/*.parquet")):
            with fs.open(path, "rb") as f:
                units += [{"path": url_of(fs, path), "row_group": group} for group in range(pq.ParquetFile(f).num_row_groups)]
    with ray_session():
        request = writer_request(config)
        if (capacity := node_capacity(request, alive_node_resources())) < 1:
            raise InputError(f"no node of the cluster holds one online writer ({describe(request)}); lower cpus_per_writer "
                             "or check writer_resources")
        writers = min(config.writers, len(units), capacity)
        log.info("writing %d row groups online with %d Ray writer(s)", len(units), writers)
        results = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            OnlineWriter,
            fn_constructor_kwargs={"feature_repo": str(Path(config.feature_repo).absolute()), "fs_yaml_file": store_yaml(config),
                                   "environment": _repo_environment(config),
                                   "view_name": view_name, "join_key": join_key, "write_batch_rows": config.write_batch_rows},
            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=writers, max_tasks_in_flight_per_actor=1),
            num_cpus=config.cpus_per_writer, resources=config.writer_resources,
        )
        return int(sum(row["rows"] for row in results.iter_rows())), writers


def writer_request(config: PublishConfig) -> dict[str, float]:
    """The Ray resources of one online writer actor, all from config (never a GPU)."""
    request = {"CPU": config.cpus_per_writer, **config.writer_resources}
    return {name: amount for name, amount in request.items() if amount > 0}


def store_yaml(config: PublishConfig) -> Path:
    """The feature_store.yaml in use: the option's, or the repo's own."""
    path = Path(config.feature_store_yaml) if config.feature_store_yaml else Path(config.feature_repo) / "feature_store.yaml"
    if not path.is_file():
        raise InputError(f"{path}: no such feature_store.yaml")
    return path.absolute()


def _repo_environment(config: PublishConfig) -> dict[str, str]:
    """What the writer actors need to open the same store as this process: the embeddings location
    and the variables feature_store.yaml names (e.g. REDIS_CONNECTION_STRING). Passed as actor
    arguments, not a runtime_env, so a password does not show in Ray's dashboard."""
    names = re.findall(r"\$\{(\w+)\}", store_yaml(config).read_text())
    return {"VAE_EMBEDDINGS_PATH": embeddings_root(config)} | {n: os.environ[n] for n in names if n in os.environ}


def online_row_count(store, view) -> int | None:
    """Keys the online store holds for a view, read from the store itself (None for stores not covered).

    Counted, not trusted: Feast's own Ray engine has reported success after writing nothing."""
    online = store.config.online_store
    if online.type == "sqlite":
        import sqlite3

        from feast.infra.online_stores.helpers import compute_table_id

        path = Path(online.path) if Path(online.path).is_absolute() else Path(store.repo_path) / online.path
        table = compute_table_id(store.project, view, store.config.registry.enable_online_feature_view_versioning)
        with contextlib.closing(sqlite3.connect(path)) as connection:
            return connection.execute(f'SELECT COUNT(DISTINCT entity_key) FROM "{table}"').fetchone()[0]
    if online.type == "redis":
        client = store._get_provider().online_store._get_client(online)
        field = f"_ts:{view.name}".encode()
        count = 0
        for keys in _chunks(client.scan_iter(count=10_000), 100_000):
            count += sum(feast_online.send_commands(client, [feast_online.redis_command(b"HEXISTS", key, field) for key in keys]))
        return count
    return None


def _chunks(iterable, size: int):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def current_version(store, repo: ModuleType) -> str | None:
    """The model version the 'current' feature service points at, or None before the first publish."""
    from feast.errors import FeatureServiceNotFoundException

    try:
        return store.get_feature_service(repo.CURRENT_SERVICE, allow_cache=False).tags.get(VERSION_TAG)
    except FeatureServiceNotFoundException:
        return None


def current_features(store, service_name: str = "item_embeddings_current") -> list[str]:
    """The feature references ("view:feature") of the version 'current' points at, read from one
    registry snapshot. Pass these to get_online_features / get_historical_features, not the
    FeatureService object: Feast 0.67 reads a service twice per request (the object passed in, and
    again from the registry) and raises FeatureViewNotFoundException when a publish or rollback
    switches 'current' in between. References name one version's view, which stays in the registry."""
    service = store.get_feature_service(service_name)
    return [f"{projection.name_to_use()}:{feature.name}"
            for projection in service.feature_view_projections for feature in projection.features]


def switch_current(store, repo: ModuleType, version: str) -> None:
    """Point 'current' at an online version. One registry write: a reader resolves the service once
    per request, so it gets all of its vectors from one version, before or after the switch."""
    view = store.get_feature_view(repo.version_view_name(version))
    if not view.online:
        raise InputError(f"model version {version} is not in the online store any more; publish it again "
                         f"(vaectl publish --model-version {version})")
    previous = current_version(store, repo)
    if previous == version:
        return
    store.apply([repo.current_service(view, previous_version=previous or "")])
    log.info("current: %s -> %s", previous or "(none)", version)


def rollback(store, repo: ModuleType) -> str:
    """Point 'current' back at the version it pointed at before the last switch."""
    current = current_version(store, repo)
    if current is None:
        raise InputError("nothing to roll back: no version has been published as current")
    service = store.get_feature_service(repo.CURRENT_SERVICE, allow_cache=False)
    previous = service.tags.get("vae_previous_version")
    if not previous:
        raise InputError(f"current is {current} and has no previous version to roll back to")
    switch_current(store, repo, previous)
    return previous


def retire_old_versions(store, keep_online: int, current: str | None, make_view) -> list[str]:
    """Take versions beyond the `keep_online` most recently published (current always kept) out of the online store.

    Their feature views stay registered with online=False (re-made by `make_view`), so offline
    retrieval by version works as before; only the online rows are dropped."""
    online = sorted((v for v in store.list_feature_views(allow_cache=False) if VERSION_TAG in v.tags and v.online),
                    key=lambda v: (v.tags.get(PUBLISHED_TAG, ""), v.tags[VERSION_TAG]), reverse=True)
    others = [v.tags[VERSION_TAG] for v in online if v.tags[VERSION_TAG] != current]
    keep = ({current} if current else set()) | set(others[: keep_online - (1 if current else 0)])
    retired = [v for v in online if v.tags[VERSION_TAG] not in keep]
    if retired:
        store.apply([make_view(v.tags[VERSION_TAG], online=False) for v in retired])
        # apply() keeps online tables of views it updates; dropping them is the provider's infra update.
        store._get_provider().update_infra(
            project=store.project, tables_to_delete=retired, tables_to_keep=[], entities_to_delete=[], entities_to_keep=[],
            partial=False,
        )
        log.info("removed from the %s online store (offline data kept): %s", store.config.online_store.type,
                 ", ".join(v.tags[VERSION_TAG] for v in retired))
    return [v.tags[VERSION_TAG] for v in retired]


def index_vectors(config: PublishConfig, repo: ModuleType, version: str, table: pa.Table, join_key: str) -> None:
    """Write a version's vectors to the vector-search store (one collection per version), check that
    each sampled vector finds itself, and keep `keep_online` versions there too."""
    from feast import FeatureStore

    path = Path(config.feature_repo).absolute() / "vector_search"
    if not (path / "feature_store.yaml").is_file():
        raise InputError(f"{path}: no feature_store.yaml for vector search (the project's feature_repo/vector_search has one)")
    store = FeatureStore(repo_path=str(path))
    latent = table.column("latent")
    dim = len(latent[0]) if len(latent) else 0
    expected = store.config.online_store.embedding_dim
    if dim != expected:
        raise InputError(f"{path / 'feature_store.yaml'}: embedding_dim is {expected} but model version {version} has "
                         f"{dim}-d latents; set embedding_dim: {dim} (one vector-search repo per latent size)")
    store.apply([repo.item, repo.vector_view(version)])
    view = store.get_feature_view(repo.vector_view_name(version))
    started = time.perf_counter()
    for batch in table.to_batches(max_chunksize=config.write_batch_rows):
        feast_online.write_batch(store, view, batch, join_key)
    log.info("indexed %d vectors of %s for search in %.1fs", table.num_rows, version, time.perf_counter() - started)
    # Each sampled vector's nearest neighbour is itself (distance 0), unless another key has the very same vector.
    picks = np.random.default_rng(0).choice(table.num_rows, size=min(16, table.num_rows), replace=False)
    for row in table.take(pa.array(picks)).to_pylist():
        hits = search_similar(store, view.name, row["latent"], 1, join_key)
        if not hits or hits[0]["distance"] > 1e-6:
            raise RuntimeError(f"vector index verification failed: {join_key}={row[join_key]!r} finds {hits[:1]} instead of itself")
    retire_old_versions(store, config.keep_online, None, repo.vector_view)


def search_similar(store, view_name: str, vector, top_k: int, join_key: str = "item_id") -> list[dict]:
    """The `top_k` nearest entities to `vector` (squared L2) in one version's vector view:
    [{join_key, distance, model_version}], nearest first.

    Feast 0.67 returns the keys in rank order but the feature columns (distance, model_version) in
    the order of the sorted keys, and the query itself as every hit's `latent`; the columns are put
    back in rank order here (only when that is what makes the distances ascending, so a fixed Feast
    passes through unchanged). Fetch a hit's own vector by its key from the version's online view."""
    response = store.retrieve_online_documents_v2(
        features=[f"{view_name}:latent", f"{view_name}:model_version"], query=list(map(float, vector)), top_k=top_k,
        distance_metric="L2",
    ).to_dict()
    keys, distances, versions = response[join_key], response["distance"], response["model_version"]
    by_key = sorted(range(len(keys)), key=keys.__getitem__)
    if not _ascending(distances) and _ascending([distances[j] for j in by_key]):
        distances, versions = [distances[j] for j in by_key], [versions[j] for j in by_key]
    return [{join_key: key, "distance": distance, "model_version": version} for key, distance, version in zip(keys, distances, versions)]


def _ascending(values: list) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))


def load_repo(feature_repo: Path) -> ModuleType:
    """The repo's features.py as a module: its Feast objects and the per-version view factory."""
    path = feature_repo / "features.py"
    if not path.is_file():
        raise InputError(f"{feature_repo}: no features.py with the Feast definitions")
    spec = importlib.util.spec_from_file_location("feature_repo_features", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def definitions(repo: ModuleType) -> list:
    """The Feast objects defined at module level, as `feast apply` would collect them."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    return [v for v in vars(repo).values() if isinstance(v, (Entity, FeatureView, FeatureService, DataSource))]


def fetch_online(store, feature_view: str, keys: list, join_key: str) -> list[dict]:
    """Online features for the keys, one dict per entity."""
    response = store.get_online_features(
        features=[f"{feature_view}:{name}" for name in ("latent", "anomaly_score", "is_anomaly", "model_version")],
        entity_rows=[{join_key: key} for key in keys],
    ).to_dict()
    return [dict(zip(response, values)) for values in zip(*response.values())]


def verify_online(store, feature_view: str, table: pa.Table, join_key: str, sample_rows: int) -> None:
    """Read a seeded random sample back through Feast; every vector must equal the Parquet one."""
    if sample_rows == 0 or table.num_rows == 0:
        return
    picks = np.random.default_rng(0).choice(table.num_rows, size=min(sample_rows, table.num_rows), replace=False)
    expected = table.take(pa.array(picks)).to_pylist()
    fetched = fetch_online(store, feature_view, [row[join_key] for row in expected], join_key)
    for want, got in zip(expected, fetched):
        if got["latent"] is None or got["model_version"] != want["model_version"] or not np.array_equal(
            np.asarray(got["latent"], np.float32), np.asarray(want["latent"], np.float32)
        ):
            raise RuntimeError(
                f"publish verification failed: {join_key}={want[join_key]!r} reads back "
                f"{got['model_version']!r} / {got['latent'] and got['latent'][:3]}, expected {want['model_version']!r}"
            )
    log.info("verified %d online rows against the embeddings Parquet", len(expected))


def embeddings_root(config: PublishConfig) -> str:
    """The embeddings root as every process and Feast should see it: an absolute path, or the URL."""
    fs, root = filesystem(config.embeddings)
    return url_of(fs, root)


def _version_directory(root: str, version: str) -> str:
    """<root>/<version> (local or s3://); 'latest' is the newest version there."""
    fs, path = filesystem(root)
    with storage_errors(root):
        fs.invalidate_cache(path)  # s3fs caches listings: a version another process just wrote must be seen
        entries = fs.ls(path, detail=True) if fs.isdir(path) else []  # one listing, types included
    names = [entry["name"].rstrip("/").rpartition("/")[2] for entry in entries if entry["type"] == "directory"]
    versions = sorted(name for name in names if not name.startswith((".", "_")))
    if version == "latest":
        if not versions:
            raise InputError(f"{root}: no embeddings found; run the embed job first (vaectl embed)")
        version = versions[-1]
    elif version not in versions:
        raise InputError(f"{root}: no embeddings for model version '{version}' (have: {', '.join(versions[-5:]) or 'none'})")
    return url_of(fs, f"{path}/{version}")


def main(argv: list[str] | None = None) -> dict:
    return publish(parse_config(PublishConfig, argv, prog="vaectl publish"))


if __name__ == "__main__":
    run_cli(main)
