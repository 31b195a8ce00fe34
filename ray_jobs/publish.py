"""Publish a batch of a model version's embeddings into the Feast feature store, verify it, and
switch "current".

    the version's Iceberg table in the repo's embeddings catalog; the batches committed since the
    version was last written online (all of them on its first publish): the delta
    -> the gate, when this publish switches "current" to the version (vae.monitoring.gate: collapse, drift
       against the version's validation reference, movement against the current version): a
       refusal leaves everything as it was
    -> register the version (catalog record + feast apply of what it records, under one lock)
    -> write the delta online, each key at its latest row (feast_embeddings.writers: in this process
       or Ray writer actors), earlier batches' keys kept
    -> count the version's keys in the store, read the delta's sample back through Feast and compare
    -> record the snapshot written; point the "current" feature service at the version
    -> take versions beyond `keep_online` out of the online store (their offline tables stay)

Downstream models pin a version by its view (`<entity>_embeddings_<version>:latent`) or follow the
latest through the `<entity>_embeddings_current` feature service; every vector carries its
`model_version`. `--rollback` points "current" back at the version the last switch replaced (or at
`--model-version`, named): no re-encoding, no writes, visible to readers within the registry cache TTL
(2 s in the repo's feature_store.yaml). Run twice, it rolls back once.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import pyarrow as pa

from feast_embeddings.delta import Delta, online_delta
from feast_embeddings.publication import resolve_version
from feast_embeddings.repo import EmbeddingsRepo
from feast_embeddings.vectors import index_vectors
from feast_embeddings.verify import (
    check_whole,
    check_written,
    event_nanos,
    fetch_online,
    online_event_times,
    online_row_count,
    verify_online,
)
from feast_embeddings.versions import (
    check_champion,
    finish_writing,
    record_written,
    register_version,
    retire_old_versions,
    rollback,
    switch_current,
)
from feast_embeddings.writers import write_batch, write_table
from ray_jobs import pushgateway
from ray_jobs.cli import run_cli
from ray_jobs.config import PublishConfig, parse_config
from vae import InputError
from vae.embeddings.catalog import model_version_info
from vae.errors import first_line
from vae.killpoints import killpoint
from vae.monitoring.gate import SAMPLED_COLUMNS, LatentSample, comparable, evaluate
from vae.monitoring.report import write_report
from vae.storage import with_retries

log = logging.getLogger("ray_jobs.publish")


def run(config: PublishConfig) -> dict:
    """The CLI's entry: publishes, then pushes its figures when a Pushgateway is configured."""
    started = time.perf_counter()
    summary = publish(config)
    metrics = pushgateway.JobMetrics("publish", config.entity)
    pushgateway.publish_figures(metrics, summary, time.perf_counter() - started)
    metrics.push()
    return summary


def publish(config: PublishConfig) -> dict:
    """Run the whole publish job; returns a summary (version, rows, timings, sample)."""
    repo = EmbeddingsRepo(config.feature_repo, config.feature_store_yaml)
    try:
        return _publish(config, repo)
    except Exception as error:
        # The online store's client errors (Redis: wrong password, unreachable; SQLite: a file it cannot
        # open) are configuration a user fixes; anything else (a table gone) is not blamed on the config.
        module = type(error).__module__.split(".")[0]
        if module == "redis" or (module == "sqlite3" and "unable to open" in str(error)):
            raise InputError(
                f"online store: {type(error).__name__}: {first_line(error)}; check online_store in "
                f"{repo.yaml} (for Redis: REDIS_CONNECTION_STRING and its password)"
            ) from None
        raise


def _publish(config: PublishConfig, repo: EmbeddingsRepo) -> dict:
    entity, catalog = config.entity, repo.catalog
    fix = f"set MLFLOW_TRACKING_URI, or tracking_uri in the mlflow block of {repo.yaml}"
    if config.rollback:  # to the version named, else to the one the last switch replaced
        named = "model_version" in config.model_fields_set
        to = (
            resolve_version(catalog, entity, config.model_version, repo.settings.tracking_uri, fix)
            if named
            else None
        )
        version = rollback(repo, entity, to)
        return {"model_version": version, "rows": 0, "write_seconds": 0.0, "sample": []}
    version = resolve_version(catalog, entity, config.model_version, repo.settings.tracking_uri, fix)
    table = catalog.table(entity, version)
    join_key = catalog.entity_set(entity).join_key
    state = repo.publication(entity)
    written = state.written.get(version) if state.online.get(version) else None
    delta = with_retries(lambda: online_delta(catalog, table, join_key, written), catalog.warehouse)
    log.info(
        "%s %s: %d batch(es) to write online (%s rows, each key's latest)",
        entity,
        version,
        len(delta.batches),
        f"{delta.rows.num_rows:,}",
    )
    switching = config.switch_current and state.current != version
    check_champion(repo, entity, version if switching else None)  # before anything is written
    gate = check_gate(config, repo, version, table, join_key) if switching else None

    started = time.perf_counter()
    register_version(repo, entity, version)
    view = repo.store.get_feature_view(repo.version_view_name(entity, version))
    newer, new_keys = newer_than_online(repo.store, view, delta.rows, join_key)
    rows, writers = write_online(config, repo, view, newer, join_key)
    version_keys = count_keys(repo, entity, version, view, delta, new_keys)
    write_seconds = time.perf_counter() - started
    log.info(
        "wrote %d rows of %s to the online store with %d writer(s) in %.1fs (%.0f rows/s, counted in the "
        "store)",
        rows,
        version,
        writers,
        write_seconds,
        rows / max(write_seconds, 1e-9),
    )
    verify_online(repo.store, view.name, newer, join_key, config.verify_rows)
    record_written(repo, entity, version, delta.mark, version_keys)
    killpoint("publish.recorded_written")
    if config.vector_search:
        index_delta(config, repo, version, table, join_key)
    if config.switch_current:
        switch_current(repo, entity, version)
    sample = show_sample(repo, view.name, newer, join_key, config.show)
    finish_writing(repo, entity, version)
    killpoint("publish.written")
    retired = retire_old_versions(repo, entity, config.keep_online, keep=version)
    return {
        "entity": entity,
        "model_version": version,
        "view": view.name,
        "batches": delta.batches,
        "rows": rows,
        "version_keys": version_keys,
        "new_keys": new_keys,
        "snapshot_id": delta.snapshot_id,
        "writers": writers,
        "write_seconds": write_seconds,
        "sample": sample,
        "retired": retired,
        "gate": gate,
    }


def index_delta(config: PublishConfig, repo: EmbeddingsRepo, version: str, table, join_key: str) -> None:
    """The batches not yet in the vector index (all of them the first time), each key's latest row."""
    indexed = repo.publication(config.entity).indexed.get(version)
    delta = with_retries(lambda: online_delta(repo.catalog, table, join_key, indexed), repo.catalog.warehouse)
    index_vectors(repo, config.entity, version, delta.rows, config.write_batch_rows, config.keep_online)
    repo.update_publication(config.entity, **{f"indexed.{version}": delta.mark})


def check_gate(config: PublishConfig, repo: EmbeddingsRepo, version: str, table, join_key: str) -> dict:
    """Collapse, drift (against the version's validation reference) and movement (against the
    current version, on the entities both embedded): refuse the switch when a check fails, unless
    forced."""
    source = ".".join(table.name())
    rows = repo.catalog.read(table, [join_key, *SAMPLED_COLUMNS])
    new = LatentSample.of_table(rows, source, config.gate_sample_rows)
    try:
        model = model_version_info(table, config.model_root)
    except InputError as error:
        raise InputError(
            f"the publish gate needs model version {version}'s metadata: {error}; set model_root"
        ) from None
    baseline = _baseline(config, repo, version, new, join_key)
    report, arrays = evaluate(new, model, config.thresholds(), baseline=baseline)
    monitoring = config.monitoring or Path(config.feature_repo) / "data" / "monitoring"
    _, html_path = write_report(monitoring, report, arrays)
    if report["passed"]:
        log.info("gate passed (%s); report %s", ", ".join(c["name"] for c in report["checks"]), html_path)
    elif config.force:
        log.warning(
            "gate failed, switching anyway (force): %s; report %s", "; ".join(report["failures"]), html_path
        )
    else:
        raise InputError(
            f"refusing to make {version} current: {'; '.join(report['failures'])}. Nothing was written; "
            f"report: {html_path}. Publish with --force to switch anyway, or --switch-current false to only "
            "pin it"
        )
    return {"passed": report["passed"], "failures": report["failures"], "report": str(html_path)}


def _baseline(
    config: PublishConfig, repo: EmbeddingsRepo, version: str, new: LatentSample, join_key: str
) -> LatentSample | None:
    """A sample of the current version's embeddings, when it shares enough entities with the new one."""
    current = repo.publication(config.entity).current
    if not current or current == version:
        return None
    table = repo.catalog.table(config.entity, current)
    rows = repo.catalog.read(table, [join_key, *SAMPLED_COLUMNS])
    if rows.num_rows == 0:
        log.info("gate: current %s has no rows; movement not checked", current)
        return None
    baseline = LatentSample.of_table(rows, ".".join(table.name()), config.gate_sample_rows)
    if not comparable(new, baseline):
        log.info("gate: %s and current %s share no sampled entities; movement not checked", version, current)
        return None
    return baseline


def newer_than_online(store, view, rows: pa.Table, join_key: str) -> tuple[pa.Table, int]:
    """The rows newer than (or as new as) what their keys hold online, and how many of the keys hold
    nothing yet; one lookup per row of the delta. Stores not covered: every row, new keys unknown (0)."""
    held = online_event_times(store, view, rows.column(join_key), join_key)
    if held is None:
        return rows, 0
    newer = (held < 0) | (event_nanos(rows, store) >= held)
    return rows.filter(pa.array(newer)), int((held < 0).sum())


def count_keys(repo: EmbeddingsRepo, entity: str, version: str, view, delta: Delta, new_keys: int) -> int:
    """The version's keys written online: counted in the store on its first publish (O(version), once),
    then the last count plus the keys this publish added (keys whose TTL ran out come back as new)."""
    known = repo.publication(entity).keys.get(version)
    if delta.first or known is None:
        counted = online_row_count(repo.store, view)  # once: on Redis a scan of every key
        if delta.first:  # the delta is the whole version, one row per key
            check_whole(view, counted, delta.rows.num_rows)
        return counted if counted is not None else new_keys
    return known + new_keys


def write_online(
    config: PublishConfig, repo: EmbeddingsRepo, view, rows: pa.Table, join_key: str
) -> tuple[int, int]:
    """Write rows to the view's online table in Feast's stored format, in this process or over Ray writer
    actors; returns (rows written, writers) once every written key reads back its row's event time.

    SQLite takes one writer at a time, so it is written here, in key order. Redis takes parallel
    writers: with `writers` > 1, deltas of at least `parallel_min_rows` go to that many Ray actors."""
    store = repo.store
    sqlite = store.config.online_store.type == "sqlite"
    if not sqlite and config.writers != 1 and rows.num_rows >= config.parallel_min_rows:
        written, writers = _write_on_ray(config, repo, view.name, rows, join_key)
    else:
        written, writers = write_table(store, view, rows, join_key, config.write_batch_rows), 1
    if written != rows.num_rows:
        raise RuntimeError(
            f"online write of {view.name} did not complete: {rows.num_rows} rows to write, {written} written"
        )
    check_written(store, view, rows, join_key)
    return written, writers


def _write_on_ray(
    config: PublishConfig, repo: EmbeddingsRepo, view_name: str, table: pa.Table, join_key: str
) -> tuple[int, int]:
    """The rows the driver holds, in blocks of write_batch_rows through Ray's object store (not read
    from storage again), written by up to `writers` actors."""
    import ray

    from ray_jobs.cluster import capacity_or_fail, ray_session

    blocks = [
        table.slice(start, config.write_batch_rows)
        for start in range(0, table.num_rows, config.write_batch_rows)
    ]
    with ray_session():
        capacity = capacity_or_fail(
            config.writer_request(), "online writer", "lower cpus_per_writer or check writer_resources"
        )
        writers = min(config.writers, len(blocks), capacity)
        log.info("writing %d blocks online with %d Ray writer(s)", len(blocks), writers)
        arguments = {
            "feature_repo": str(repo.path),
            "fs_yaml_file": repo.yaml,
            "environment": _environment(repo),
            "view_name": view_name,
            "join_key": join_key,
        }
        results = ray.data.from_arrow(blocks).map_batches(
            OnlineWriter,
            fn_constructor_kwargs=arguments,
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=writers, max_tasks_in_flight_per_actor=1),
            num_cpus=config.cpus_per_writer,
            resources=config.writer_resources,
        )
        return int(sum(row["rows"] for row in results.iter_rows())), writers


class OnlineWriter:
    """A Ray Data actor: opens the feature store once, then writes one block of embeddings per call."""

    def __init__(
        self,
        feature_repo: str,
        fs_yaml_file: Path,
        environment: dict[str, str],
        view_name: str,
        join_key: str,
    ):
        from feast import FeatureStore

        os.environ.update(environment)
        self.store = FeatureStore(repo_path=feature_repo, fs_yaml_file=fs_yaml_file)
        self.view = self.store.get_feature_view(view_name)
        self.join_key = join_key

    def __call__(self, batch: pa.Table) -> pa.Table:
        write_batch(self.store, self.view, batch, self.join_key)
        return pa.table({"rows": [batch.num_rows]})


def _environment(repo: EmbeddingsRepo) -> dict[str, str]:
    """The variables feature_store.yaml names (e.g. REDIS_CONNECTION_STRING), for the writer actors to
    open the same store. Passed as actor arguments, not a runtime_env, so a password does not show
    in Ray's dashboard."""
    names = re.findall(r"\$\{(\w+)\}", repo.yaml.read_text())
    return {name: os.environ[name] for name in names if name in os.environ}


def show_sample(repo: EmbeddingsRepo, view_name: str, table: pa.Table, key: str, count: int) -> list[dict]:
    """A few entities of the delta as a consumer reads them, logged."""
    if table.num_rows == 0 or count == 0:
        return []
    sample = fetch_online(repo.store, view_name, table.column(key).to_pylist()[:count], key)
    for entity in sample:
        latent = ", ".join(f"{v:+.3f}" for v in entity["latent"][:4])
        log.info(
            "online %s=%s: latent [%s, ...] anomaly_score %.2f is_anomaly %s model_version %s",
            key,
            entity[key],
            latent,
            entity["anomaly_score"],
            entity["is_anomaly"],
            entity["model_version"],
        )
    return sample


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(PublishConfig, argv, prog="vaectl publish"))


if __name__ == "__main__":
    run_cli(main)
