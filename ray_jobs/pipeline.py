"""The daily step a scheduler runs for one entity set: `vaectl pipeline --entity item --data <batch>`.

    lock      one step per entity set at a time: a lease in the catalog's database, renewed while
              the step runs, so a crashed step cannot hold it for ever
    champion  the version "current" points at; the first step uses initial_version or trains one
    embed     the batch with the champion (and, while a new version is watched, with the version it
              replaced, so that a rollback needs no re-encoding); its inputs are profiled in the same
              pass and checked against the champion's training inputs: a failed check is recorded
              (warn), keeps the batch out of training and the trigger (block-retrain), or stops the
              step before anything is embedded (refuse)
    monitor   drift against the champion's validation reference, anomaly rate against the calibrated
              one, collapse (vae.monitoring.gate); an alarm names the input columns that moved most
    publish   the batch online under the champion (and the watched-over version)
    watch     a version switched to within the last watch_batches batches that breaches on this batch
              is rolled back: "current" points at the version it replaced (not on a batch the data
              checks blocked: that breach is the upstream's)
    retrain   when the trigger fires (vae.pipeline.policy): a challenger trained on the recent batches,
              backfilled (every batch the champion serves, embedded with the challenger), gated
              (collapse, movement against the champion on shared entities, held-out ELBO) and either
              switched to or refused and left pinned with its report
    record    each decision one row of the entity set's decision log (vae.pipeline.decisions), the figures
              pushed to a Prometheus Pushgateway, the exit code that of the most notable decision

Every part is idempotent: embed commits a batch once per run id, publish writes what is not online
yet, a decision already in the log is not appended again, and a challenger trained for this batch
is reused. A step killed anywhere is finished by running the same command again; a step run twice
changes nothing the second time.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pyarrow as pa

from feast_embeddings.repo import EmbeddingsRepo
from feast_embeddings.versions import rollback, switch_current
from ray_jobs import pushgateway
from ray_jobs.cli import run_cli
from ray_jobs.config import (
    EmbedConfig,
    PipelineConfig,
    PublishConfig,
    TrainConfig,
    TrainOptions,
    parse_config,
)
from ray_jobs.embed import embed, embed_batches
from ray_jobs.publish import publish
from vae.embeddings.catalog import Batch, Properties, model_version_info
from vae.embeddings.lock import Lease, LockHeld
from vae.embeddings.requests import is_stream_batch
from vae.embeddings.runs import EmbedResult, check_batch_id
from vae.errors import DataRefused, InputError, first_line
from vae.killpoints import killpoint
from vae.monitoring.gate import SAMPLED_COLUMNS, LatentSample, batch_inputs, evaluate, explain_inputs
from vae.monitoring.report import write_report
from vae.pipeline.decisions import Decision, DecisionLog, exit_code, of_batch
from vae.pipeline.policy import (
    BatchHealth,
    Trigger,
    heldout_check,
    pending_retrain,
    recorded,
    table_schema,
    training_window,
    unlogged_rollback,
    unlogged_switch,
    watch_breach,
    watched_over,
)
from vae.storage import open_parquet_dataset
from vae.versions.artifacts import ModelVersionInfo, list_model_versions, read_model_version_info
from vae.versions.mlflow_registry import CHALLENGER, GATE_TAG, registered_model_name

log = logging.getLogger("ray_jobs.pipeline")
STEP_SUCCESS = "1 when the last step completed, 0 when it failed"


@dataclass
class Step:
    """One run of the step: its settings, the feature repo, the decision log, the figures."""

    config: PipelineConfig
    repo: EmbeddingsRepo
    decisions: DecisionLog
    batch: str
    metrics: pushgateway.JobMetrics
    lease: Lease | None = None  # the entity set's lock: checked before every write
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def entity(self) -> str:
        return self.config.entity

    pending: list[Decision] = field(default_factory=list)

    def decide(self, kind: str, version: str | None, reason: str = "", later: bool = False, **detail) -> None:
        """Log a decision; later: with the next one (the routine embed, monitor, publish of a batch go
        in one commit: a re-run redoes them anyway)."""
        self.pending.append(Decision(self.batch, kind, version, reason, detail))
        if not later:
            self.flush()

    def before_write(self) -> None:
        """Stop (LeaseLost) if another step may hold the entity set's lock now."""
        if self.lease is not None:
            self.lease.check()

    def flush(self) -> None:
        if self.pending:
            self.before_write()
            self.decisions.append(self.pending, self.run)
            self.pending = []

    def log(self) -> list[Decision]:
        """The whole log, this run's pending decisions included."""
        return [*self.decisions.read(), *self.pending]

    def recorded(self, kind: str, version: str | None = None) -> Decision | None:
        """This batch's decision of a kind (for a version), recorded by this run or an earlier one."""
        return recorded(self.log(), self.batch, kind, version)


@dataclass
class StepResult:
    entity: str
    batch_id: str
    current: str
    decisions: list[Decision]  # the batch's, in the order decided
    exit_code: int
    timings: dict[str, float]


def run(config: PipelineConfig) -> StepResult:
    """The CLI's entry: exits with the batch's decision code (see exit_codes)."""
    result = step(config)
    if config.exit_codes and result.exit_code:
        sys.exit(result.exit_code)
    return result


def step(config: PipelineConfig) -> StepResult:
    """Run the step under the entity set's lock; push its figures, also when it fails."""
    started = time.perf_counter()
    metrics = pushgateway.JobMetrics("pipeline", config.entity)
    batch = config.batch or batch_name(config.data)
    labels = {"batch": batch}
    try:
        result = _locked_step(config, batch, metrics)
    except BaseException:
        metrics.set("step_success", 0, STEP_SUCCESS, **labels)
        metrics.set("step_last_failure_timestamp_seconds", time.time(), "when a step last failed")
        metrics.push(config.pushgateway)
        raise
    metrics.set("step_success", 1, STEP_SUCCESS, **labels)
    metrics.set("step_last_success_timestamp_seconds", time.time(), "when a step last completed")
    metrics.set("step_duration_seconds", time.perf_counter() - started, "wall time of the step", **labels)
    metrics.set("step_exit_code", result.exit_code, "the step's decision code", **labels)
    for kind in {d.kind for d in result.decisions}:
        count = sum(d.kind == kind for d in result.decisions)
        metrics.set("step_decisions", count, "decisions of the batch, per kind", kind=kind, **labels)
    metrics.push(config.pushgateway)
    return result


def _locked_step(config: PipelineConfig, batch: str, metrics: pushgateway.JobMetrics) -> StepResult:
    repo = EmbeddingsRepo(config.feature_repo, config.feature_store_yaml)
    check_batch_id(batch)
    try:
        with repo.catalog.lock(
            f"pipeline-{config.entity}", config.lock_seconds, config.lock_wait_seconds, renew=True
        ) as lease:
            decisions = DecisionLog(repo.catalog, config.entity)
            return daily_step(Step(config, repo, decisions, batch, metrics, lease))
    except LockHeld as error:
        raise InputError(f"another pipeline step of '{config.entity}' is running: {error}") from None


def daily_step(step: Step) -> StepResult:
    """embed -> monitor -> publish -> watch or retrain, for one batch."""
    serving = step.repo.publication(step.entity).current
    record_an_unlogged_switch(step, serving)
    champion = serving or first_version(step)
    try:
        result = embed_batch(step, champion, step.config.data, step.batch)
    except DataRefused as refused:
        return refuse_batch(step, champion, refused)
    record_data_checks(step, champion, result)
    watched = watched_over(step.log(), champion, step.batch, step.config.watch_batches)
    if watched:  # the version a rollback would return to gets the batch too
        embed_batch(step, watched, step.config.data, step.batch)
    health, report = monitor_batch(step, champion)
    publish_version(step, champion, switch=serving is None)
    if serving is None:
        step.decide("switched", champion, "the entity set's first version", **{"from": None})
    if watched:
        publish_version(step, watched)
    step.flush()
    multiple = step.config.anomaly_rate_multiple
    # a batch the data checks blocked says the upstream broke, not the new version: no rollback
    blocked = step.recorded("data_blocked", champion) is not None
    if watched and not blocked and (breach := watch_breach(health, multiple)):
        roll_back(step, champion, watched, breach)
    elif not watched and (reason := retrain_due(step, champion)):
        retrain(step, champion, reason)
    return finish(step)


def finish(step: Step) -> StepResult:
    """Log the batch's decisions, push the current version's figures, return the step's outcome."""
    step.flush()
    current = step.repo.publication(step.entity).current
    if current:
        push_current(step, current)
    decisions = of_batch(step.decisions.read(), step.batch)
    code = exit_code(decisions)
    log.info(
        "%s batch %s done: current %s, %s (exit code %d)",
        step.entity,
        step.batch,
        current,
        ", ".join(d.kind for d in decisions),
        code,
    )
    return StepResult(step.entity, step.batch, current, decisions, code, step.timings)


def record_an_unlogged_switch(step: Step, serving: str | None) -> None:
    """A step killed between switching "current" (to the version it trained for this batch, or back in
    a rollback) and logging it: the re-run logs the switch (itself one registry write, done or not)."""
    log = step.log()
    for missing in (unlogged_switch(log, step.batch, serving), unlogged_rollback(log, step.batch, serving)):
        if missing is not None:
            step.decide(missing.kind, missing.model_version, missing.reason, **missing.detail)


# -- the first version ---------------------------------------------------------------------------------


def first_version(step: Step) -> str:
    """Nothing is current: the configured initial version, or one trained on this batch."""
    config = step.config
    if trained := step.recorded("challenger_trained"):
        return trained.model_version
    if config.initial_version and (
        config.initial_version != "latest" or list_model_versions(config.model_root)
    ):
        return read_model_version_info(config.model_root, config.initial_version).version
    step.decide("retrain_started", None, f"no model version of '{step.entity}' yet", window=[step.batch])
    version = train_challenger(step, None, [config.data])
    step.decide("challenger_trained", version, "first version", data=[config.data])
    return version


# -- embed, monitor, publish ---------------------------------------------------------------------------


def embed_config(step: Step, version: str, data: str, batch: str, event_time: datetime | None) -> EmbedConfig:
    """The embed job's settings for one batch: the step's embed block, what the step sets."""
    config = step.config
    return EmbedConfig(
        **config.embed.model_dump(exclude_unset=True),
        in_process_rows=config.in_process_rows,
        data=data,
        entity=config.entity,
        feature_store_yaml=str(step.repo.yaml),
        model_root=config.model_root,
        model_version=version,
        batch=batch,
        event_time=event_time or (config.event_time if batch == step.batch else None),
        timestamp_column=config.timestamp_column,
    )


def embed_batch(step: Step, version: str, data: str, batch: str, event_time: datetime | None = None):
    """One batch with one version (a re-run commits nothing); records 'embedded' for today's batch."""
    step.before_write()
    result = embed(embed_config(step, version, data, batch, event_time))
    pushgateway.embed_figures(step.metrics, result)
    step.timings[f"embed {version} {batch}"] = result.seconds
    if batch == step.batch:
        step.decide(
            "embedded",
            version,
            f"{result.embedded_rows:,} rows ({result.quarantined_rows:,} quarantined)",
            later=True,
            data=data,
            rows=result.embedded_rows,
            quarantined=result.quarantined_rows,
            snapshot_id=result.snapshot_id,
        )
    return result


def record_data_checks(step: Step, version: str, result: EmbedResult) -> None:
    """The batch's failed data checks as one decision: data_warning (recorded only) or data_blocked (kept
    out of training and the retrain trigger), the most severe checks first."""
    severity = result.data_severity
    if severity not in ("warn", "block-retrain"):
        return
    order = {"refuse": 0, "block-retrain": 1, "warn": 2}
    failed = sorted((c for c in result.data_checks if not c["passed"]), key=lambda c: order[c["severity"]])
    kind = "data_blocked" if severity == "block-retrain" else "data_warning"
    reason = "; ".join(f"{c['name']}: {c['detail']}" for c in failed)
    if kind == "data_blocked":
        reason = f"kept out of training and the retrain trigger: {reason}"
    step.decide(kind, version, reason, later=True, checks=failed)


def refuse_batch(step: Step, version: str, refused: DataRefused) -> StepResult:
    """The batch's data checks refused it: nothing embedded, monitored or published; the decision (and
    the exit code, 8) says which checks."""
    pushgateway.data_check_figures(step.metrics, version, step.batch, refused.checks)
    step.decide("data_refused", version, first_line(refused), checks=refused.checks)
    return finish(step)


def monitor_batch(step: Step, version: str) -> tuple[BatchHealth, dict]:
    """The batch's drift, anomaly rate and collapse against the version's own validation reference."""
    started = time.perf_counter()
    catalog, config = step.repo.catalog, step.config
    table = catalog.table(step.entity, version)
    join_key = catalog.entity_set(step.entity).join_key
    rows = catalog.read(table, [join_key, *SAMPLED_COLUMNS], batches=[step.batch])
    new = LatentSample.of_table(rows, f"{'.'.join(table.name())} batch {step.batch}", config.sample_rows)
    info = model_version_info(table, config.model_root)
    report, arrays = evaluate(new, info, config.thresholds(), permutations=config.permutations, seed=0)
    explain_inputs(report, arrays, info, *batch_inputs(catalog, table, step.batch))
    health = BatchHealth.of_report(step.batch, report)
    problems = health.problems(config.anomaly_rate_multiple)
    # the plots (a second or more) where a person will look: a batch with a problem
    json_path, html = write_report(
        monitoring_root(step), report, arrays, html=bool(problems) or config.html_reports
    )
    pushgateway.monitoring_figures(step.metrics, report, step.batch)
    step.timings["monitor"] = time.perf_counter() - started
    pushgateway.stage(step.metrics, "monitor", step.timings["monitor"], rows.num_rows, model_version=version)
    summary = "healthy" if not problems else "; ".join(problems)
    inputs = report["inputs"]
    step.decide("monitored", version, summary, later=True, health=health.__dict__, report=html or json_path)
    if problems:
        step.decide("drift_seen", version, summary, later=True, report=html, inputs=inputs["columns"][:5])
    return health, report


def publish_version(step: Step, version: str, switch: bool = False) -> dict:
    """Write what of the version is not online yet; switch 'current' to it only when asked."""
    config = step.config
    started = time.perf_counter()
    options = {"show": 0, **config.publish.model_dump(exclude_unset=True)}
    step.before_write()
    summary = publish(
        PublishConfig(
            **options,
            **config.thresholds().__dict__,
            entity=step.entity,
            model_version=version,
            feature_repo=config.feature_repo,
            feature_store_yaml=config.feature_store_yaml,
            switch_current=switch,
            model_root=config.model_root,
            monitoring=str(monitoring_root(step)),
        )
    )
    seconds = time.perf_counter() - started
    step.timings[f"publish {version}"] = seconds
    pushgateway.publish_figures(step.metrics, summary, seconds)
    if version == step.repo.publication(step.entity).current:
        rows = summary["rows"]
        step.decide("published", version, f"{rows:,} rows written online", later=True, rows=rows)
    return summary


# -- watch and rollback --------------------------------------------------------------------------------


def roll_back(step: Step, champion: str, previous: str, reason: str) -> None:
    """Point 'current' back at the version the champion replaced: it holds every batch already."""
    step.before_write()
    rollback(step.repo, step.entity, to=previous)
    killpoint("pipeline.rolled_back")
    step.decide("rolled_back", champion, reason, to=previous)


# -- retraining ----------------------------------------------------------------------------------------


def retrain_due(step: Step, champion: str) -> str | None:
    """Why to retrain after this batch (vae.pipeline.policy.pending_retrain), or None."""
    config = step.config
    trigger = Trigger(config.drift_batches, config.drift_window, config.anomaly_rate_multiple)
    return pending_retrain(step.log(), step.batch, champion, trigger, config.retry_batches)


def retrain(step: Step, champion: str, reason: str) -> None:
    """Train a challenger on the recent batches, backfill it, gate it, switch or refuse."""
    window = training_window(step.log(), step.config.train_window)
    step.decide("retrain_started", champion, reason, window=[batch for batch, _ in window])
    trained = step.recorded("challenger_trained")
    challenger = trained.model_version if trained else None
    if challenger is None:
        try:
            challenger = train_challenger(step, champion, [data for _, data in window])
        except InputError as error:  # the window cannot train a challenger: the champion keeps serving
            why = f"training failed: {first_line(error)}"
            step.decide("challenger_refused", None, why, champion=champion, failed="training")
            return
        step.decide("challenger_trained", challenger, f"on {len(window)} batches", champion=champion)
    name_challenger(step, challenger)
    backfill(step, champion, challenger)
    passed, failures, report = gate_challenger(step, champion, challenger, window)
    if not passed:
        step.decide("challenger_refused", challenger, "; ".join(failures), champion=champion, report=report)
        if registry := step.repo.model_registry:
            registry.tag_version(registered_model_name(step.entity), challenger, {GATE_TAG: "refused"})
        return
    publish_version(step, challenger)
    step.before_write()
    switch_current(step.repo, step.entity, challenger)
    step.decide("switched", challenger, f"retrained: {reason}", **{"from": champion, "report": report})
    step.decide("published", challenger, "every batch of the champion, backfilled")


def name_challenger(step: Step, challenger: str) -> None:
    """MLflow's @challenger on the version the gate is about to judge (registered if it is not)."""
    if (registry := step.repo.model_registry) is None:
        return
    name = registered_model_name(step.entity)
    registry.register(name, challenger, read_model_version_info(step.config.model_root, challenger).path)
    registry.set_alias(name, CHALLENGER, challenger)


def train_challenger(step: Step, champion: str | None, data: list[str]) -> str:
    """A new version on the window's data: the champion's own training options (the config's train
    block on top), warm-started from its weights."""
    from ray_jobs.train import train

    config = step.config
    options: dict = {}
    if champion is not None:
        metadata = read_model_version_info(config.model_root, champion).metadata
        recipe = metadata["training"]
        # its options, not its targets; nor its storage_path, as its run resolved it (an absolute path on
        # that run's machine): the block's, else the default, holds the challenger's checkpoints
        options = {k: v for k, v in recipe.items() if k in TrainOptions.model_fields and k != "storage_path"}
        if options.get("missing") == "model" and not metadata["architecture"].get("missingness"):
            options["missing"] = "skip"  # a champion from before the missingness head: scored as it was
    options.update(config.train.model_dump(exclude_unset=True))
    options["entity"] = step.entity
    # the registry the feature store names: the challenger's run and version land where its alias will
    options["tracking_uri"] = step.repo.model_registry.uri if step.repo.model_registry else None
    if champion is not None and config.warm_start:
        options["init_from"] = champion
    started = time.perf_counter()
    step.before_write()
    version = train(
        TrainConfig(**options, data=data if len(data) > 1 else data[0], model_root=config.model_root)
    )
    step.timings["train"] = time.perf_counter() - started
    pushgateway.stage(step.metrics, "train", step.timings["train"], 0, model_version=version)
    pushgateway.version_figures(
        step.metrics, version, read_model_version_info(config.model_root, version).metadata
    )
    return version


def backfill(step: Step, champion: str, challenger: str) -> None:
    """Every batch the champion's table holds, embedded with the challenger as the same batch: one job over
    the inputs of every batch (one pool of encoders, or this process when small), each batch its own
    commit. O(the champion's history), once per retrain; a re-run commits only what is missing."""
    catalog = step.repo.catalog
    started = time.perf_counter()
    batches = replayable(catalog.batches(catalog.table(step.entity, champion)))
    configs = []
    for batch in batches:
        source = batch.properties.get(Properties.DATA)
        if not source:
            raise InputError(f"batch {batch.batch_id} of {champion} does not record its input data")
        when = datetime.fromisoformat(batch.event_time) if batch.event_time else None
        config = embed_config(step, challenger, source, batch.batch_id, when)
        # the champion serves these batches: the challenger must too (its checks are recorded, never refuse)
        checks = config.data_checks.model_copy(update=config.data_checks.without_refusal())
        configs.append(config.model_copy(update={"data_checks": checks}))
    step.before_write()
    results = embed_batches(configs)
    killpoint("pipeline.backfilled")
    rows = sum(result.input_rows for result in results)
    seconds = time.perf_counter() - started
    step.timings["backfill"] = seconds
    pushgateway.stage(step.metrics, "backfill", seconds, rows, model_version=challenger)
    step.decide("backfilled", challenger, f"{len(batches)} batches, {rows:,} rows", champion=champion)


def window_inputs(
    window: list[tuple[str, str]], join_key: str, versions: tuple[ModelVersionInfo, ...]
) -> pa.Table | None:
    """The window's raw rows (key, batch_id and the numeric columns) that the held-out check needs to put
    mixed tables' scores in raw units; None for vectors and images. The same data the challenger was
    trained on, read on retraining days only."""
    schemas = [schema for info in versions if (schema := table_schema(info.metadata)) is not None]
    if not schemas:
        return None
    numeric = sorted({c.name for schema in schemas for c in schema.columns if c.kind == "numeric"})
    parts = []
    for batch, data in window:
        part = open_parquet_dataset(data).to_table(columns=[join_key, *numeric])
        parts.append(part.append_column("batch_id", pa.array([batch] * part.num_rows, pa.string())))
    return pa.concat_tables(parts)


def replayable(batches: list[Batch]) -> list[Batch]:
    """The batches a backfill embeds again: those with an input; the rows the encoding service embedded on
    request have none, and the daily batches that follow embed those items from their input again."""
    streamed = [b.batch_id for b in batches if is_stream_batch(b.batch_id)]
    if streamed:
        log.info("backfill leaves out %d batches embedded on request: %s", len(streamed), ", ".join(streamed))
    return [b for b in batches if not is_stream_batch(b.batch_id)]


def gate_challenger(
    step: Step, champion: str, challenger: str, window: list[tuple[str, str]]
) -> tuple[bool, list[str], str]:
    """Collapse and drift of the challenger's window batches (batch, data), movement against the champion
    on the same entities, held-out -ELBO against the champion's on the same rows: (passed, failures,
    report)."""
    catalog, config = step.repo.catalog, step.config
    join_key = catalog.entity_set(step.entity).join_key
    tables = {v: catalog.table(step.entity, v) for v in (challenger, champion)}
    have = {b.batch_id for b in catalog.batches(tables[champion])}
    shared = [(batch, data) for batch, data in window if batch in have]
    columns = [join_key, *SAMPLED_COLUMNS, "batch_id"]
    rows = {v: catalog.read(t, columns, batches=[batch for batch, _ in shared]) for v, t in tables.items()}
    samples = {
        v: LatentSample.of_table(rows[v], ".".join(tables[v].name()), config.sample_rows) for v in rows
    }
    info = model_version_info(tables[challenger], config.model_root)
    report, arrays = evaluate(
        samples[challenger],
        info,
        config.thresholds(),
        baseline=samples[champion],
        permutations=config.permutations,
    )
    champion_info = model_version_info(tables[champion], config.model_root)
    inputs = window_inputs(shared, join_key, (info, champion_info))
    check = heldout_check(rows, join_key, info, champion_info, config.elbo_margin, inputs)
    report["checks"].append(check.__dict__)
    if not check.passed:
        report["failures"].append(f"{check.name}: {check.detail}")
        report["passed"] = False
    _, html = write_report(monitoring_root(step), report, arrays)
    pushgateway.version_figures(step.metrics, challenger, info.metadata, report.get("movement"))
    log.info("challenger %s gate %s: %s", challenger, "passed" if report["passed"] else "FAILED", html)
    return report["passed"], report["failures"], str(html)


# -- figures -------------------------------------------------------------------------------------------


def push_current(step: Step, current: str) -> None:
    info = read_model_version_info(step.config.model_root, current).metadata
    created = datetime.fromisoformat(info["created_at"]).timestamp()
    step.metrics.set(
        "current_version_created_timestamp_seconds",
        created,
        "when the version 'current' points at was saved",
        model_version=current,
    )
    pushgateway.version_figures(step.metrics, current, info)


def monitoring_root(step: Step) -> str:
    """Where the step's reports go: <monitoring>/<batch>/<version>-<time>/ (the publish gate's too)."""
    root = step.config.monitoring or str(Path(step.config.feature_repo) / "data" / "monitoring")
    return f"{root.rstrip('/')}/{step.batch}"


def batch_name(data: str) -> str:
    """A batch's default name from its path: .../date=2026-11-23/ -> 2026-11-23; day-3.parquet -> day-3."""
    last = data.rstrip("/").rsplit("/", 1)[-1]
    last = re.sub(r"\.parquet$", "", last)
    return last.split("=", 1)[-1]


def main(argv: list[str] | None = None) -> StepResult:
    return run(parse_config(PipelineConfig, argv, prog="vaectl pipeline"))


if __name__ == "__main__":
    run_cli(main)
