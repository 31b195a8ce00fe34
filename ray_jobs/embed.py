"""Embed a Parquet dataset with a model version: a Ray Data batch job, exactly once.

    plan (driver)    load and verify the model version; list the input, check every file's schema
                     against it, cut the row groups into work units (vae.embedding_run.plan_run)
    start (driver)   the run's staging directory, named by a hash of the plan and the settings;
                     finished units of an earlier attempt are kept
    encode (Ray)     a pool of encoder actors, each running vae.embedding_run.UnitEncoder on one
                     unit at a time: read -> validate (fail or quarantine) -> encode -> one file
    commit (driver)  input rows = embedded + quarantined, _manifest.json, move into
                     <output>/<model_version>/ (the layout of vae.embeddings)

A run that dies is resumed by running the same command again: the commit publishes exactly one
row per input row. Readers (Feast's sources glob <output>/<version>/*.parquet) never see staging.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

import numpy as np
import ray
import torch

from ray_jobs.cli import find_input_error, run_cli
from ray_jobs.cluster import alive_node_resources, capacity_or_fail, ray_session
from ray_jobs.config import EmbedConfig, parse_config
from vae import InputError, load_model_version
from vae.artifacts import ModelVersion, anomaly_threshold
from vae.embedding_run import (
    EmbedResult,
    EncodeOptions,
    Plan,
    UnitEncoder,
    WorkUnit,
    commit_run,
    discard_run,
    plan_run,
    run_id,
    start_run,
)

log = logging.getLogger("ray_jobs.embed")


def run(config: EmbedConfig) -> EmbedResult:
    return embed(config)


def embed(config: EmbedConfig) -> EmbedResult:
    """Run the whole embedding job; everything is checked before Ray starts."""
    started = time.time()
    # resolves 'latest', verifies weights
    model_version = load_model_version(config.model_root, config.model_version)
    plan = plan_run(config.data, model_version.features, config.rows_per_file, config.timestamp_column)
    options = encode_options(config, model_version, plan)
    run = run_id(config.data, model_version.version, plan.listing, options, config.rows_per_file)
    marker = {
        "run_id": run,
        "model_version": model_version.version,
        "data": config.data,
        "units": len(plan.units),
    }
    staging, done = start_run(config.output, run, marker)
    pending = [unit for unit in plan.units if unit.output_name not in done]
    if done:
        log.info(
            "resuming run %s: %d of %d output files already written",
            run,
            len(plan.units) - len(pending),
            len(plan.units),
        )

    summaries: list[dict] = []
    if pending:
        try:
            with ray_session():
                summaries = encode_units(config, model_version.version, options, pending, staging)
        except Exception as error:
            # Bad input must change before a run can succeed, so its staged files are of no use.
            # Any other failure (a lost node, a killed driver) keeps them for the re-run to resume.
            if find_input_error(error) is not None:
                discard_run(config.output, staging)
            raise
    manifest = {
        "anomaly_threshold": options.threshold,
        "data": config.data,
        "on_bad_rows": config.on_bad_rows,
    }
    result = commit_run(config.output, staging, model_version, plan, summaries, manifest, started)
    log.info(
        "embedded %s rows with model %s: %s quarantined, %s rows/s end to end -> %s",
        f"{result.embedded_rows:,}",
        result.model_version,
        f"{result.quarantined_rows:,}",
        f"{result.rows_per_second:,.0f}",
        result.output,
    )
    return result


def encode_options(config: EmbedConfig, model_version: ModelVersion, plan: Plan) -> EncodeOptions:
    """The settings that shape the output rows: event time, anomaly threshold, bad-row handling."""
    event_time = config.event_time or datetime.fromisoformat(model_version.metadata["created_at"])
    if event_time.tzinfo is None:
        raise InputError(
            f"event_time {event_time.isoformat()} has no time zone; write it in UTC, e.g. "
            "2026-11-23T00:00:00Z"
        )
    threshold = anomaly_threshold(model_version, config.anomaly_quantile)
    if threshold is None:
        log.warning(
            "model version %s has no calibrated anomaly threshold (saved before calibration): is_anomaly "
            "is null",
            model_version.version,
        )
    return EncodeOptions(
        config.batch_size, config.on_bad_rows, config.timestamp_column, event_time, threshold, plan.key_type
    )


def encode_units(
    config: EmbedConfig, version: str, options: EncodeOptions, units: list[WorkUnit], staging: str
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
            "staging": staging,
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

    def __init__(self, config: dict, version: str, options: EncodeOptions, staging: str):
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
        self.encoder = UnitEncoder(model_version, options, config.data, config.output, staging, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = [self.encoder.encode(WorkUnit.from_json(text)) for text in batch["unit"]]
        return {name: np.array([s[name] for s in summaries]) for name in summaries[0]}


def main(argv: list[str] | None = None) -> EmbedResult:
    return embed(parse_config(EmbedConfig, argv, prog="vaectl embed"))


if __name__ == "__main__":
    run_cli(main)
