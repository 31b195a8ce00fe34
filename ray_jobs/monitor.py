"""Monitor a latent space: drift of a new batch, movement from another model version, anomaly rate,
collapse (the checks of vae.gate); a JSON + HTML report.

    read the new batch's embeddings (a sample by key hash; mean and spread over every row)
    -> reference: another batch embedded by the same version, or the version's own validation
       reference (saved with it at training)
    -> baseline (optional): the same entities embedded by another version -> movement
    -> checks against thresholds -> <output>/<version>-<time>/report.json + report.html

Inputs are embeddings as `vaectl embed` writes them (local or s3://). Up to `in_memory_rows` rows
they are read in this process; larger inputs are read with Ray Data (two streaming passes: the
moments, then the sample), so they never have to fit in memory. The sample is chosen by a hash of
the entity key, so two versions' embeddings of the same rows yield the same entities.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from ray_jobs.cli import run_cli
from ray_jobs.cluster import ray_session
from ray_jobs.config import MonitorConfig, parse_config
from vae import InputError
from vae.embeddings import latent_matrix, model_version_of, open_embeddings
from vae.gate import SAMPLED_COLUMNS, LatentSample, evaluate, sample_mask
from vae.monitor_report import write_report

log = logging.getLogger("ray_jobs.monitor")


def run(config: MonitorConfig) -> dict:
    """The CLI's entry: the report, or an error (exit code 2) when a check failed."""
    report = monitor(config)
    if not report["passed"]:
        failures = "; ".join(report["failures"])
        raise InputError(f"monitoring checks failed: {failures} (report: {report['report']['html']})")
    return report


def monitor(config: MonitorConfig) -> dict:
    """Run the checks and write the report; returns the report (its "passed" says whether every check
    passed)."""
    new = read_embeddings(config.new, config.sample_rows, config.in_memory_rows)
    version = model_version_of(config.new, config.model_root, new.model_version)
    reference = None
    if config.reference:
        reference = read_embeddings(config.reference, config.sample_rows, config.in_memory_rows)
        if reference.model_version != new.model_version:
            raise InputError(
                f"drift compares one latent space: {config.reference} was embedded by "
                f"{reference.model_version}, "
                f"{config.new} by {new.model_version}; compare versions with baseline instead"
            )
    baseline = (
        read_embeddings(config.baseline, config.sample_rows, config.in_memory_rows)
        if config.baseline
        else None
    )
    report, arrays = evaluate(
        new,
        version,
        config.thresholds(),
        reference=reference,
        baseline=baseline,
        permutations=config.permutations,
        neighbours=config.neighbours,
        seed=config.seed,
    )
    json_path, html_path = write_report(config.output, report, arrays)
    for check in report["checks"]:
        log.info("%s %s: %s", "pass" if check["passed"] else "FAIL", check["name"], check["detail"])
    log.info("report: %s and %s", json_path, html_path)
    report["report"] = {"json": json_path, "html": html_path}
    return report


def read_embeddings(url: str, sample_rows: int, in_memory_rows: int = 1_000_000) -> LatentSample:
    """A key-hash sample of about sample_rows rows of an embeddings dataset, and per-dimension
    variance over all rows: in this process up to in_memory_rows rows, else with Ray Data."""
    dataset, key_column = open_embeddings(url)
    columns = [key_column, *SAMPLED_COLUMNS]
    total = dataset.count_rows()
    if total == 0:
        raise InputError(f"{url}: the embeddings have no rows")
    if total <= in_memory_rows:
        sample = LatentSample.of_table(dataset.to_table(columns=columns), url, sample_rows)
    else:
        sampled, variance = _read_with_ray(url, columns, key_column, sample_rows, total)
        sample = LatentSample.of_sampled(sampled, url, total, variance)
    share = 100 * len(sample.latents) / total
    log.info(
        "%s: %s rows, %s sampled (%.1f%% by key hash)", url, f"{total:,}", f"{len(sample.latents):,}", share
    )
    return sample


def _read_with_ray(
    url: str, columns: list[str], key_column: str, sample_rows: int, total: int
) -> tuple[pa.Table, np.ndarray]:
    """Larger than memory: the moments in one streaming pass, the key-hash sample in another."""
    import ray

    def moments(batch: pa.Table) -> dict[str, np.ndarray]:
        latents = latent_matrix(batch.column("latent"), url).astype(np.float64)
        return {
            "count": np.array([len(latents)]),
            "total": latents.sum(axis=0)[None],
            "squares": (latents**2).sum(axis=0)[None],
        }

    def sample(batch: pa.Table) -> pa.Table:
        return batch.filter(pa.array(sample_mask(batch.column(key_column), sample_rows, total)))

    with ray_session():
        dataset = ray.data.read_parquet(url, columns=columns)
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
