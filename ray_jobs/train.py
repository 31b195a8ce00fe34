"""Train a VAE on a Parquet dataset with Ray Train (DDP) and save an immutable model version.

    check     the dataset's schema and the architecture, before Ray starts
    prepare   read Parquet (Ray Data) -> one pass that validates every row and gathers the
              normalizer's statistics -> the run's name, claimed under storage_path
    fit       TorchTrainer, N DDP workers (TrainingWorker), each reading only the rows whose key
              hashes to its rank: per epoch train -> validate (all-reduced ELBO, KL per dim, active
              units) -> checkpoint when due; at the end the best weights' importance-weighted NLL
              and the validation reference (posterior means, anomaly scores)
    finalize  the final checkpoint -> anomaly thresholds -> report PNGs -> model version
              (safetensors + JSON) under model_root
    track     with a tracking URI (tracking_uri or MLFLOW_TRACKING_URI): one MLflow run per Ray Train
              run (the config as parameters; rank 0 logs each epoch; final figures, tags, the report
              and model.json at the end), the version registered as vae-<entity>

Fault tolerance: every checkpoint holds weights, optimizer moments and the run state, so a run that
lost a worker or a node (FailureConfig) or its driver (re-run the same command: the run name is
derived from the config and the data) continues from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

from ray_jobs import pushgateway
from ray_jobs.cli import run_cli
from ray_jobs.cluster import alive_node_resources, describe, is_private_cluster, node_capacity, ray_session
from ray_jobs.config import TrainConfig, parse_config
from ray_jobs.train_worker import WorkerSetup, train_loop_per_worker
from vae.data.features import FeatureSchema, check_arrow_schema, features_to_numpy, infer_feature_schema
from vae.data.keys import is_validation, key_hash, worker_of
from vae.data.normalizer import FeatureStats, Normalizer
from vae.data.tabular import ColumnSpec, TableSchema, TableStats, fit_table, infer_kinds, with_unseen
from vae.errors import InputError
from vae.model import VAE, ModelConfig
from vae.monitoring.profile import InputProfile
from vae.monitoring.statistics import anomaly_calibration
from vae.storage import filesystem, is_local, parquet_schema, storage_errors
from vae.training import (
    STATE_FILE,
    RunState,
    claim_run,
    derived_run_name,
    load_best_weights,
    load_checkpoint_reference,
)
from vae.training_report import write_training_report
from vae.versions.artifacts import (
    code_version,
    load_model_version,
    read_model_version_info,
    save_model_version,
)
from vae.versions.mlflow_registry import (
    CODE_TAG,
    COLLAPSE_TAG,
    FINGERPRINT_TAG,
    PATH_TAG,
    VERSION_TAG,
    Registry,
    TrackingRefused,
    TrackingUnavailable,
    registered_model_name,
    resolve_tracking_uri,
)

log = logging.getLogger("ray_jobs.train")


def run(config: TrainConfig) -> str:
    """The CLI's entry: trains, then pushes the version's figures when a Pushgateway is configured."""
    started = time.perf_counter()
    version = train(config)
    metrics = pushgateway.JobMetrics("train", "-")  # a version is trained before it serves an entity set
    info = read_model_version_info(config.model_root, version).metadata
    pushgateway.version_figures(metrics, version, info)
    pushgateway.stage(
        metrics, "train", time.perf_counter() - started, info["data"]["rows"], model_version=version
    )
    metrics.push()
    return version


def train(config: TrainConfig) -> str:
    """Run the whole training job; returns the new model version's name."""
    started = time.perf_counter()
    features, model_config = check(config)
    # MLflow's import and store (seconds) in a thread, while Ray starts and the data is read
    uri = resolve_tracking_uri(config.tracking_uri)
    registry = _in_a_thread(Registry, uri) if uri else None
    with ray_session():
        prepared = prepare(config, features, model_config)
        tracking = start_tracking(config, prepared, registry)
        try:
            # The workers' datasets show no progress bars: the per-epoch line says what a person needs.
            with data_context(enable_progress_bars=False):
                result = fit(config, prepared, tracking)
        except BaseException:
            if tracking:
                tracking.registry.fail_run(tracking.run_id)
            raise
        version = finalize(config, prepared, result, started)
        if tracking:
            track_version(config, tracking, version)
        return version


@dataclass
class PreparedRun:
    """What the driver knows before training starts."""

    features: FeatureSchema
    model: ModelConfig
    normalizer: Normalizer
    stats: FeatureStats
    validation_rows: int
    profile: InputProfile  # the training inputs, per column: what each embedded batch is checked against
    run_name: str
    storage_path: str
    dataset: ray.data.Dataset


def check(config: TrainConfig) -> tuple[FeatureSchema, ModelConfig]:
    """The dataset's schema, the features it gives and the architecture: bad input fails in seconds."""
    paths = config.data if isinstance(config.data, list) else [config.data]
    if not paths:
        raise InputError("data: give a Parquet file or directory, or a non-empty list of them")
    image_shape = tuple(config.image_shape) if config.image_shape else None
    columns = (config.key_column, config.vector_column, tuple(config.feature_columns), image_shape)
    for path in paths:  # every part must give the same features
        schema = parquet_schema(path)
        if config.likelihood == "mixed":
            features = mixed_features(config, schema, path)
        else:
            features = infer_feature_schema(schema, path, *columns)
    if config.label_column and config.label_column not in schema.names:
        have = ", ".join(schema.names)
        raise InputError(
            f"{config.data}: label column '{config.label_column}' not found; the dataset has {have}"
        )
    if config.binarize and config.likelihood != "bernoulli":
        raise InputError("binarize: true needs likelihood: bernoulli")
    if config.architecture == "conv" and features.image_shape is None:
        raise InputError("architecture: conv needs image_shape, e.g. --image-shape [1,28,28]")
    conv_shape = features.image_shape if config.architecture == "conv" else None
    shape = (
        features.dim,
        config.latent_dim,
        tuple(config.hidden_dims),
        config.likelihood,
        config.architecture,
    )
    layout = features.table.layout if features.table else ()  # mixed: category counts come with the fit
    try:
        model = ModelConfig(*shape, conv_shape, tuple(config.conv_channels), layout, missingness(config))
    except ValueError as error:
        raise InputError(f"invalid architecture: {error}") from None
    if config.init_from and features.table is None:  # a mixed table's is known once fitted (prepare)
        model = check_init_from(config, model)
    return features, model


def missingness(config: TrainConfig) -> bool:
    """Whether the model predicts which values are missing (mixed tables, missing: model)."""
    return config.likelihood == "mixed" and config.missing == "model"


def refusal(config: TrainConfig) -> Literal["model", "refuse"]:
    """The table schema's rule for a row with a missing value: encode it (model, skip) or refuse it."""
    return "refuse" if config.missing == "refuse" else "model"


def mixed_features(config: TrainConfig, schema: pa.Schema, source: str) -> FeatureSchema:
    """A mixed table's columns (all but the key and label when none are named) and their kinds."""
    if config.vector_column:
        raise InputError(
            "likelihood: mixed models a table's columns; name feature_columns, not vector_column"
        )
    if config.architecture != "mlp":
        raise InputError("likelihood: mixed needs architecture: mlp")
    skip = {config.key_column, config.label_column}
    columns = tuple(config.feature_columns) or tuple(n for n in schema.names if n not in skip)
    if not columns:
        raise InputError(f"{source}: no feature columns besides the key '{config.key_column}'")
    missing = [c for c in (config.key_column, *columns) if c not in schema.names]
    if missing:
        raise InputError(
            f"{source}: missing column(s) {', '.join(map(repr, missing))}; "
            f"the dataset has {', '.join(schema.names)}"
        )
    kinds = infer_kinds(schema, source, columns, dict(config.column_types))
    unknown = sorted(set(config.column_transforms) - {n for n, k in kinds if k == "numeric"})
    if unknown:
        raise InputError(
            f"column_transforms names {', '.join(map(repr, unknown))}, not numeric feature columns"
        )
    table = TableSchema(tuple(ColumnSpec(name, kind) for name, kind in kinds), missing=refusal(config))
    features = FeatureSchema(config.key_column, len(columns), feature_columns=columns, table=table)
    check_arrow_schema(schema, features, source)
    return features


def check_init_from(config: TrainConfig, model: ModelConfig) -> ModelConfig:
    """The run's architecture, refused unless it is the starting version's. A warm start keeps the
    starting version's missingness head or its absence (a version from before the head trains on)."""
    initial = read_model_version_info(config.model_root, config.init_from)
    architecture = ModelConfig.from_dict(initial.metadata["architecture"])
    if architecture.missingness != model.missingness:
        kept = "predicts" if architecture.missingness else "skips"
        log.info("init_from %s %s missing values: so does this run", config.init_from, kept)
        model = replace(model, missingness=architecture.missingness)
    if architecture != model:
        raise InputError(
            f"init_from {config.init_from}: its architecture {initial.metadata['architecture']} is not "
            f"this run's {model.to_dict()}; train from scratch or match latent_dim, hidden_dims, ..."
        )
    return model


def prepare(config: TrainConfig, features: FeatureSchema, model: ModelConfig) -> PreparedRun:
    """Read the data, validate it and fit the normalizer in one pass, and claim the run's name."""
    reserved = config.num_workers * config.cpus_per_worker
    if not config.materialize and reserved > ray.cluster_resources().get("CPU", 0.0) - 1:
        # Streaming reads run as Ray tasks during training; with every CPU held by a worker
        # they never get scheduled and the run hangs silently.
        raise InputError(
            f"{config.num_workers} workers x {config.cpus_per_worker} CPU leave no CPU for streaming the "
            "dataset; set materialize: true, or lower cpus_per_worker (e.g. 0.5)"
        )
    labels = [config.label_column] if config.label_column else []
    # Ray Data's legacy Parquet datasource: the V2 one lists the files in a task of its own at every
    # execution, about 1 s each time here (every epoch when streaming), against 0.2 s.
    with data_context(use_datasource_v2=False):
        dataset = ray.data.read_parquet(config.data).select_columns(features.columns + labels)
    if config.materialize:
        dataset = dataset.materialize()  # read once; every worker then loads its shard from the object store
    if features.table is not None:
        features, model = fit_mixed(config, dataset, features, model)
    stats, validation_rows, profile = dataset_stats(dataset, features, config.validation_fraction)
    profile.batches = len(config.data) if isinstance(config.data, list) else 1
    if stats.count == 0:
        raise InputError(f"{config.data}: the dataset has no rows")
    if validation_rows in (0, stats.count):
        raise InputError(
            f"{config.data}: validation_fraction {config.validation_fraction} puts {validation_rows} of "
            f"{stats.count} rows in the validation split; both splits need rows"
        )
    normalizer = Normalizer.fit(stats, config.likelihood)
    run_name = config.run_name or derived_run_name(config.run_identity(stats.fingerprint))
    storage = (
        config.storage_path if "://" in config.storage_path else str(Path(config.storage_path).absolute())
    )
    trains = {"model": model.to_dict(), "features": features.to_dict(), "normalizer": normalizer.to_dict()}
    if claim_run(storage, run_name, trains):
        log.info("run %s exists under %s: resuming from its latest checkpoint", run_name, storage)
    shape = f"{stats.count} rows ({validation_rows} validation) x {features.dim} features"
    log.info("run %s: %s, %d workers, storage %s", run_name, shape, config.num_workers, storage)
    return PreparedRun(
        features, model, normalizer, stats, validation_rows, profile, run_name, storage, dataset
    )


@dataclass
class Tracking:
    """The MLflow run of this training run."""

    registry: Registry
    run_id: str


def start_tracking(config: TrainConfig, prepared: PreparedRun, connecting: Future | None) -> Tracking | None:
    """The training run's MLflow run when a tracking URI is configured (a resumed run continues its
    own); an unreachable server is one warning, and training goes on untracked unless
    tracking_required."""
    if connecting is None:
        return None
    identity = {
        FINGERPRINT_TAG: f"{prepared.stats.fingerprint:016x}",
        CODE_TAG: code_version(),
    }
    params = {name: value for name, value in config.model_dump().items() if name != "tracking_uri"}
    experiment = config.experiment or registered_model_name(config.entity)
    try:
        registry = connecting.result()
        ray_run = f"{prepared.storage_path.rstrip('/')}/{prepared.run_name}"
        return Tracking(registry, registry.training_run(experiment, ray_run, params, identity))
    except TrackingUnavailable as error:
        return _untracked(config, error)


def _in_a_thread(function, *args) -> Future:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(function, *args)
    pool.shutdown(wait=False)  # the thread ends when the call does
    return future


def track_version(config: TrainConfig, tracking: Tracking, version: str) -> None:
    """The final figures, tags and artifacts on the run, the run finished, the version registered."""
    info = read_model_version_info(config.model_root, version)
    metadata = info.metadata
    metrics = metadata["metrics"]
    final = {"best_epoch": metrics["best_epoch"], "best_val_negative_elbo": metrics["val_negative_elbo"]}
    final |= {"train_seconds": metrics["train_seconds"], "best_active_units": metrics["active_units"]}
    if metrics.get("iw_nll") is not None:
        final["iw_nll"] = metrics["iw_nll"]
    tags = {VERSION_TAG: version, PATH_TAG: info.path, CODE_TAG: metadata["code_version"]}
    if metrics.get("collapse_warning"):
        tags[COLLAPSE_TAG] = metrics["collapse_warning"]
    registry, run_id = tracking.registry, tracking.run_id
    try:
        registry.log_metrics(run_id, final, step=metrics["epochs_run"])
        with version_files(info.path, ["model.json", "report"]) as files:
            registry.finish_run(run_id, tags, [(files["model.json"], None), (files["report"], "report")])
        number = registry.register(registered_model_name(config.entity), version, info.path, run_id)
        log.info(
            "MLflow: run %s, registered model %s version %s",
            run_id,
            registered_model_name(config.entity),
            number,
        )
    except TrackingUnavailable as error:
        _untracked(config, error, f"model version {version} is saved but not registered")


def _untracked(config: TrainConfig, error: TrackingUnavailable, what: str = "training continues untracked"):
    if config.tracking_required or isinstance(error, TrackingRefused):  # wrong credentials: fix, not wait
        raise error
    log.warning("%s; %s (tracking_required: true makes this an error)", error, what)
    return None


@contextlib.contextmanager
def version_files(path: str, names: list[str]) -> Iterator[dict[str, str]]:
    """Local paths of a version's files: the folder itself when local, else a downloaded copy."""
    fs, root = filesystem(path)
    if is_local(fs):
        yield {name: f"{root}/{name}" for name in names}
        return
    with tempfile.TemporaryDirectory() as scratch, storage_errors(path):
        for name in names:
            fs.get(f"{root}/{name}", f"{scratch}/{name}", recursive=True)
        yield {name: f"{scratch}/{name}" for name in names}


def fit(config: TrainConfig, prepared: PreparedRun, tracking: Tracking | None = None) -> ray.train.Result:
    """Train on the cluster's workers; returns Ray Train's result (its checkpoint holds the best weights)."""
    features, fraction, world = prepared.features, config.validation_fraction, config.num_workers
    # Each worker gets only its own keys, split off here in one pass of Ray tasks while the CPUs are
    # free (the workers hold theirs), handed over as object refs. Materialize: all its rows.
    # Streaming: its validation rows (held in memory), the training rows being Ray Data's equal
    # split, read every epoch.
    own_rows = prepared.dataset
    datasets, dataset_config = {}, DataConfig(datasets_to_split=["train"])
    if not config.materialize:
        own_rows = _split(prepared.dataset, features, fraction, validation=True).materialize()
        datasets["train"] = _streamed_training_rows(prepared.dataset, features, prepared.normalizer, fraction)
    resources = config.worker_request()
    if (capacity := node_capacity(resources, alive_node_resources())) < config.num_workers:
        log.warning(
            "the cluster now holds %d of the %d training workers (each needs %s); Ray Train waits for "
            "nodes (an autoscaling cluster starts them)",
            capacity,
            config.num_workers,
            describe(resources),
        )
    train_rows = prepared.stats.count - prepared.validation_rows
    shards = _rank_shards(own_rows, features, world)
    initial = None
    if config.init_from:
        initial = load_model_version(config.model_root, config.init_from).model.state_dict()
    target = (tracking.registry.uri, tracking.run_id) if tracking else None
    setup = WorkerSetup(
        config, prepared.model, prepared.features, prepared.normalizer, train_rows, shards, initial, target
    )
    use_gpu = config.gpus_per_worker > 0
    scaling = ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu, resources_per_worker=resources)
    keep = CheckpointConfig(config.keep_checkpoints, "val_negative_elbo", checkpoint_score_order="min")
    failures = FailureConfig(max_failures=config.max_failures)
    run = RunConfig(prepared.run_name, prepared.storage_path, failure_config=failures, checkpoint_config=keep)
    # The controller polls the workers this often; each checkpoint waits for a poll, so does the end
    # of the run. Ray's default is 2 s. Passed on to the controller by Ray Train (set before fit).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    if is_private_cluster():
        # A cluster of this one machine: its preemption takes the controller too, and the watcher
        # (an actor of its own) only costs start-up.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"setup": setup},
        scaling_config=scaling,
        run_config=run,
        datasets=datasets or None,
        dataset_config=dataset_config,
    )
    return trainer.fit()


@contextlib.contextmanager
def data_context(**settings) -> Iterator[None]:
    """Ray Data settings for the datasets made inside: a dataset keeps the DataContext it was made in."""
    context = ray.data.DataContext.get_current()
    saved = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)


def finalize(config: TrainConfig, prepared: PreparedRun, result: ray.train.Result, started: float) -> str:
    """The best weights, their validation reference and the report, saved as a new model version."""
    with result.checkpoint.as_directory() as checkpoint_dir:
        state = RunState.from_dict(json.loads((Path(checkpoint_dir) / STATE_FILE).read_text()))
        model = VAE(prepared.model)
        model.load_state_dict(load_best_weights(checkpoint_dir))
        latents, scores, labels = load_checkpoint_reference(checkpoint_dir)
    model.eval()
    final, best = state.final, state.history[state.final["best_epoch"] - 1]
    if final["collapse_warning"]:
        log.warning(final["collapse_warning"])
    seconds = round(time.perf_counter() - started, 2)
    version = save_version(config, prepared, model, state, (latents, scores, labels), seconds)
    iw_nll = f"{final['iw_nll']:.2f}" if final["iw_nll"] is not None else "skipped"
    elbo = f"{best['val_negative_elbo']:.2f} nats/example"
    terms = f"reconstruction {best['val_reconstruction']:.2f}, KL {best['val_kl']:.2f}"
    log.info(
        f"model version {version} saved under {config.model_root}: best epoch {final['best_epoch']}, "
        f"validation -ELBO {elbo} ({terms}), IW-NLL(k={config.iw_samples}) {iw_nll}, "
        f"{best['active_units']}/{config.latent_dim} active units"
    )
    return version


def save_version(
    config: TrainConfig,
    prepared: PreparedRun,
    model: VAE,
    state: RunState,
    validation_reference: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    seconds: float,
) -> str:
    """Save the model version: weights, metadata, the validation reference and its anomaly thresholds,
    the report."""
    best = state.history[state.final["best_epoch"] - 1]
    latents, scores, labels = validation_reference
    reference, anomaly = None, None
    if config.reference_rows and len(scores):
        reference, anomaly = anomaly_calibration(
            latents, scores, config.anomaly_quantile, config.reference_rows
        )
    training = {**config.model_dump(), "run_name": prepared.run_name, "storage_path": prepared.storage_path}
    metrics = {**best, **state.final, "history": state.history, "train_seconds": seconds}
    rows = {"rows": prepared.stats.count, "validation_rows": prepared.validation_rows}
    data = {"source": config.data, **rows, "fingerprint": f"{prepared.stats.fingerprint:016x}"}
    shown = slice(0, config.report_rows)
    pca = (latents[shown], None if labels is None else labels[shown]) if config.report_rows else (None, None)
    with tempfile.TemporaryDirectory() as report_dir:
        kl, variance = best["val_kl_per_dim"], best["val_posterior_mean_variance"]
        write_training_report(report_dir, state.history, kl, variance, *pca, config.label_column)
        return save_model_version(
            config.model_root,
            model,
            prepared.normalizer,
            prepared.features,
            training,
            metrics,
            data,
            report_dir=report_dir,
            reference=reference,
            anomaly=anomaly,
            profile=prepared.profile.to_json(),
        )


def fit_mixed(
    config: TrainConfig, dataset: ray.data.Dataset, features: FeatureSchema, model: ModelConfig
) -> tuple[FeatureSchema, ModelConfig]:
    """A pass gathering each column's categories, missing counts and a key-hash sample of the numeric
    values; the fitted schema sets the model's category outputs."""
    assert features.table is not None
    kinds = tuple((c.name, c.kind) for c in features.table.columns)

    def batch_stats(batch: pa.Table) -> dict[str, np.ndarray]:
        hashes = key_hash(batch.column(features.key_column))
        return {"stats": np.array([TableStats.of(batch, kinds, hashes).to_json()])}

    merged = TableStats()
    for part in dataset.map_batches(batch_stats, batch_format="pyarrow", batch_size=None).iter_batches(
        batch_format="numpy"
    ):
        for text in part["stats"]:
            merged = merged.merge(TableStats.from_json(str(text)))
    table = fit_table(
        merged,
        kinds,
        dict(config.column_transforms),
        config.numeric_transform,
        config.max_categories,
        missing=refusal(config),
    )
    table = with_unseen(table, "other")  # the categories beyond max_categories train as other
    if config.init_from:
        table = inherit_vocabularies(table, config, merged)
    features = replace(features, table=table)
    model = ModelConfig.from_dict({**model.to_dict(), "column_layout": table.layout})
    missing = {name: count for name, count in merged.missing.items() if count}
    log.info("mixed table: %s; missing values %s", _describe_table(table), missing or "none")
    if config.init_from:
        model = check_init_from(config, model)
    return features, model


def inherit_vocabularies(table: TableSchema, config: TrainConfig, stats: TableStats) -> TableSchema:
    """A warm start keeps the starting version's category vocabularies, so its layout, and so every
    weight, carries over: a window where a category is rare or absent (15 of the champion's 16) trains
    on the same outputs; a category the version never saw trains as other (logged). The numeric
    transforms are fitted on the window, as the retrain is for a shifted distribution. (Growing the
    layout instead would leave the new category's weights untrained in a model warm-started for a few
    epochs; `warm_start: false` refits everything.)"""
    initial = read_model_version_info(config.model_root, config.init_from)
    before = FeatureSchema.from_dict(initial.metadata["features"]).table
    if before is None:
        return table
    known = {column.name: column for column in before.columns}
    columns = []
    for column in table.columns:
        old = known.get(column.name)
        if column.kind != "categorical" or old is None or old.kind != "categorical":
            columns.append(column)
            continue
        new = sorted(set(stats.category_counts.get(column.name, {})) - set(old.categories))
        if new:
            log.info(
                "%s: %d categor(ies) %s not in %s's vocabulary train as other (warm_start false refits it)",
                column.name,
                len(new),
                new[:5],
                config.init_from,
            )
        columns.append(replace(column, categories=old.categories))
    return replace(table, columns=tuple(columns))


def _describe_table(table: TableSchema) -> str:
    def one(c: ColumnSpec) -> str:
        return f"{c.name} {c.transform}" if c.kind == "numeric" else f"{c.name} {c.kind}[{c.width}]"

    return ", ".join(one(c) for c in table.columns)


def dataset_stats(
    dataset: ray.data.Dataset, features: FeatureSchema, fraction: float
) -> tuple[FeatureStats, int, InputProfile]:
    """One pass over the data in Ray tasks: validates every row, gathers the normalizer's statistics and
    the input profile, and counts the validation keys."""

    def batch_stats(batch: pa.Table) -> dict[str, np.ndarray]:
        hashes = key_hash(batch.column(features.key_column))
        stats = FeatureStats.of(features_to_numpy(batch, features))
        profile = InputProfile.of(batch, features, hashes).to_json()
        validation = is_validation(hashes, fraction).sum()
        return {**stats.to_row(), "validation": np.array([validation]), "profile": np.array([profile])}

    merged, validation_rows = FeatureStats.of(np.empty((0, features.dim), np.float32)), 0
    profile = InputProfile()
    parts = dataset.map_batches(batch_stats, batch_format="pyarrow", batch_size=None)
    for part in parts.iter_batches(batch_format="numpy"):
        for i in range(len(part["count"])):
            merged = merged.merge(FeatureStats.from_rows(part, i))
            validation_rows += int(part["validation"][i])
            profile = profile.merge(InputProfile.from_json(str(part["profile"][i])))
    return merged, validation_rows, profile


def _rank_shards(dataset: ray.data.Dataset, features: FeatureSchema, world: int) -> list[list[ray.ObjectRef]]:
    """A materialized dataset's blocks split by key hash, one list of blocks per rank: one task per
    block, returning its rows for every rank, so each row is read once and held once."""

    @ray.remote(num_returns=world)
    def split_block(block: pa.Table) -> pa.Table | tuple[pa.Table, ...]:
        ranks = worker_of(key_hash(block.column(features.key_column)), world)
        parts = tuple(block.filter(pa.array(ranks == rank)) for rank in range(world))
        return parts if world > 1 else parts[0]

    parts = [split_block.remote(block) for block in dataset.to_arrow_refs()]
    if world == 1:
        return [parts]
    return [[blocks[rank] for blocks in parts] for rank in range(world)]


def _split(dataset: ray.data.Dataset, features: FeatureSchema, fraction: float, validation: bool):
    def keep(batch: pa.Table) -> pa.Table:
        mask = is_validation(key_hash(batch.column(features.key_column)), fraction)
        return batch.filter(pa.array(mask if validation else ~mask))

    return dataset.map_batches(keep, batch_format="pyarrow", batch_size=None)


def _streamed_training_rows(
    dataset: ray.data.Dataset, features: FeatureSchema, normalizer: Normalizer, fraction: float
) -> ray.data.Dataset:
    """The training rows as normalized float32 matrices, converted in Ray Data tasks, so the
    workers only step."""

    def convert(batch: pa.Table) -> dict[str, np.ndarray]:
        return {"x": normalizer(features_to_numpy(batch, features, validated=True))}

    training_rows = _split(dataset, features, fraction, validation=False)
    return training_rows.map_batches(convert, batch_format="pyarrow", batch_size=None)


def main(argv: list[str] | None = None) -> str:
    return run(parse_config(TrainConfig, argv, prog="vaectl train"))


if __name__ == "__main__":
    run_cli(main)
