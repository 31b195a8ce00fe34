"""Embed a Parquet dataset with a model version: a Ray Data batch job that lands exactly once, as one
batch of the version's Apache Iceberg table.

    plan (driver)    load and verify the model version; list the input, check every file's schema
                     against it, cut the row groups into work units (vae.embeddings.runs.plan_run);
                     the entity set and the version's table in the catalog (vae.embeddings.catalog)
    start (driver)   the run's staging directory in the table's location, named by a hash of the
                     batch, the plan and the settings; finished units of an earlier attempt are kept
    encode (Ray)     a pool of encoder actors, each running vae.embeddings.runs.UnitEncoder on one
                     unit at a time: read -> validate (fail or quarantine) -> encode -> one file
    commit (driver)  input rows = embedded + quarantined, duplicate keys settled, one Iceberg commit
                     that replaces the batch's rows (another batch's are never touched)

A run that dies is resumed by running the same command again. Readers (Feast, monitor, publish) see
a batch whole or not at all.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from ray_jobs import pushgateway
from ray_jobs.cli import find_input_error, run_cli
from ray_jobs.cluster import alive_node_resources, capacity_or_fail, ray_session
from ray_jobs.config import EmbedConfig, parse_config
from vae import InputError, load_model_version
from vae.embeddings import contract
from vae.embeddings.catalog import EmbeddingsCatalog, Properties
from vae.embeddings.runs import (
    EmbedResult,
    EncodeOptions,
    Plan,
    RunPaths,
    UnitEncoder,
    WorkUnit,
    batch_id_of,
    batch_time,
    check_batch_id,
    commit_run,
    discard_run,
    plan_run,
    run_id,
    start_run,
)
from vae.errors import StorageRefused
from vae.storage import with_retries
from vae.versions.artifacts import ModelVersion, anomaly_threshold
from vae.versions.mlflow_registry import MODELS_URI, resolve_model_version

log = logging.getLogger("ray_jobs.embed")


def run(config: EmbedConfig) -> EmbedResult:
    """The CLI's entry: embeds, then pushes the run's figures when a Pushgateway is configured."""
    result = embed(config)
    metrics = pushgateway.JobMetrics("embed", config.entity)
    pushgateway.embed_figures(metrics, result)
    metrics.push()
    return result


def embed(config: EmbedConfig) -> EmbedResult:
    """Run the whole embedding job; everything is checked before Ray starts."""
    (result,) = embed_batches([config])
    return result


@dataclass
class BatchRun:
    """One batch of an embedding job: its input's plan, its output settings, its staging."""

    config: EmbedConfig
    plan: Plan
    options: EncodeOptions
    paths: RunPaths
    pending: list[WorkUnit]


def embed_batches(configs: list[EmbedConfig]) -> list[EmbedResult]:
    """Several batches of one model version (a backfill) as one job: each planned and started, every
    pending unit of every batch encoded by one pool of actors (or in this process), then each batch
    committed on its own, in order. One batch is `vaectl embed`."""
    started = time.time()
    first = with_version_folder(configs[0])
    version_of = {"model_root": first.model_root, "model_version": first.model_version}
    configs = [config.model_copy(update=version_of) for config in configs]
    model_version = with_retries(  # 'latest' resolved, verified
        lambda: load_model_version(first.model_root, first.model_version), first.model_root
    )
    # every input checked against the model before anything is created (bad input leaves no catalog)
    plans = [plan_batch(config, model_version) for config in configs]
    catalog = EmbeddingsCatalog(*first.catalog_settings())
    runs = [
        start_batch(config, model_version, catalog, *plan)
        for config, plan in zip(configs, plans, strict=True)
    ]
    table = catalog.table(first.entity, model_version.version)
    try:
        summaries = encode_batches(first, model_version, runs)
        results = [
            commit_batch(catalog, table, model_version, run, summaries[i], started)
            for i, run in enumerate(runs)
        ]
    except Exception as error:
        # Bad input must change before a run can succeed, so its staged files are of no use (unless the
        # run already landed: discard_run never removes what a snapshot references). Anything else (a
        # lost node, a killed driver, storage that stayed unavailable) keeps them for the re-run.
        bad_input = find_input_error(error)
        refused = isinstance(bad_input, StorageRefused) or "committed by another run" in str(bad_input)
        if bad_input is not None and not refused and len(runs) == 1:
            discard_run(runs[0].paths, table)
        raise
    for run, result, batch_summaries in zip(runs, results, summaries, strict=True):
        _log_result(result, run.paths, batch_summaries)
    return results


def plan_batch(config: EmbedConfig, model_version: ModelVersion) -> tuple[Plan, EncodeOptions]:
    """A batch's work units, every footer checked against the model, and its output settings."""
    plan = plan_run(config.data, model_version.features, config.rows_per_file, config.timestamp_column)
    return plan, encode_options(config, model_version, plan)


def start_batch(
    config: EmbedConfig,
    model_version: ModelVersion,
    catalog: EmbeddingsCatalog,
    plan: Plan,
    options: EncodeOptions,
) -> BatchRun:
    """Make the version's table (registering the entity set on first use) and start the batch's run."""
    entity = catalog.register(config.entity, model_version.features.key_column, plan.key_type)
    schema = contract.schema(entity.join_key, _arrow_key(plan.key_type))
    retention = str(int(config.snapshot_retention_hours * 3600 * 1000))
    table = catalog.create_table(
        entity,
        model_version.version,
        schema,
        {Properties.MODEL_PATH: model_version.path, Properties.MAX_SNAPSHOT_AGE_MS: retention},
    )
    run = run_id(config.data, model_version.version, plan.listing, options, config.rows_per_file)
    paths = RunPaths.of(table.location(), options.batch_id, run)
    marker = {
        "run_id": run,
        "batch_id": options.batch_id,
        "model_version": model_version.version,
        "data": config.data,
        "units": len(plan.units),
    }
    done = start_run(paths, marker)
    pending = [unit for unit in plan.units if unit.output_name not in done]
    if done and pending:
        log.info("resuming run %s: %d of %d output files already written", run, len(done), len(plan.units))
    return BatchRun(config, plan, options, paths, pending)


def encode_batches(
    config: EmbedConfig, model_version: ModelVersion, runs: list[BatchRun]
) -> list[list[dict]]:
    """Every pending unit of every batch: in this process when the job is small, else on Ray actors."""
    summaries: list[list[dict]] = [[] for _ in runs]
    if not any(run.pending for run in runs):
        return summaries
    if sum(unit.rows for run in runs for unit in run.plan.units) <= config.in_process_rows:
        for index, run in enumerate(runs):
            encoder = UnitEncoder(model_version, run.options, run.config.data, run.paths, torch.device("cpu"))
            summaries[index] = [encoder.encode(unit) for unit in run.pending]
        return summaries
    with ray_session():
        for summary in encode_units(config, model_version.version, runs):
            summaries[summary.pop("batch")].append(summary)
    return summaries


def commit_batch(catalog, table, model_version: ModelVersion, run: BatchRun, summaries: list[dict], started):
    """Reconcile, settle and commit one batch (vae.embeddings.runs.commit_run)."""
    settings = {
        Properties.DATA: run.config.data,
        Properties.MODEL_PATH: model_version.path,
        Properties.ANOMALY_THRESHOLD: str(run.options.threshold),
        Properties.ON_BAD_ROWS: run.config.on_bad_rows,
    }
    checks = run.config.data_checks.settings()
    return commit_run(
        catalog, table, run.paths, model_version, run.plan, run.options, summaries, settings, started, checks
    )


def _log_result(result: EmbedResult, paths: RunPaths, summaries: list[dict]) -> None:
    if not result.committed:
        log.info(
            "batch %s of %s was already committed by this same run (snapshot %d): nothing changed",
            result.batch_id,
            result.output,
            result.snapshot_id,
        )
        return
    _log_imputation(summaries, paths)
    if result.profile is None:
        log.info(
            "batch %s: no data checks (model version %s has no input profile)",
            result.batch_id,
            result.model_version,
        )
    log.info(
        "embedded %s rows as batch %s of %s: %s quarantined, %s duplicate rows dropped, %s rows/s end to end",
        f"{result.embedded_rows:,}",
        result.batch_id,
        result.output,
        f"{result.quarantined_rows:,}",
        f"{result.duplicate_rows:,}",
        f"{result.rows_per_second:,.0f}",
    )


def with_version_folder(config: EmbedConfig) -> EmbedConfig:
    """models:/<name>@<alias> or models:/<name>/<number>: the version folder MLflow's version records (in
    the registry of the feature store's mlflow block, else of MLFLOW_TRACKING_URI); 'current': the
    version the feature store serves, under model_root. A name or 'latest': as given."""
    if config.model_version == "current":
        catalog = EmbeddingsCatalog(*config.catalog_settings())
        return config.model_copy(update={"model_version": config.version(catalog, "current")})
    if not config.model_version.startswith(MODELS_URI):
        return config
    fix = f"set MLFLOW_TRACKING_URI, or tracking_uri in the mlflow block of {config.feature_store_yaml}"
    model_root, version = resolve_model_version(config.model_version, config.tracking_uri(), fix)
    log.info("%s is model version %s (%s)", config.model_version, version, model_root)
    return config.model_copy(update={"model_root": model_root, "model_version": version})


def encode_options(config: EmbedConfig, model_version: ModelVersion, plan: Plan) -> EncodeOptions:
    """The settings that shape the output rows: batch, event time, anomaly threshold, bad rows, duplicates."""
    batch = check_batch_id(config.batch) if config.batch else batch_id_of(plan.listing)
    event_time = config.event_time or batch_time(plan.listing)
    if event_time.tzinfo is None:
        raise InputError(
            f"event_time {event_time.isoformat()} has no time zone; write it in UTC, e.g. "
            "2026-11-23T00:00:00Z"
        )
    threshold = anomaly_threshold(model_version, config.anomaly_quantile)
    if threshold is None:
        log.warning(
            "model version %s has no calibrated anomaly threshold (saved before calibration): "
            "is_anomaly is null",
            model_version.version,
        )
    return EncodeOptions(
        batch,
        config.batch_size,
        config.on_bad_rows,
        config.on_duplicate_keys,
        config.timestamp_column,
        event_time,
        threshold,
        plan.key_type,
        config.unseen_categories,
        config.impute,
        config.attribution,
        config.data_checks.settings().enabled,
    )


def _log_imputation(summaries: list[dict], paths) -> None:
    """The imputation quality of the largest unit (held-out entries, model against mean/mode)."""
    from vae.impute import quality_line

    reports = [(s["rows"], json.loads(s["imputation"])) for s in summaries if s.get("imputation")]
    if reports:
        rows, report = max(reports, key=lambda item: item[0])
        where = paths.quarantine.rsplit("/", 1)[0] + "/imputed"
        log.info(
            "imputed rows in %s; quality on %d held-out entries: %s",
            where,
            report["hidden"],
            quality_line(report),
        )


def _arrow_key(key_type: str):
    import pyarrow as pa

    return pa.int64() if key_type == "int64" else pa.string()


def encode_units(config: EmbedConfig, version: str, runs: list[BatchRun]) -> list[dict]:
    """Encode the pending units of every batch on one pool of actors; one summary per unit, with its
    batch's index."""
    units = [(index, unit) for index, run in enumerate(runs) for unit in run.pending]
    nodes = alive_node_resources()
    request = config.encoder_request(cluster_has_gpus=any(node.get("GPU", 0) >= 1 for node in nodes))
    fix = "lower cpus_per_encoder / gpus_per_encoder or check encoder_resources"
    capacity = capacity_or_fail(request, "encoder", fix, nodes)
    requested = min(config.num_encoders or capacity, len(units))
    # More actors than fit now: start what fits and let Ray Data scale up as nodes join.
    compute = ray.data.ActorPoolStrategy(
        min_size=min(requested, capacity), max_size=requested, max_tasks_in_flight_per_actor=1
    )
    gpus = request.get("GPU", 0.0)
    log.info(
        "encoding %d unit(s) of %d batch(es), about %d rows each, with %d encoder actor(s) (%g CPU, %g GPU)",
        len(units),
        len(runs),
        config.rows_per_file,
        requested,
        config.cpus_per_encoder,
        gpus,
    )
    items = [{"unit": unit.to_json(), "batch": index} for index, unit in units]
    batches = [(run.config.data, run.options, run.paths) for run in runs]
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        EncoderActor,
        fn_constructor_kwargs={"config": config.model_dump(), "version": version, "batches": batches},
        batch_size=1,
        batch_format="numpy",
        compute=compute,
        num_cpus=config.cpus_per_encoder,
        num_gpus=gpus,
        resources=config.encoder_resources,
    )
    summaries: list[dict] = []
    last_log = time.monotonic()
    for summary in results.iter_rows():
        summaries.append(summary)
        if time.monotonic() - last_log > 10 or len(summaries) == len(units):
            rows = sum(s["rows"] for s in summaries)
            log.info("%d/%d units done, %s rows", len(summaries), len(units), f"{rows:,}")
            last_log = time.monotonic()
    return summaries


class EncoderActor:
    """A Ray Data actor: loads the model version once, then encodes one work unit (of any of the job's
    batches) per call."""

    def __init__(self, config: dict, version: str, batches: list[tuple[str, EncodeOptions, RunPaths]]):
        config = EmbedConfig(**config)
        resources = ray.get_runtime_context().get_assigned_resources()
        # One torch thread per reserved CPU, so actors sharing a node do not oversubscribe it.
        torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
        has_gpu = resources.get("GPU", 0) > 0
        device = torch.device("cuda" if has_gpu and torch.cuda.is_available() else "cpu")
        if has_gpu and device.type == "cpu":
            log.warning(
                "encoder holds a GPU but torch sees no CUDA device (a CPU build of torch?); encoding on CPU"
            )
        model_version = load_model_version(config.model_root, version)
        model_version.model.to(device)
        self.encoders = [
            UnitEncoder(model_version, options, data, paths, device) for data, options, paths in batches
        ]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = [
            self.encoders[int(index)].encode(WorkUnit.from_json(text)) | {"batch": int(index)}
            for text, index in zip(batch["unit"], batch["batch"], strict=True)
        ]
        return {name: np.array([s[name] for s in summaries]) for name in summaries[0]}


def main(argv: list[str] | None = None) -> EmbedResult:
    return run(parse_config(EmbedConfig, argv, prog="vaectl embed"))


if __name__ == "__main__":
    run_cli(main)
