"""Every job's one typed config: defaults < YAML file (--config) < one flag per field.

A config is made of sections, each a small model whose docstring's first line is its title: `--help`
lists the options by section and docs/configuration.md is generated from the same classes. Where a
pipeline step runs a job, the job's target sections (what it runs on and where it writes) are the
step's to set; the rest is what the pipeline's train/embed/publish blocks may set. Files stay flat
(one key per option), as flags are.

This module imports no torch, Ray or Feast, so `vaectl <job> --help` and the option check of
`vaectl submit` take a fraction of a second.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from ray_jobs.cluster import resource_request
from vae.embeddings.names import check_entity_name
from vae.errors import InputError
from vae.monitoring.datachecks import CHECKS, CheckSettings
from vae.monitoring.thresholds import Thresholds


class JobConfig(BaseModel):
    """Base for the one config object of each job: unknown keys are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def sections(cls) -> list[tuple[type[JobConfig], list[str]]]:
        """(section class, its option names) in the order the config declares them."""
        found = []
        for klass in cls.__mro__:
            own = [name for name in vars(klass).get("__annotations__", {}) if name in cls.model_fields]
            if own and issubclass(klass, JobConfig):
                found.append((klass, own))
        return found


class Section(JobConfig):
    """A group of options documented together. `identity = False`: none of them changes what a training
    run computes, so they stay out of the run's derived name (a re-run with them changed resumes)."""

    identity: ClassVar[bool] = True


ConfigT = TypeVar("ConfigT", bound=JobConfig)


def parse_config(config_class: type[ConfigT], argv: list[str] | None, prog: str) -> ConfigT:
    """Defaults < YAML file (--config) < one flag per field (values parsed as YAML: 16, [256,128])."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [--config YAML] [--<option> VALUE ...]",
        description=(config_class.__doc__ or "").strip(),
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file with any of the options below")
    for section, names in config_class.sections():
        group = parser.add_argument_group(title(section, config_class))
        for name in names:
            field = config_class.model_fields[name]
            default = "required" if field.is_required() else f"default: {default_text(field)}"
            switch = field.annotation is bool  # `--rollback` alone means true; `--rollback false` still works
            group.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                default=argparse.SUPPRESS,
                metavar="VALUE",
                nargs="?" if switch else None,
                const="true" if switch else None,
                help=f"{field.description or ''} ({default})",
            )
    args = vars(parser.parse_args(argv))
    values: dict = {}
    if config_path := args.pop("config", None):
        values = read_yaml_mapping(config_path, "config", "option names to values")
    for name, raw in args.items():
        text_field = config_class.model_fields[name].annotation in (str, str | None)
        # A string option keeps its text (--batch 2026-11-23 is a name, not a date); null still means None.
        values[name] = (None if raw in ("null", "~") else raw) if text_field else _parse_flag(raw)
    try:
        return config_class(**values)
    except ValidationError as error:
        problems = "; ".join(_problem(e) for e in error.errors())
        raise InputError(f"invalid {prog} config: {problems}") from None


def title(section: type[JobConfig], config: type[JobConfig]) -> str:
    """A section's heading: its docstring's first line, and whether a pipeline step sets its options
    for the jobs it runs (they are outside the job's block)."""
    text = (section.__doc__ or section.__name__).strip().splitlines()[0].rstrip(".")
    block = next((options for job, options in BLOCKS.values() if job is config), None)
    if block is not None and not set(section.model_fields) <= set(block.model_fields):
        text += " (a pipeline step sets these)"
    return text


def default_text(field: FieldInfo) -> str:
    """An option's default as --help and the docs show it (a block's: {})."""
    return "{}" if field.default_factory is not None else repr(field.default)


def _problem(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")  # a model validator's: it names its fields
    return f"{'.'.join(map(str, error['loc']))}: {message}" if error["loc"] else message


def read_yaml_mapping(path: str, what: str, of: str) -> dict:
    """A YAML file that must hold a mapping; anything else is one clear error naming the file."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{what} {path}: {error}") from None
    if not isinstance(values, dict):
        raise InputError(f"{what} {path}: expected a mapping of {of}")
    return values


def _parse_flag(raw: str):
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


# ---------------------------------------------------------------------------------------------
# Options several jobs share: one definition each


def _entity_name(name: str) -> str:
    try:
        return check_entity_name(name)
    except InputError as error:
        raise ValueError(str(error)) from None


Entity = Annotated[
    str,
    AfterValidator(_entity_name),
    Field(
        description="the embedding set (entity), e.g. item or user: one VAE (MLflow: vae-<entity>), one key"
    ),
]
ModelRoot = Annotated[str, Field(description="directory or s3:// prefix that holds model versions")]
ModelVersion = Annotated[
    str,
    Field(
        description="the model version: a name, 'latest' (the newest), 'current' (the one the feature store "
        "serves), or an MLflow registry URI: models:/vae-item@champion, models:/vae-item/3"
    ),
]
FeatureRepo = Annotated[str, Field(description="Feast repo directory (feature_store.yaml + definitions)")]


def batch_option(default: str) -> Any:
    """A batch of a version's table by name (letters, digits, '.', '_', '-'); `default`: what None means."""
    return Field(None, description=f"the batch, by name, e.g. 2026-11-23 (default: {default})")


class EmbeddingsLocation(Section):
    """Where the embeddings live: a feature store's Iceberg catalog and warehouse."""

    identity: ClassVar[bool] = False
    entity: Entity = "item"
    feature_store_yaml: str = Field(
        "feature_repo/feature_store.yaml",
        description="the feature store whose embeddings catalog (its vae_embeddings block) and MLflow "
        "registry (its mlflow block) are used",
    )
    catalog: str | None = Field(
        None,
        description="Iceberg SQL catalog URI instead of the feature store's: sqlite:///path.db or "
        "postgresql+psycopg2://user@host/db (password from PGPASSWORD, never in config)",
    )
    warehouse: str | None = Field(
        None,
        description="where the catalog's tables keep their files (local or s3://) instead of the "
        "feature store's",
    )

    def catalog_settings(self) -> tuple[str, str]:
        """(catalog URI, warehouse): the options', else the feature store's vae_embeddings block."""
        from feast_embeddings.settings import StoreSettings

        if self.catalog and self.warehouse:
            return self.catalog, self.warehouse
        uri, warehouse = StoreSettings.read(self.feature_store_yaml).embeddings_catalog()
        return self.catalog or uri, self.warehouse or warehouse

    def tracking_uri(self) -> str | None:
        """The MLflow registry of the feature store's mlflow block, else MLFLOW_TRACKING_URI."""
        from feast_embeddings.settings import StoreSettings
        from vae.versions.mlflow_registry import resolve_tracking_uri

        yaml_path = Path(self.feature_store_yaml)
        in_yaml = StoreSettings.read(yaml_path).tracking_uri if yaml_path.is_file() else None
        return in_yaml or resolve_tracking_uri()

    def version(self, catalog, name: str) -> str:
        """A model version of the entity set: 'current', 'latest' and models:/ URIs resolved by name."""
        from feast_embeddings.publication import resolve_version

        fix = f"set MLFLOW_TRACKING_URI, or tracking_uri in the mlflow block of {self.feature_store_yaml}"
        uri = self.tracking_uri() if name.startswith("models:/") else None
        return resolve_version(catalog, self.entity, name, uri, fix)


_DEFAULT = Thresholds()


class GateOptions(Section):
    """Thresholds: when a batch fails a check (vae.monitoring.gate)."""

    min_active_share: float = Field(
        _DEFAULT.min_active_share,
        ge=0,
        le=1,
        description="collapse: least share of latent units with Var(mean) > 0.01",
    )
    drift_alpha: float = Field(
        _DEFAULT.drift_alpha,
        gt=0,
        lt=1,
        description="drift: the combined p-value below which drift is declared",
    )
    min_linear_cka: float = Field(
        _DEFAULT.min_linear_cka, ge=0, le=1, description="movement: least linear CKA to the baseline version"
    )
    min_knn_overlap: float = Field(
        _DEFAULT.min_knn_overlap,
        ge=0,
        le=1,
        description="movement: least mean k-NN overlap@10 with the baseline version",
    )

    def thresholds(self) -> Thresholds:
        return Thresholds(**{f.name: getattr(self, f.name) for f in fields(Thresholds)})


# ---------------------------------------------------------------------------------------------
# train


class TrainSource(Section):
    """What the run trains on."""

    data: str | list[str] = Field(
        description="Parquet file or directory to train on, or a list of them (e.g. recent daily batches)"
    )
    init_from: str | None = Field(
        None,
        description="start from this model version's weights (a name under model_root; same architecture): "
        "retraining a champion on new data keeps its latent space close",
    )


class TrainDestination(Section):
    """Where the version and the run go."""

    identity: ClassVar[bool] = False
    model_root: ModelRoot = "models"
    run_name: str | None = Field(
        None, description="Ray Train run name; the default derives from config + data, so a re-run resumes"
    )
    entity: Entity = "item"
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (sqlite:///path/mlflow.db, http://host:5000); default "
        "$MLFLOW_TRACKING_URI; neither: not tracked",
    )


class TrainData(Section):
    """Data: which columns, the validation split."""

    key_column: str = Field(
        "item_id", description="entity key column (string or integer); decides the validation split"
    )
    vector_column: str | None = Field(None, description="one list column holding the features")
    feature_columns: list[str] = Field(
        [], description="numeric scalar feature columns, instead of vector_column"
    )
    image_shape: list[int] | None = Field(None, description="declared shape of the vector, e.g. [1, 28, 28]")
    label_column: str | None = Field(
        None, description="optional column that colours the report's latent PCA plot"
    )
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="share of keys held out for validation")


class ModelShape(Section):
    """Model: architecture and likelihood."""

    architecture: Literal["mlp", "conv"] = Field(
        "mlp", description="mlp for vectors and tabular rows, conv for images"
    )
    latent_dim: int = Field(16, gt=0, description="size of the latent vector")
    hidden_dims: list[int] = Field(
        [256, 128], description="MLP hidden layer sizes (after the convolutions for conv)"
    )
    conv_channels: list[int] = Field(
        [32, 64], description="channels of the stride-2 convolutions (conv only)"
    )
    likelihood: Literal["bernoulli", "gaussian", "mixed"] = Field(
        "bernoulli",
        description="bernoulli for [0,1] data, gaussian for numeric tables, mixed for tables with "
        "categorical, binary and missing values (one likelihood per column)",
    )
    binarize: bool = Field(
        False, description="dynamic binarization: sample binary targets from [0,1] data each step"
    )


# vae.data.tabular.Transform, spelled out here: importing the table code costs every CLI start 0.1 s
NumericTransform = Literal["auto", "robust", "asinh", "standard", "log", "quantile"]


class MixedTable(Section):
    """Mixed tables (likelihood: mixed): column kinds, transforms, missing values."""

    column_types: dict[str, Literal["numeric", "binary", "categorical"]] = Field(
        {},
        description="a column's kind where the Parquet type does not say it (inferred: bool -> "
        "binary, string/dictionary -> categorical, numbers -> numeric), e.g. {merchant_id: categorical}",
    )
    numeric_transform: NumericTransform = Field(
        "auto",
        description="numeric columns' transform before their Gaussian (auto: asinh, i.e. robust "
        "median/IQR scaling, then a signed log of the tails; robust: the scaling alone; log: log1p "
        "first)",
    )
    column_transforms: dict[str, NumericTransform] = Field(
        {}, description="per-column numeric transforms, e.g. {amount: log}"
    )
    missing: Literal["model", "skip", "refuse"] = Field(
        "model",
        description="missing values (null, NaN): model (the encoder sees the mask and the decoder "
        "predicts it, so a row's score counts what it lacks: an always-filled column empty is "
        "surprising), skip (the likelihood skips them; versions from before) or bad rows (refuse)",
    )
    max_categories: int = Field(
        64, gt=0, description="categories kept per column (most frequent); the rest share 'other'"
    )


class Objective(Section):
    """Objective: the ELBO's weights."""

    beta: float = Field(1.0, ge=0, description="weight of the KL term after warm-up (1 = the true ELBO)")
    kl_warmup_epochs: float = Field(
        5.0, ge=0, description="epochs over which the KL weight rises linearly from 0 to beta"
    )
    free_bits: float = Field(
        0.0, ge=0, description="minimum batch-mean KL per latent dimension in the loss (nats)"
    )
    trim_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="leave this share of each batch's highest-loss rows out of the "
        "loss: robust to outliers in unlabeled data (anomaly detection)",
    )


class Optimization(Section):
    """Optimization: epochs, batch, learning rate."""

    epochs: int = Field(20, gt=0, description="maximum passes over the training data")
    batch_size: int = Field(
        128, gt=0, description="examples per optimizer step across all workers (the global batch)"
    )
    learning_rate: float = Field(1e-3, gt=0, description="Adam peak learning rate")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="learning-rate decay after warm-up"
    )
    lr_warmup_steps: int = Field(0, ge=0, description="steps of linear learning-rate warm-up")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="final learning rate of the cosine schedule, relative"
    )
    grad_clip_norm: float | None = Field(
        100.0, gt=0, description="clip the global gradient norm (null = off)"
    )
    early_stopping_patience: int = Field(
        10, ge=0, description="stop after this many epochs without a better validation ELBO (0 = off)"
    )
    seed: int = Field(0, description="seed for initialization, shuffling and sampling")


class Scale(Section):
    """Scale: data-parallel workers and how they hold the data."""

    num_workers: int = Field(2, gt=0, description="data-parallel training workers")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="GPUs per worker; > 0 trains on GPU with NCCL, else CPU with gloo"
    )
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 runs the model under autocast (GPU)")
    materialize: bool = Field(
        True,
        description="true: each worker holds its shard in memory; false: stream from Ray Data each epoch",
    )
    shuffle_buffer: int = Field(
        2048, ge=0, description="rows in the local shuffle buffer when streaming (0 = off)"
    )


class Placement(Section):
    """Placement: where the workers run on a cluster."""

    identity: ClassVar[bool] = False
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each training worker")
    accelerator_type: str | None = Field(
        None,
        description="train only on nodes with this accelerator (Ray's accelerator_type:<name> resource, "
        "e.g. A10G, H100)",
    )
    worker_resources: dict[str, float] = Field(
        {}, description="extra Ray resources each worker needs (pins it to node types)"
    )


class Checkpoints(Section):
    """Fault tolerance: checkpoints and restarts."""

    identity: ClassVar[bool] = False
    storage_path: str = Field(
        "ray_results", description="where Ray Train keeps checkpoints (local path or s3://)"
    )
    checkpoint_every: int = Field(
        0, ge=0, description="checkpoint every N epochs (0 = by time only; always at the end)"
    )
    checkpoint_seconds: float = Field(
        60.0,
        ge=0,
        description="checkpoint after an epoch when this many seconds passed since the last one "
        "(0 = by epochs only): each checkpoint is a report that waits on Ray Train's controller",
    )
    keep_checkpoints: int = Field(
        2, gt=0, description="checkpoints kept, best by validation ELBO (the latest is kept too)"
    )
    max_failures: int = Field(
        3, ge=0, description="restarts from the last checkpoint after a worker or node failure"
    )


class Diagnostics(Section):
    """Diagnostics: the final likelihood and the collapse check."""

    iw_samples: int = Field(
        1000, ge=0, description="importance samples for the final validation NLL (0 = skip)"
    )
    iw_max_rows: int = Field(
        2048, gt=0, description="validation rows the importance-weighted NLL uses at most"
    )
    min_active_share: float = Field(
        0.1, ge=0, le=1, description="warn of posterior collapse below this share of active units"
    )


class VersionContents(Section):
    """What the version keeps for monitoring and the report."""

    identity: ClassVar[bool] = False
    report_rows: int = Field(2000, ge=0, description="validation rows in the report's PCA plot")
    reference_rows: int = Field(
        10_000, ge=0, description="validation rows kept with the version: drift reference, anomaly thresholds"
    )
    anomaly_quantile: float = Field(
        0.99, gt=0, lt=1, description="is_anomaly: score above this quantile of the validation scores"
    )


class Tracking(Section):
    """The model registry (MLflow)."""

    identity: ClassVar[bool] = False
    experiment: str | None = Field(None, description="MLflow experiment (default: vae-<entity>)")
    tracking_required: bool = Field(
        False, description="fail the run when MLflow cannot be reached (default: warn once, train on)"
    )


class TrainOptions(
    TrainData,
    ModelShape,
    MixedTable,
    Objective,
    Optimization,
    Scale,
    Placement,
    Checkpoints,
    Diagnostics,
    VersionContents,
    Tracking,
):
    """How a version is trained, besides what on and where to (the pipeline's train block)."""

    @model_validator(mode="after")
    def _global_batch_splits(self) -> TrainOptions:
        if self.batch_size % self.num_workers:
            fits = ", ".join(
                str(self.batch_size // self.num_workers * self.num_workers + i * self.num_workers)
                for i in (0, 1)
            )
            raise ValueError(
                f"batch_size {self.batch_size} is the global batch and must split evenly across "
                f"{self.num_workers} workers (e.g. {fits})"
            )
        return self

    def worker_batch_size(self) -> int:
        """Rows per optimizer step on each worker."""
        return self.batch_size // self.num_workers

    def worker_request(self) -> dict[str, float]:
        """The Ray resources of one training worker."""
        return resource_request(
            self.cpus_per_worker, self.gpus_per_worker, self.worker_resources, self.accelerator_type
        )


class TrainConfig(TrainSource, TrainDestination, TrainOptions):
    """Train a VAE with Ray Train on a Parquet dataset and save a model version."""

    def run_identity(self, data_fingerprint: int) -> dict:
        """What the run computes, the data by its fingerprint: the same config and data give the same
        derived run name, so a re-run resumes. Options of sections marked identity = False are left
        out, and mixed-table options for other models (their names stay as they were)."""
        excluded = {name for section, names in self.sections() if not section.identity for name in names}
        if self.likelihood != "mixed":
            excluded |= set(MixedTable.model_fields)
        return {**self.model_dump(exclude=excluded), "data": f"{data_fingerprint:016x}"}


# ---------------------------------------------------------------------------------------------
# embed


class EmbedTarget(EmbeddingsLocation):
    """What to embed, with which version, as which batch."""

    data: str = Field(description="Parquet file or directory (local or s3://), hive-style partitions allowed")
    model_root: ModelRoot = "models"
    model_version: ModelVersion = "latest"
    batch: str | None = batch_option("a hash of the input listing; re-running a batch replaces its rows")
    timestamp_column: str | None = Field(None, description="input column used as event_timestamp")
    event_time: datetime | None = Field(
        None,
        description="event_timestamp of every row when no timestamp_column (default: the batch's time, when "
        "its newest input file was written)",
    )


CheckSeverity = Literal["off", "warn", "block-retrain", "refuse"]
SEVERITY_HELP = (
    "off, warn (recorded), block-retrain (embedded and served, never trains) or refuse (not embedded)"
)


class DataChecks(JobConfig):
    """The checks of a batch's inputs against its model version's training inputs, run in the embed
    pass (vae.monitoring.datachecks): a severity and a limit per check."""

    null_rate: CheckSeverity = Field("block-retrain", description=SEVERITY_HELP)
    null_rate_jump: float = Field(
        0.2, gt=0, le=1, description="a column's missing share may rise by this much"
    )
    scale: CheckSeverity = Field("block-retrain", description=SEVERITY_HELP)
    scale_factor: float = Field(10.0, gt=1, description="a numeric column's spread may change by this factor")
    range: CheckSeverity = Field("block-retrain", description=SEVERITY_HELP)
    out_of_range_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of a numeric column's values that may lie outside training's range",
    )
    new_categories: CheckSeverity = Field("block-retrain", description=SEVERITY_HELP)
    new_category_share: float = Field(
        0.1, gt=0, le=1, description="share of rows that may hold categories training never saw"
    )
    vanished_categories: CheckSeverity = Field("block-retrain", description=SEVERITY_HELP)
    vanished_min_share: float = Field(
        0.05, gt=0, le=1, description="a category this frequent in training must not (nearly) vanish"
    )
    duplicate_keys: CheckSeverity = Field("block-retrain", description=SEVERITY_HELP)
    duplicate_key_share: float = Field(
        0.01, ge=0, le=1, description="share of rows that may repeat a key (on_duplicate_keys: keep-latest)"
    )
    row_count: CheckSeverity = Field("warn", description=SEVERITY_HELP)
    row_count_factor: float = Field(
        10.0, gt=1, description="rows may differ from training's per batch by this factor"
    )

    def without_refusal(self) -> dict[str, str]:
        """The checks set to refuse, at block-retrain (a backfill re-embeds batches already served)."""
        return {name: "block-retrain" for name in CHECKS if getattr(self, name) == "refuse"}

    def settings(self) -> CheckSettings:
        values = self.model_dump()
        severity = {name: values.pop(name) for name in CHECKS}
        return CheckSettings(severity=severity, **values)


class EmbedOutput(Section):
    """Rows: bad rows, duplicates, what is written."""

    on_bad_rows: Literal["fail", "quarantine"] = Field(
        "fail",
        description="a row that cannot be encoded (or whose model output is not finite) stops the job (fail) "
        "or goes to the run's quarantine (quarantine)",
    )
    on_duplicate_keys: Literal["fail", "keep-latest"] = Field(
        "fail",
        description="a key twice in the batch stops the job (fail), or only its latest row by "
        "event_timestamp is kept (keep-latest)",
    )
    data_checks: DataChecks = Field(
        default_factory=DataChecks,
        description="the batch's inputs checked against the version's training inputs in the embed pass, "
        "each check with a severity and a limit, e.g. {scale: refuse, null_rate_jump: 0.3} (see "
        "docs/monitoring.md, Data checks)",
    )
    attribution: bool = Field(
        True,
        description="table models: write each row's top_columns and top_shares (the columns that make its "
        "score); false writes empty lists and encodes about 8x faster on a 4-column table",
    )
    impute: bool = Field(
        False,
        description="mixed tables: also write every row with its missing values filled from the model "
        "(posterior-mean reconstruction) to <table>/runs/<run id>/imputed/, and report imputation quality "
        "on held-out entries against mean/mode imputation",
    )
    unseen_categories: Literal["refuse", "other"] = Field(
        "refuse",
        description="mixed tables: a category the model version never saw is a bad row naming the column "
        "(refuse), or goes to the column's other bucket (other)",
    )
    anomaly_quantile: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="is_anomaly = score above this quantile of the version's validation scores "
        "(default: the threshold chosen at training, anomaly_quantile there)",
    )
    snapshot_retention_hours: float = Field(
        168.0,
        gt=0,
        description="the version table's snapshots older than this are expired by its commits (the newest "
        "10 always stay): how far back time travel (--as-of) reaches; kept as Iceberg's own "
        "history.expire.max-snapshot-age-ms, so a year of batches costs a commit what a week does",
    )


class EmbedExecution(Section):
    """Execution: batches, work units, encoder actors."""

    batch_size: int = Field(8192, gt=0, description="rows per encoder call")
    in_process_rows: int = Field(
        0,
        ge=0,
        description="inputs of at most this many rows are encoded in this process, without Ray (its "
        "start-up costs more than a small daily batch); 0 = always on Ray",
    )
    rows_per_file: int = Field(
        262_144, gt=0, description="rows per output file: the unit of work and of resuming"
    )
    num_encoders: int | None = Field(
        None, gt=0, description="encoder actors (default: one per CPU, or per GPU when the cluster has GPUs)"
    )
    cpus_per_encoder: float = Field(
        1.0, gt=0, description="CPUs reserved by each encoder actor (its torch threads)"
    )
    gpus_per_encoder: float | None = Field(
        None, ge=0, description="GPUs per encoder actor (default: 1 if the cluster has GPUs, else 0)"
    )
    encoder_resources: dict[str, float] = Field(
        {}, description="extra Ray resources each encoder actor needs (pins it to node types)"
    )

    def encoder_request(self, cluster_has_gpus: bool) -> dict[str, float]:
        """One encoder actor's Ray resources: on a GPU when the cluster has GPUs and gpus_per_encoder
        is unset, else on CPU."""
        gpus = (
            self.gpus_per_encoder if self.gpus_per_encoder is not None else (1.0 if cluster_has_gpus else 0.0)
        )
        return resource_request(self.cpus_per_encoder, gpus, self.encoder_resources)


class EmbedOptions(EmbedOutput, EmbedExecution):
    """How a batch is embedded, besides what and into which table (the pipeline's embed block)."""


class EmbedConfig(EmbedTarget, EmbedOptions):
    """Encode a Parquet dataset with a model version: one batch of the version's Iceberg table."""


# ---------------------------------------------------------------------------------------------
# monitor


class MonitorTarget(EmbeddingsLocation):
    """What to check, against what."""

    model_version: ModelVersion = "latest"
    batch: str | None = batch_option("the version's newest; all: every batch")
    as_of: str | int | None = Field(
        None, description="read the tables as of a snapshot id or an ISO time (time travel)"
    )
    reference_batch: str | None = Field(
        None,
        description="a batch of the same version to compare with (default: the version's validation "
        "reference)",
    )
    baseline_version: str | None = Field(
        None, description="another version of the entity set: movement, on the entities both embedded"
    )
    model_root: ModelRoot = "models"


class MonitorExecution(Section):
    """The tests and the report."""

    output: str = Field("monitoring", description="reports go to <output>/<version>-<time>/ (local or s3://)")
    sample_rows: int = Field(5000, ge=100, description="rows per side the tests use, chosen by key hash")
    permutations: int = Field(
        200, ge=19, description="permutations behind the MMD, mean and covariance p-values"
    )
    neighbours: int = Field(10, gt=0, description="k of the k-NN overlap")
    in_memory_rows: int = Field(
        1_000_000, ge=0, description="inputs above this many rows are read with Ray Data"
    )
    seed: int = Field(0, description="seed of the permutations and the classifier split")


class MonitorConfig(MonitorTarget, GateOptions, MonitorExecution):
    """Drift, movement, anomaly rate and collapse of a batch's latent vectors, with a report."""


# ---------------------------------------------------------------------------------------------
# embeddings


class EmbeddingsTask(Section):
    """What to do, on what."""

    command: Literal["history", "export", "decisions", "lineage", "migrate"] = Field(description="what to do")
    model_version: ModelVersion = "latest"
    as_of: str | int | None = Field(None, description="export: as of a snapshot id or an ISO time")
    batch: str | None = batch_option("every batch; export and decisions only")
    output: str | None = Field(
        None, description="export: the Parquet file or directory to write (local or s3://)"
    )
    source: str | None = Field(
        None, description="migrate: the old embeddings root (<root>/<version>/*.parquet)"
    )
    run_id: str | None = Field(None, description="lineage: the downstream model's MLflow run id")


class EmbeddingsCommand(EmbeddingsTask, EmbeddingsLocation):
    """`vaectl embeddings history|export|decisions|lineage|migrate`: a version's batches and snapshots, a
    time-travel export, the pipeline's decision log, a downstream MLflow run's VAE training runs, the
    migration of Parquet-directory versions."""


# ---------------------------------------------------------------------------------------------
# publish


class PublishTarget(Section):
    """What to publish where, and whether it becomes current."""

    entity: Entity = "item"
    model_version: ModelVersion = "latest"
    feature_repo: FeatureRepo = "feature_repo"
    feature_store_yaml: str | None = Field(
        None,
        description="another feature_store.yaml for the same definitions, e.g. deploy/feature_store.yaml: "
        "registry on S3, Redis (default: the repo's)",
    )
    switch_current: bool = Field(
        True, description="point the 'current' feature service at this version after verifying it"
    )
    rollback: bool = Field(
        False,
        description="only point 'current' back (no writes): at --model-version when given, else at the "
        "version the last switch replaced; run twice, it rolls back once",
    )


class OnlineWrites(Section):
    """Online writes, verification, vector search."""

    keep_online: int = Field(
        2, ge=1, description="model versions kept in the online store (current always kept)"
    )
    write_batch_rows: int = Field(
        65_536, gt=0, description="rows per online write call (SQLite: per transaction)"
    )
    # 1 by default: on the 2-core dev machine one in-process writer beat two Ray writers (Redis
    # shares the cores); more pay off where Redis runs on its own machines.
    writers: int = Field(
        1,
        gt=0,
        description="online writers for Redis: 1 = this process, N > 1 = N Ray actors; SQLite has one writer",
    )
    cpus_per_writer: float = Field(
        1.0, gt=0, description="CPUs reserved by each Ray writer (asks for no GPU: kept off GPU nodes)"
    )
    writer_resources: dict[str, float] = Field(
        {}, description="extra Ray resources each Ray writer needs (pins it to node types)"
    )
    parallel_min_rows: int = Field(
        100_000, ge=0, description="below this many rows write in this process (Ray start-up costs more)"
    )
    verify_rows: int = Field(256, ge=0, description="rows read back through Feast and compared after writing")
    vector_search: bool = Field(
        False,
        description="also index the version for similarity search (Milvus Lite, "
        "<feature_repo>/vector_search)",
    )
    show: int = Field(3, ge=0, description="entities to fetch and print at the end")

    def writer_request(self) -> dict[str, float]:
        """One Ray online writer's resources (never a GPU)."""
        return resource_request(self.cpus_per_writer, 0.0, self.writer_resources)


class PublishGate(Section):
    """The gate before switching current (with the thresholds below)."""

    force: bool = Field(
        False, description="switch 'current' even when a monitoring check fails (the report is still written)"
    )
    model_root: ModelRoot = "models"
    monitoring: str | None = Field(
        None,
        description="the gate's reports go to <monitoring>/<version>-<time>/, local or s3:// "
        "(default: <feature_repo>/data/monitoring)",
    )
    gate_sample_rows: int = Field(
        5000, ge=100, description="rows per side the gate's drift and movement checks use"
    )


class PublishOptions(OnlineWrites, PublishGate, GateOptions):
    """How a version is published, besides which and whether it becomes current (the pipeline's publish
    block)."""


class PublishConfig(PublishTarget, PublishOptions):
    """Register the Feast definitions, write a model version's embeddings online, switch "current"."""


# ---------------------------------------------------------------------------------------------
# serve


class ServeTarget(Section):
    """What the service serves: the entity set's current version, followed."""

    entity: Entity = "item"
    feature_repo: FeatureRepo = "feature_repo"
    feature_store_yaml: str | None = Field(
        None, description="another feature_store.yaml for the same definitions (default: the repo's)"
    )
    model_root: ModelRoot = "models"
    follow_seconds: float = Field(
        5.0, gt=0, description="how often each replica checks which version is current (and loads a new one)"
    )
    unseen_categories: Literal["refuse", "other"] = Field(
        "refuse", description="a category the version never saw: refuse the row (422), or map it to other"
    )
    attribution: bool = Field(True, description="name the columns that make each row unusual (tables)")
    canary: Canary | None = Field(
        None,
        description="a challenger on a share of the traffic, e.g. {version: <v>, fraction: 0.1, "
        "max_p99_ms: 200}; see the canary options below",
    )


class Canary(JobConfig):
    """A challenger version beside the current one, on a share of the traffic, withdrawn automatically when
    it breaches a limit (vae.monitoring.canary); promote a healthy one with `vaectl publish`."""

    version: str = Field(description="the canary model version (a name or models:/ URI)")
    fraction: float = Field(0.1, gt=0, le=1, description="the share of requests it serves")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="share of its rows it fails to embed")
    max_p99_ms: float = Field(1000.0, gt=0, description="p99 of its requests' encoding time, ms")
    max_anomaly_rate_multiple: float = Field(
        5.0, gt=0, description="its anomaly rate over the rate its calibration expects"
    )
    drift_alpha: float = Field(
        1e-6, gt=0, lt=1, description="drift of its outputs from its own reference (KS per unit, Holm)"
    )
    min_rows: int = Field(200, ge=1, description="rows it serves before it is judged")

    def limits(self):
        from vae.monitoring.canary import CanaryLimits

        return CanaryLimits(
            self.max_error_rate,
            self.max_p99_ms,
            self.max_anomaly_rate_multiple,
            self.drift_alpha,
            self.min_rows,
        )


class ServeWrites(Section):
    """Write-through: Feast online at once, the version's Iceberg table in micro-commits."""

    write: bool = Field(True, description="write every embedded row to Feast's online store and the table")
    commit_seconds: float = Field(
        10.0, gt=0, description="a micro-commit to the table at least this often while rows wait"
    )
    commit_rows: int = Field(10_000, gt=0, description="... or as soon as this many rows wait")


class ServeScale(Section):
    """Replicas, batching, HTTP."""

    host: str = Field("127.0.0.1", description="HTTP address of Ray Serve's proxy (0.0.0.0: every interface)")
    port: int = Field(8000, gt=0, lt=65536, description="HTTP port")
    replicas: int = Field(1, ge=1, description="replicas (the least, with autoscaling)")
    max_replicas: int | None = Field(
        None, ge=1, description="autoscale up to this many replicas (default: a fixed number)"
    )
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="autoscaling: requests in flight per replica it aims at"
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs reserved by each replica")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica (a fraction shares one)")
    max_batch_size: int = Field(64, gt=0, description="requests encoded together (@serve.batch)")
    batch_wait_seconds: float = Field(
        0.0,
        ge=0,
        description="how long a batch waits for more requests (0: it takes the requests queued while the "
        "last one encoded, which is how batches form under load without delaying a lone request)",
    )
    detach: bool = Field(
        False, description="deploy and return (on a cluster that RAY_ADDRESS names); else serve until Ctrl-C"
    )

    def deployment_options(self) -> dict:
        resources: dict = {"num_cpus": self.cpus_per_replica}
        if self.gpus_per_replica:
            resources["num_gpus"] = self.gpus_per_replica
        options: dict = {"ray_actor_options": resources, "max_ongoing_requests": 4 * self.max_batch_size}
        if self.max_replicas is None or self.max_replicas <= self.replicas:
            return options | {"num_replicas": self.replicas}
        scaling = {
            "min_replicas": self.replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }
        return options | {"autoscaling_config": scaling}


class ServeConfig(ServeTarget, ServeWrites, ServeScale):
    """The online encoding service (Ray Serve): POST /embed returns each row's latent, anomaly score,
    is_anomaly, attribution and model version, and writes them through to Feast and the table."""


# ---------------------------------------------------------------------------------------------
# pipeline


class PipelineTarget(Section):
    """The batch and the stores."""

    entity: Entity = "item"
    data: str = Field(description="the new batch: a Parquet file or directory (local or s3://)")
    batch: str | None = batch_option("the data path's last part, date=2026-11-23 -> 2026-11-23")
    event_time: datetime | None = Field(
        None, description="event_timestamp of the batch's rows (default: when its newest file was written)"
    )
    timestamp_column: str | None = Field(None, description="input column used as event_timestamp")
    feature_repo: FeatureRepo = "feature_repo"
    feature_store_yaml: str | None = Field(
        None, description="another feature_store.yaml for the repo's definitions (default: the repo's)"
    )
    model_root: ModelRoot = "models"
    initial_version: str | None = Field(
        "latest",
        description="when nothing is current yet: this version from model_root; when model_root has none "
        "(or null), a first version is trained on this batch",
    )


class RetrainPolicy(Section):
    """When to retrain, what a challenger must show, how long a new version is watched."""

    drift_batches: int = Field(2, gt=0, description="retrain on drift in this many (K) of the last N batches")
    drift_window: int = Field(3, gt=0, description="the N of the drift trigger: batches looked back on")
    anomaly_rate_multiple: float = Field(
        3.0,
        gt=1,
        description="retrain (or, watching, roll back) when the anomaly rate exceeds this "
        "multiple of the calibrated rate",
    )
    retry_batches: int = Field(
        2, ge=0, description="after a refused challenger, batches to wait before training another"
    )
    train_window: int = Field(7, gt=0, description="a challenger trains on this many recent batches")
    warm_start: bool = Field(True, description="a challenger starts from the champion's weights")
    elbo_margin: float = Field(
        1.0, ge=0, description="the challenger's held-out -ELBO may exceed the champion's by this many nats"
    )
    watch_batches: int = Field(
        3, ge=0, description="batches checked against a new version's own reference; a breach rolls back"
    )


class StepJobs(Section):
    """The jobs the step runs (their blocks take the jobs' own options, less what the step sets)."""

    train: TrainOptions = Field(
        default_factory=TrainOptions,
        description="training options of a challenger (default: the champion's own; a first version "
        "needs its features, e.g. {feature_columns: [a, b]})",
    )
    embed: EmbedOptions = Field(
        default_factory=EmbedOptions, description="embed options, e.g. {on_bad_rows: quarantine}"
    )
    publish: PublishOptions = Field(
        default_factory=PublishOptions, description="publish options, e.g. {writers: 4}"
    )
    in_process_rows: int = Field(
        200_000, ge=0, description="batches of at most this many rows are encoded in this process, not on Ray"
    )
    monitoring: str | None = Field(
        None, description="monitoring reports go here (default: <feature_repo>/data/monitoring)"
    )
    sample_rows: int = Field(5000, ge=100, description="rows per side the drift and movement checks use")
    permutations: int = Field(200, ge=19, description="permutations behind the drift p-values")
    html_reports: bool = Field(
        False, description="an HTML report for every batch (default: for a batch with a problem, and gates)"
    )


class StepOperations(Section):
    """Operations: metrics, the lock, exit codes."""

    pushgateway: str | None = Field(
        None, description="Prometheus Pushgateway URL for the step's metrics (default: $PUSHGATEWAY_URL)"
    )
    lock_seconds: float = Field(
        300, gt=0, description="the step's lease on the entity set's lock, renewed while it runs"
    )
    lock_wait_seconds: float = Field(
        0, ge=0, description="how long to wait for another step of the entity set to finish"
    )
    exit_codes: bool = Field(
        True,
        description="exit with the code of the batch's most notable decision (3 drift seen, 4 switched, "
        "5 challenger refused, 6 rolled back); false: 0 for every step that completed",
    )


# Each job's config, and the options its pipeline block takes
BLOCKS: dict[str, tuple[type[JobConfig], type[JobConfig]]] = {
    "train": (TrainConfig, TrainOptions),
    "embed": (EmbedConfig, EmbedOptions),
    "publish": (PublishConfig, PublishOptions),
}


class PipelineConfig(PipelineTarget, RetrainPolicy, GateOptions, StepJobs, StepOperations):
    """One daily step for one entity set: embed a new batch with the current version, monitor it, publish
    it; retrain, gate, backfill and switch when the trigger fires; roll a new version back when a batch
    breaches its watch. Idempotent: run it again after a failure, or twice, and nothing is duplicated."""

    @model_validator(mode="before")
    @classmethod
    def _blocks_leave_the_steps_options_alone(cls, values: Any) -> Any:
        """A block may not set what the step sets for its job: the job's target sections, and the options
        the step passes from its own config (entity, model_root, the thresholds, in_process_rows...)."""
        for block, (job, options) in BLOCKS.items():
            given = values.get(block) if isinstance(values, dict) else None
            if not isinstance(given, dict):
                continue
            decided = (set(job.model_fields) - set(options.model_fields)) | set(cls.model_fields)
            if taken := sorted(decided & set(given)):
                raise ValueError(f"{block}: {', '.join(taken)} are set by the step, not in its {block} block")
        return values


# ---------------------------------------------------------------------------------------------
# demo


class DemoConfig(Section):
    """Run train, embed and publish end to end on scikit-learn's digits."""

    work_dir: str = Field("demo_output", description="where the dataset, model versions and Ray results go")
    feature_repo: FeatureRepo = "feature_repo"
    epochs: int = Field(30, gt=0, description="training epochs")
    batch_size: int = Field(
        32, gt=0, description="examples per step on each worker (1797 rows: keep it small)"
    )
    latent_dim: int = Field(16, gt=0, description="size of the latent vector")
    learning_rate: float = Field(1e-3, gt=0, description="Adam peak learning rate")
    kl_warmup_epochs: float = Field(
        5.0, ge=0, description="epochs over which the KL weight rises to 1 (few epochs: lower it)"
    )
    num_workers: int = Field(2, gt=0, description="data-parallel training workers")
    tracking_uri: str | None = Field(
        None,
        description="MLflow registry (default: $MLFLOW_TRACKING_URI, else sqlite:///<work_dir>/mlflow.db)",
    )
