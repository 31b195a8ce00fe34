"""`vaectl embeddings history|export|decisions|migrate`: look at and move an entity set's Iceberg tables.

history <entity> [<version>]   the version's batches (rows, snapshot, event time, run) and its
                               snapshots, oldest first: what `--as-of` can name
export <entity> [<version>]    rows as of a snapshot id or time (--as-of), of one batch or all,
                               to one Parquet file (local or s3://): an offline copy, time-travelled
decisions <entity>             the daily pipeline's decision log, oldest first (--batch: one batch)
lineage --run-id RUN           the embedding views a downstream MLflow run read through Feast, each
                               with its model version, registered MLflow version and training run
migrate --source ROOT          Parquet-directory versions (<root>/<version>/*.parquet, as written
                               before the tables) into tables, each as one batch named `migrated`;
                               a version already migrated is left as it is
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ray_jobs.cli import run_cli
from ray_jobs.config import EmbeddingsCommand, parse_config
from vae import InputError
from vae.embeddings import contract
from vae.embeddings.catalog import EmbeddingsCatalog, Properties, snapshot_of
from vae.embeddings.runs import RunPaths, file_url
from vae.storage import filesystem, open_parquet_dataset, storage_errors, url_of

log = logging.getLogger("ray_jobs.embeddings")
MIGRATED_BATCH = "migrated"


def run(config: EmbeddingsCommand) -> dict:
    catalog = EmbeddingsCatalog(*config.catalog_settings())
    if config.command == "migrate":
        return migrate(catalog, config)
    if config.command == "decisions":
        return decisions(catalog, config)
    if config.command == "lineage":
        return lineage(config)
    version = config.version(catalog, config.model_version)
    table = catalog.table(config.entity, version)
    return history(catalog, table) if config.command == "history" else export(catalog, table, config)


def decisions(catalog: EmbeddingsCatalog, config: EmbeddingsCommand) -> dict:
    """The entity set's decision log (vae.pipeline.decisions), one line per decision, printed and returned."""
    from vae.pipeline.decisions import DecisionLog

    found = DecisionLog(catalog, config.entity).read()
    if config.batch:
        found = [d for d in found if d.batch_id == config.batch]
    print(f"vae.{config.entity}.decisions: {len(found)} decision(s)")
    for decision in found:
        print("  " + decision.line())
    return {"decisions": [decision.line() for decision in found]}


def lineage(config: EmbeddingsCommand) -> dict:
    """The VAE training runs behind what a downstream run read, printed and returned."""
    from feast_embeddings.lineage import training_runs
    from feast_embeddings.repo import EmbeddingsRepo

    if not config.run_id:
        raise InputError("lineage: give --run-id, the downstream model's MLflow run")
    yaml_path = Path(config.feature_store_yaml)
    found = training_runs(EmbeddingsRepo(yaml_path.parent, yaml_path), config.run_id)
    print(f"MLflow run {config.run_id} read {len(found)} embedding view(s):")
    for entry in found:
        print(
            f"  {entry['view']}: {entry['registered_model']} version {entry['registered_version']} "
            f"({entry['model_version']}), trained by run {entry['training_run']}"
        )
    return {"lineage": found}


def history(catalog: EmbeddingsCatalog, table) -> dict:
    """The batches live now and every snapshot, printed as two tables and returned."""
    batches = catalog.batches(table)
    print(f"{'.'.join(table.name())}: {len(batches)} batch(es), {sum(b.rows for b in batches):,} rows")
    print(f"  {'batch':<24} {'rows':>10} {'snapshot':>20}  {'committed':<25} {'event time':<25} run")
    for batch in batches:
        print(
            f"  {batch.batch_id:<24} {batch.rows:>10,} {batch.snapshot_id:>20}  {batch.committed_at:<25} "
            f"{batch.event_time or '':<25} {batch.run_id}"
        )
    snapshots = []
    print("  snapshots (use with --as-of):")
    for snapshot in table.snapshots():
        properties = snapshot.summary.additional_properties
        row = {
            "snapshot_id": snapshot.snapshot_id,
            "committed_at": _iso(snapshot.timestamp_ms),
            "operation": snapshot.summary.operation.value,
            "batch_id": properties.get(Properties.BATCH, ""),
            "total_rows": int(properties.get("total-records", 0)),
        }
        snapshots.append(row)
        print(
            f"    {row['snapshot_id']:>20}  {row['committed_at']:<25} {row['operation']:<8} "
            f"batch {row['batch_id']:<24} {row['total_rows']:>10,} rows in the table"
        )
    return {"table": ".".join(table.name()), "batches": [vars(b) for b in batches], "snapshots": snapshots}


def export(catalog: EmbeddingsCatalog, table, config: EmbeddingsCommand) -> dict:
    """The rows as of a snapshot (or time), of one batch or all, as one Parquet file."""
    if not config.output:
        raise InputError("export needs --output: the Parquet file to write (local or s3://)")
    snapshot = snapshot_of(table, config.as_of)
    rows = catalog.read(table, batches=[config.batch] if config.batch else None, as_of=config.as_of)
    fs, path = filesystem(config.output)
    with storage_errors(config.output):
        fs.makedirs(path.rpartition("/")[0] or ".", exist_ok=True)
        with fs.open(path, "wb") as file:
            pq.write_table(rows, file)
    log.info(
        "exported %s rows of %s as of snapshot %s to %s",
        f"{rows.num_rows:,}",
        ".".join(table.name()),
        snapshot.snapshot_id if snapshot else "(none)",
        url_of(fs, path),
    )
    return {
        "rows": rows.num_rows,
        "snapshot_id": snapshot.snapshot_id if snapshot else None,
        "output": config.output,
    }


def migrate(catalog: EmbeddingsCatalog, config: EmbeddingsCommand) -> dict:
    """Each version directory under the source root becomes a table with one batch, `migrated`."""
    if not config.source:
        raise InputError("migrate needs --source: the old embeddings root (<root>/<version>/*.parquet)")
    fs, root = filesystem(config.source)
    with storage_errors(config.source):
        entries = fs.ls(root, detail=True) if fs.isdir(root) else []
    versions = sorted(e["name"].rstrip("/").rpartition("/")[2] for e in entries if e["type"] == "directory")
    versions = [v for v in versions if not v.startswith((".", "_"))]
    if not versions:
        raise InputError(f"{config.source}: no version directories to migrate (<root>/<version>/*.parquet)")
    migrated, skipped = [], []
    for version in versions:
        if _migrate_version(catalog, config.entity, url_of(fs, f"{root}/{version}"), version):
            migrated.append(version)
        else:
            skipped.append(version)
    log.info(
        "migrated %d version(s) into entity '%s'; %d already there",
        len(migrated),
        config.entity,
        len(skipped),
    )
    return {"migrated": migrated, "skipped": skipped}


def _migrate_version(catalog: EmbeddingsCatalog, entity: str, url: str, version: str) -> bool:
    dataset = open_parquet_dataset(url, "point --source at the old embeddings root")
    required = tuple(c for c in contract.COLUMNS[:6] if c != "batch_id")
    key = contract.key_column(dataset.schema, url, required)
    with storage_errors(url):
        rows = contract.with_attribution(dataset.to_table())
    versions = set(rows.column("model_version").cast(pa.string()).unique().to_pylist())
    if versions != {version}:
        raise InputError(f"{url}: holds vectors of model versions {sorted(versions)}, not only {version}")
    key_type = "int64" if pa.types.is_integer(rows.schema.field(key).type) else "string"
    owner = catalog.register(entity, key, key_type)
    schema = contract.schema(key, pa.int64() if key_type == "int64" else pa.string())
    table = catalog.create_table(owner, version, schema, {Properties.MIGRATED_FROM: url})
    if any(b.batch_id == MIGRATED_BATCH for b in catalog.batches(table)):
        return False
    rows = rows.append_column("batch_id", pa.array([MIGRATED_BATCH] * rows.num_rows, pa.string()))
    rows = rows.select(schema.names).cast(schema)
    paths = RunPaths.of(table.location(), MIGRATED_BATCH, f"migrate-{uuid.uuid4().hex[:12]}")
    target_fs, target = filesystem(paths.data)
    target_fs.makedirs(target, exist_ok=True)
    with target_fs.open(f"{target}/part-00000.parquet", "wb") as file:
        pq.write_table(rows, file)
    run = paths.data.rsplit("/", 1)[-1]
    catalog.commit_batch(
        table,
        MIGRATED_BATCH,
        [file_url(target_fs, f"{target}/part-00000.parquet")],
        {Properties.MIGRATED_FROM: url, Properties.EMBEDDED_ROWS: str(rows.num_rows)},
        run,
        0,
    )
    log.info("migrated %s (%s rows) into %s", url, f"{rows.num_rows:,}", ".".join(table.name()))
    return True


def _iso(milliseconds: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(milliseconds / 1000, UTC).isoformat()


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(EmbeddingsCommand, argv, prog="vaectl embeddings"))


if __name__ == "__main__":
    run_cli(main)
