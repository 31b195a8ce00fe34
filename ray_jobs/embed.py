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
    started = time.time()
    config = with_version_folder(config)
    model_version = with_retries(  # 'latest' resolved, verified
        lambda: load_model_version(config.model_root, config.model_version), config.model_root
    )
    plan = plan_run(config.data, model_version.features, config.rows_per_file, config.timestamp_column)
    options = encode_options(config, model_version, plan)
    catalog = EmbeddingsCatalog(*config.catalog_settings())
    entity = catalog.register(config.entity, model_version.features.key_column, plan.key_type)
    schema = contract.schema(entity.join_key, _arrow_key(plan.key_type))
    table = catalog.create_table(
        entity, model_version.version, schema, {Properties.MODEL_PATH: model_version.path}
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
    summaries: list[dict] = []
    try:
        if pending and sum(unit.rows for unit in plan.units) <= config.in_process_rows:
            encoder = UnitEncoder(model_version, options, config.data, paths, torch.device("cpu"))
            summaries = [encoder.encode(unit) for unit in pending]
        elif pending:
            with ray_session():
                summaries = encode_units(config, model_version.version, options, pending, paths)
        settings = {
            Properties.DATA: config.data,
            Properties.MODEL_PATH: model_version.path,
            Properties.ANOMALY_THRESHOLD: str(options.threshold),
            Properties.ON_BAD_ROWS: config.on_bad_rows,
        }
        result = commit_run(catalog, table, paths, model_version, plan, options, summaries, settings, started)
    except Exception as error:
        # Bad input must change before a run can succeed, so its staged files are of no use (unless the
        # run already landed: discard_run never removes what a snapshot references). Anything else (a
        # lost node, a killed driver, storage that stayed unavailable) keeps them for the re-run.
        bad_input = find_input_error(error)
        if (
            bad_input
            and not isinstance(bad_input, StorageRefused)
            and "committed by another run" not in str(error)
        ):
            discard_run(paths, table)
        raise
    if not result.committed:
        log.info(
            "batch %s of %s was already committed by this same run (snapshot %d): nothing changed",
            result.batch_id,
            result.output,
            result.snapshot_id,
        )
        return result
    _log_imputation(summaries, paths)
    log.info(
        "embedded %s rows as batch %s of %s: %s quarantined, %s duplicate rows dropped, %s rows/s end to end",
        f"{result.embedded_rows:,}",
        result.batch_id,
        result.output,
        f"{result.quarantined_rows:,}",
        f"{result.duplicate_rows:,}",
        f"{result.rows_per_second:,.0f}",
    )
    return result


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


def encode_units(
    config: EmbedConfig, version: str, options: EncodeOptions, units: list[WorkUnit], paths: RunPaths
) -> list[dict]:
    """Encode the units on a pool of actors; returns one summary per unit."""
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
        "encoding %d unit(s) of about %d rows with %d encoder actor(s) (%g CPU, %g GPU each)",
        len(units),
        config.rows_per_file,
        requested,
        config.cpus_per_encoder,
        gpus,
    )
    items = [{"unit": unit.to_json()} for unit in units]
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        EncoderActor,
        fn_constructor_kwargs={
            "config": config.model_dump(),
            "version": version,
            "options": options,
            "paths": paths,
        },
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
    """A Ray Data actor: loads the model version once, then encodes one work unit per call."""

    def __init__(self, config: dict, version: str, options: EncodeOptions, paths: RunPaths):
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
        self.encoder = UnitEncoder(model_version, options, config.data, paths, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = [self.encoder.encode(WorkUnit.from_json(text)) for text in batch["unit"]]
        return {name: np.array([s[name] for s in summaries]) for name in summaries[0]}


def main(argv: list[str] | None = None) -> EmbedResult:
    return run(parse_config(EmbedConfig, argv, prog="vaectl embed"))


if __name__ == "__main__":
    run_cli(main)
