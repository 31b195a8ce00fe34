"""Monitor a latent space: drift of a new batch, movement from another model version, anomaly rate,
collapse (the checks of vae.monitoring.gate); a JSON + HTML report.

    the version's Iceberg table (vae.embeddings.catalog), as of now or a snapshot / time (--as-of)
    -> the new rows: one batch (default: the newest), or every batch (--batch all); a sample by key
       hash, mean and spread over every row
    -> reference: another batch of the same version (--reference-batch), or the version's own
       validation reference (saved with it at training)
    -> baseline (optional): another version of the entity set, on the entities both embedded
    -> checks against thresholds -> <output>/<version>-<time>/report.json + report.html

Up to `in_memory_rows` rows are read in this process; larger inputs are read with Ray Data from the
snapshot's data files (two streaming passes: the moments, then the sample), so they never have to
fit in memory. The sample is chosen by a hash of the entity key, so two versions' embeddings of the
same rows yield the same entities.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from ray_jobs import pushgateway
from ray_jobs.cli import run_cli
from ray_jobs.cluster import ray_session
from ray_jobs.config import MonitorConfig, parse_config
from vae import InputError
from vae.embeddings.catalog import EmbeddingsCatalog, model_version_info
from vae.embeddings.contract import latent_matrix
from vae.monitoring.gate import (
    SAMPLED_COLUMNS,
    LatentSample,
    batch_inputs,
    evaluate,
    explain_inputs,
    sample_mask,
)
from vae.monitoring.report import write_report

log = logging.getLogger("ray_jobs.monitor")


def run(config: MonitorConfig) -> dict:
    """The CLI's entry: the report, or an error (exit code 2) when a check failed."""
    report = monitor(config)
    metrics = pushgateway.JobMetrics("monitor", config.entity)
    pushgateway.monitoring_figures(metrics, report, ",".join(report["batches"] or ["all"]))
    metrics.push()
    if not report["passed"]:
        failures = "; ".join(report["failures"])
        raise InputError(f"monitoring checks failed: {failures} (report: {report['report']['html']})")
    return report


def monitor(config: MonitorConfig) -> dict:
    """Run the checks and write the report; returns the report (its "passed" says whether every check
    passed)."""
    catalog = EmbeddingsCatalog(*config.catalog_settings())
    version = config.version(catalog, config.model_version)
    table = catalog.table(config.entity, version)
    batches = new_batches(catalog, table, config.batch, config.as_of)
    new = read_embeddings(catalog, table, batches, config)
    reference = None
    if config.reference_batch:
        reference = read_embeddings(
            catalog, table, new_batches(catalog, table, config.reference_batch, config.as_of), config
        )
    baseline = None
    if config.baseline_version:
        other = catalog.table(config.entity, config.version(catalog, config.baseline_version))
        baseline = read_embeddings(catalog, other, None, config)
    info = model_version_info(table, config.model_root)
    report, arrays = evaluate(
        new,
        info,
        config.thresholds(),
        reference=reference,
        baseline=baseline,
        permutations=config.permutations,
        neighbours=config.neighbours,
        seed=config.seed,
    )
    report["batches"] = batches
    if batches and len(batches) == 1:  # one batch: the input columns that moved, against training's
        explain_inputs(report, arrays, info, *batch_inputs(catalog, table, batches[0]))
    json_path, html_path = write_report(config.output, report, arrays)
    for check in report["checks"]:
        log.info("%s %s: %s", "pass" if check["passed"] else "FAIL", check["name"], check["detail"])
    log.info("report: %s and %s", json_path, html_path)
    report["report"] = {"json": json_path, "html": html_path}
    return report


def new_batches(catalog: EmbeddingsCatalog, table, batch: str | None, as_of: str | None) -> list[str] | None:
    """The batches to check: one by name, the newest committed (default), or None for all ('all')."""
    committed = catalog.batches(table, as_of)
    if not committed:
        raise InputError(f"{'.'.join(table.name())} has no batches{f' as of {as_of}' if as_of else ''}")
    if batch == "all":
        return None
    if batch is None:
        return [committed[-1].batch_id]
    if batch not in {b.batch_id for b in committed}:
        have = ", ".join(b.batch_id for b in committed[-5:])
        raise InputError(f"{'.'.join(table.name())} has no batch '{batch}' (newest: {have})")
    return [batch]


def read_embeddings(
    catalog: EmbeddingsCatalog, table, batches: list[str] | None, config: MonitorConfig
) -> LatentSample:
    """A key-hash sample of about sample_rows rows of some batches of a table (None: all), and
    per-dimension variance over all of their rows: in this process up to in_memory_rows rows, else
    with Ray Data."""
    join_key = catalog.entity_set(config.entity).join_key
    columns = [join_key, *SAMPLED_COLUMNS]
    source = ".".join(table.name()) + (f" batch {', '.join(batches)}" if batches else "")
    counts = {b.batch_id: b.rows for b in catalog.batches(table, config.as_of)}
    total = sum(rows for batch, rows in counts.items() if batches is None or batch in batches)
    if total == 0:
        raise InputError(f"{source}: the embeddings have no rows")
    if total <= config.in_memory_rows:
        rows = catalog.read(table, columns, batches=batches, as_of=config.as_of)
        sample = LatentSample.of_table(rows, source, config.sample_rows)
    else:
        files = catalog.data_files(table, batches, config.as_of)
        sampled, variance = _read_with_ray(files, columns, join_key, config.sample_rows, total, source)
        sample = LatentSample.of_sampled(sampled, source, total, variance)
    share = 100 * len(sample.latents) / total
    log.info(
        "%s: %s rows, %s sampled (%.1f%% by key hash)",
        source,
        f"{total:,}",
        f"{len(sample.latents):,}",
        share,
    )
    return sample


def _read_with_ray(
    files: list[str], columns: list[str], key_column: str, sample_rows: int, total: int, source: str
) -> tuple[pa.Table, np.ndarray]:
    """Larger than memory: the moments in one streaming pass, the key-hash sample in another."""
    import ray

    def moments(batch: pa.Table) -> dict[str, np.ndarray]:
        latents = latent_matrix(batch.column("latent"), source).astype(np.float64)
        return {
            "count": np.array([len(latents)]),
            "total": latents.sum(axis=0)[None],
            "squares": (latents**2).sum(axis=0)[None],
        }

    def sample(batch: pa.Table) -> pa.Table:
        return batch.filter(pa.array(sample_mask(batch.column(key_column), sample_rows, total)))

    with ray_session():
        dataset = ray.data.read_parquet(files, columns=columns)
        count, sums, squares = 0, 0.0, 0.0
        parts = dataset.map_batches(moments, batch_format="pyarrow", batch_size=None)
        for part in parts.iter_batches(batch_format="numpy"):
            count += part["count"].sum()
            sums, squares = sums + part["total"].sum(axis=0), squares + part["squares"].sum(axis=0)
        sampled = dataset.map_batches(sample, batch_format="pyarrow", batch_size=None)
        table = pa.concat_tables(ray.get(sampled.to_arrow_refs()))
    mean = sums / count
    return table, np.maximum(squares / count - mean**2, 0.0)


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(MonitorConfig, argv, prog="vaectl monitor"))


if __name__ == "__main__":
    run_cli(main)
