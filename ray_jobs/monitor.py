"""Monitor a latent space: drift of a new batch, movement from another model version, anomaly rate,
collapse; a JSON + HTML report, and the gate `vaectl publish` applies before switching "current".

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

import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from pydantic import Field

from ray_jobs.common import JobConfig, parse_config, ray_session, run_cli
from vae import InputError, load_model_version
from vae.artifacts import ModelVersion, load_reference
from vae.diagnostics import ACTIVE_UNIT_THRESHOLD
from vae.monitor_report import write_monitoring_report
from vae.monitoring import drift_test, movement
from vae.preprocessing import key_hash
from vae.storage import filesystem, is_local, storage_errors, url_of

log = logging.getLogger("ray_jobs.monitor")

EMBEDDING_COLUMNS = ("latent", "anomaly_score", "model_version")
_SAMPLE_BUCKETS = 1 << 20
MIN_DRIFT_ROWS = 20  # below this the tests have no power worth a gate


class GateThresholds(JobConfig):
    """When a version may not become "current" (publish) and a monitoring run fails."""

    min_active_share: float = Field(0.1, ge=0, le=1, description="collapse: least share of latent units with Var(mean) > 0.01")
    drift_alpha: float = Field(0.01, gt=0, lt=1, description="drift: the combined p-value below which drift is declared")
    min_linear_cka: float = Field(0.8, ge=0, le=1, description="movement: least linear CKA to the baseline version")
    min_knn_overlap: float = Field(0.3, ge=0, le=1, description="movement: least mean k-NN overlap@10 with the baseline version")


class MonitorConfig(GateThresholds):
    """Drift, movement, anomaly rate and collapse of a batch's latent vectors, with a report."""

    new: str = Field(description="embeddings to check (a version directory written by vaectl embed)")
    reference: str | None = Field(None, description="reference embeddings by the same version (default: the version's validation reference)")
    baseline: str | None = Field(None, description="embeddings of the same entities by another version: movement")
    model_root: str = Field("models", description="where the model version lives (its manifest's path is tried first)")
    output: str = Field("monitoring", description="reports go to <output>/<version>-<time>/ (local or s3://)")
    sample_rows: int = Field(5000, ge=100, description="rows per side the tests use, chosen by key hash")
    permutations: int = Field(200, ge=19, description="permutations behind the MMD, mean and covariance p-values")
    neighbours: int = Field(10, gt=0, description="k of the k-NN overlap")
    in_memory_rows: int = Field(1_000_000, ge=0, description="inputs above this many rows are read with Ray Data")
    seed: int = Field(0, description="seed of the permutations and the classifier split")


@dataclass
class LatentSample:
    """Sampled rows of one embeddings dataset, plus statistics over all of its rows."""

    source: str
    model_version: str
    keys: np.ndarray
    latents: np.ndarray
    scores: np.ndarray
    total_rows: int
    variance: np.ndarray  # per dimension, over all rows


def monitor(config: MonitorConfig) -> dict:
    """Run the checks and write the report; returns the report (its "passed" says whether every check passed)."""
    new = read_embeddings(config.new, config.sample_rows, config.in_memory_rows)
    version = find_model_version(config.new, config.model_root, new.model_version)
    reference = read_embeddings(config.reference, config.sample_rows, config.in_memory_rows) if config.reference else None
    if reference is not None and reference.model_version != new.model_version:
        raise InputError(f"drift compares one latent space: {config.reference} was embedded by {reference.model_version}, "
                         f"{config.new} by {new.model_version}; compare versions with baseline instead")
    baseline = read_embeddings(config.baseline, config.sample_rows, config.in_memory_rows) if config.baseline else None
    report, arrays = evaluate(new, version, config, reference=reference, baseline=baseline, permutations=config.permutations,
                              neighbours=config.neighbours, seed=config.seed)
    json_path, html_path = write_report(config.output, report, arrays)
    for check in report["checks"]:
        log.info("%s %s: %s", "pass" if check["passed"] else "FAIL", check["name"], check["detail"])
    log.info("report: %s and %s", json_path, html_path)
    report["report"] = {"json": json_path, "html": html_path}
    return report


def evaluate(new: LatentSample, version: ModelVersion, thresholds: GateThresholds, reference: LatentSample | None = None,
             baseline: LatentSample | None = None, permutations: int = 200, neighbours: int = 10, seed: int = 0) -> tuple[dict, dict]:
    """Every check on a new batch of one version: (report, arrays for the plots)."""
    checks: list[dict] = []
    latent_dim = new.latents.shape[1]

    active = int((new.variance > ACTIVE_UNIT_THRESHOLD).sum())
    share = active / latent_dim
    checks.append(_check("collapse", share >= thresholds.min_active_share,
                         f"{active} of {latent_dim} latent units active in this batch ({share:.0%}; need {thresholds.min_active_share:.0%})",
                         share))

    reference_latents, reference_scores, reference_source = None, None, None
    if reference is not None:
        reference_latents, reference_scores, reference_source = reference.latents, reference.scores, reference.source
    elif (stored := load_reference(version)) is not None:
        reference_latents, reference_scores = stored["posterior_mean"], stored["anomaly_score"]
        reference_source = f"validation reference of {version.version} ({len(reference_latents)} rows)"
    drift = None
    if reference_latents is not None and min(len(reference_latents), len(new.latents)) < MIN_DRIFT_ROWS:
        checks.append(_skipped("drift", f"too few rows to test ({len(reference_latents)} reference, {len(new.latents)} new; "
                                        f"need {MIN_DRIFT_ROWS} each)"))
    elif reference_latents is not None:
        if reference_latents.shape[1] != latent_dim:
            raise InputError(f"the reference has {reference_latents.shape[1]}-d latents, the new batch {latent_dim}-d")
        drift = drift_test(reference_latents, new.latents, alpha=thresholds.drift_alpha, permutations=permutations, seed=seed,
                           max_rows=len(new.latents))
        checks.append(_check("drift", not drift["detected"],
                             f"combined p = {drift['p_value']:.3g} (alpha {thresholds.drift_alpha}; strongest: {drift['strongest_test']})",
                             drift["p_value"]))
    else:
        checks.append(_skipped("drift", f"no reference: {version.version} was saved without a validation reference and none was given"))

    moved, distances = None, None
    if baseline is not None:
        shared, new_index, baseline_index = np.intersect1d(new.keys, baseline.keys, return_indices=True)
        if not comparable(new, baseline, neighbours):
            raise InputError(f"{new.source} and {baseline.source} share {len(shared)} sampled entities; movement needs the "
                             "same rows embedded by both versions (embed the reference data with each version)")
        moved = movement(shared, baseline.latents[baseline_index], new.latents[new_index], neighbours=neighbours, seed=seed)
        distances = np.asarray(moved.pop("distances"))
        moved["baseline_version"] = baseline.model_version
        checks.append(_check("movement_cka", moved["linear_cka"] >= thresholds.min_linear_cka,
                             f"linear CKA {moved['linear_cka']:.3f} to {baseline.model_version} (need {thresholds.min_linear_cka})",
                             moved["linear_cka"]))
        overlap = moved["knn_overlap"]["mean"]
        checks.append(_check("movement_knn", overlap >= thresholds.min_knn_overlap,
                             f"k-NN overlap@{neighbours} {overlap:.3f} (need {thresholds.min_knn_overlap})", overlap))

    calibration = version.metadata.get("anomaly") or {}
    threshold = calibration.get("threshold")
    anomaly = {"threshold": threshold, "quantile": calibration.get("quantile"),
               "rate": float((new.scores > threshold).mean()) if threshold is not None else None,
               "expected_rate": 1 - calibration["quantile"] if calibration else None,
               "score_p50": float(np.median(new.scores)), "score_p99": float(np.percentile(new.scores, 99))}
    report = {
        "model_version": new.model_version, "new": new.source, "rows": new.total_rows, "sampled_rows": len(new.latents),
        "reference": reference_source, "baseline": baseline.source if baseline else None,
        "sampling": _sampling(new, reference, baseline),
        "checks": checks, "passed": all(c["passed"] for c in checks), "failures": [f"{c['name']}: {c['detail']}" for c in checks if not c["passed"]],
        "drift": drift, "movement": moved, "anomaly": anomaly, "verdict": _verdict(checks, moved),
        "created_at": datetime.now(UTC).isoformat(),
    }
    arrays = {"reference": reference_latents, "new": new.latents, "reference_scores": reference_scores, "new_scores": new.scores,
              "movement_distances": distances}
    return report, arrays


def comparable(new: LatentSample, baseline: LatentSample, neighbours: int = 10) -> bool:
    """Whether two versions' samples share enough entities for the movement checks (k-NN needs k + 2)."""
    return len(np.intersect1d(new.keys, baseline.keys)) >= neighbours + 2


def write_report(root: str | Path, report: dict, arrays: dict) -> tuple[str, str]:
    """report.json + report.html under <root>/<version>-<UTC time>/ (a local path or s3://); returns where they are."""
    name = f"{report['model_version']}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    fs, base = filesystem(root)
    if is_local(fs):
        return tuple(str(path) for path in write_monitoring_report(Path(base) / name, report, **arrays))
    with tempfile.TemporaryDirectory() as local, storage_errors(str(root)):
        write_monitoring_report(Path(local) / name, report, **arrays)
        fs.put(str(Path(local) / name), f"{base}/{name}", recursive=True)
    return url_of(fs, f"{base}/{name}/report.json"), url_of(fs, f"{base}/{name}/report.html")


def read_embeddings(url: str, sample_rows: int, in_memory_rows: int = 1_000_000) -> LatentSample:
    """A key-hash sample of about sample_rows rows of an embeddings dataset, and per-dimension variance over all rows."""
    fs, root = filesystem(url)
    with storage_errors(url):
        try:
            dataset = pads.dataset(root, format="parquet", filesystem=fs)
        except FileNotFoundError:
            raise InputError(f"{url}: no such file or directory") from None
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(f"{url}: not readable as Parquet ({str(error).splitlines()[0][:200]})") from None
    if not dataset.files:
        raise InputError(f"{url}: no Parquet files found; point at a version directory written by vaectl embed")
    missing = [c for c in EMBEDDING_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise InputError(f"{url}: missing column(s) {', '.join(missing)}; this is not an embeddings dataset (vaectl embed writes them)")
    key_column = dataset.schema.names[0]
    columns = [key_column, *EMBEDDING_COLUMNS]
    total = dataset.count_rows()
    if total == 0:
        raise InputError(f"{url}: the embeddings have no rows")
    fraction = min(1.0, sample_rows / total)
    if total <= in_memory_rows:
        table = dataset.to_table(columns=columns)
        latents = _latent_matrix(table.column("latent"), url)
        variance = latents.astype(np.float64).var(axis=0)
        keep = _sampled(table.column(key_column), fraction)
        table, latents = table.filter(pa.array(keep)), latents[keep]
    else:
        table, variance = _read_with_ray(url, columns, key_column, fraction)
        latents = _latent_matrix(table.column("latent"), url)
    versions = sorted(set(table.column("model_version").unique().to_pylist()))
    if len(versions) != 1:
        raise InputError(f"{url}: holds vectors of {len(versions)} model versions ({', '.join(map(str, versions[:4]))}); "
                         "point at one version's directory")
    log.info("%s: %s rows, %s sampled (%.1f%% by key hash)", url, f"{total:,}", f"{len(latents):,}", 100 * fraction)
    return LatentSample(url, versions[0], table.column(key_column).to_numpy(zero_copy_only=False), latents,
                        table.column("anomaly_score").to_numpy(zero_copy_only=False).astype(np.float64), total, variance)


def _read_with_ray(url: str, columns: list[str], key_column: str, fraction: float) -> tuple[pa.Table, np.ndarray]:
    """Larger than memory: the moments in one streaming pass, the key-hash sample in another."""
    import ray

    def moments(batch: pa.Table) -> dict[str, np.ndarray]:
        latents = _latent_matrix(batch.column("latent"), url).astype(np.float64)
        return {"count": np.array([len(latents)]), "total": latents.sum(axis=0)[None], "squares": (latents**2).sum(axis=0)[None]}

    def sample(batch: pa.Table) -> pa.Table:
        return batch.filter(pa.array(_sampled(batch.column(key_column), fraction)))

    with ray_session():
        dataset = ray.data.read_parquet(url, columns=columns)
        count, total, squares = 0, 0.0, 0.0
        for part in dataset.map_batches(moments, batch_format="pyarrow", batch_size=None).iter_batches(batch_format="numpy"):
            count, total, squares = count + part["count"].sum(), total + part["total"].sum(axis=0), squares + part["squares"].sum(axis=0)
        table = pa.concat_tables(ray.get(dataset.map_batches(sample, batch_format="pyarrow", batch_size=None).to_arrow_refs()))
    mean = total / count
    return table, np.maximum(squares / count - mean**2, 0.0)


def _sampled(keys: pa.Array | pa.ChunkedArray, fraction: float) -> np.ndarray:
    """Rows whose key hash falls in the first `fraction` of buckets: the same keys in any dataset.
    Bits 40-59 of the hash, independent of the validation split (low bits) and worker shards."""
    if fraction >= 1.0:
        return np.ones(len(keys), bool)
    return ((key_hash(keys) >> np.uint64(40)) % np.uint64(_SAMPLE_BUCKETS)) < np.uint64(round(fraction * _SAMPLE_BUCKETS))


def _latent_matrix(column: pa.ChunkedArray | pa.Array, url: str) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(column) == 0:
        return np.empty((0, 0), np.float32)
    lengths = pa.compute.list_value_length(column).to_numpy(zero_copy_only=False)
    if column.null_count or lengths.min() != lengths.max():
        raise InputError(f"{url}: 'latent' has null or different-length vectors; re-embed the data with vaectl embed")
    values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), int(lengths[0]))
    if not np.isfinite(values).all():
        raise InputError(f"{url}: 'latent' holds NaN or infinite values")
    return values


def find_model_version(embeddings: str, model_root: str, version: str) -> ModelVersion:
    """The model version that made the embeddings: at the path in their manifest, else under model_root."""
    fs, root = filesystem(embeddings)
    try:
        with storage_errors(embeddings):
            manifest = json.loads(fs.cat_file(f"{root}/_manifest.json"))
        path = manifest.get("model_path")
        if path and manifest.get("model_version") == version:
            parent, _, name = path.rstrip("/").rpartition("/")
            return load_model_version(parent, name)
    except (OSError, InputError, json.JSONDecodeError):
        pass
    return load_model_version(model_root, version)


def _check(name: str, passed: bool, detail: str, value: float) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail, "value": float(value)}


def _skipped(name: str, detail: str) -> dict:
    return {"name": name, "passed": True, "detail": f"skipped: {detail}", "value": None}


def _sampling(new: LatentSample, reference: LatentSample | None, baseline: LatentSample | None) -> str:
    parts = [f"new: {len(new.latents):,} of {new.total_rows:,} rows sampled by key hash; active units over all rows"]
    for name, sample in (("reference", reference), ("baseline", baseline)):
        if sample is not None:
            parts.append(f"{name}: {len(sample.latents):,} of {sample.total_rows:,} rows")
    return "; ".join(parts) + ". Drift tests use at most the new sample's size per side; movement the shared sampled entities."


def _verdict(checks: list[dict], moved: dict | None) -> str:
    failed = [c["name"] for c in checks if not c["passed"]]
    text = "All checks passed." if not failed else f"Failed: {', '.join(failed)}."
    if moved is not None:
        if moved["linear_cka"] >= 0.95 and moved["knn_overlap"]["mean"] >= 0.7:
            text += (" The new version keeps the baseline's geometry (up to rotation): downstream models that use raw "
                     "coordinates still need retraining or the aligned vectors, those using distances or neighbours do not.")
        else:
            text += " The geometry changed: downstream models trained on the baseline's vectors should be retrained."
    return text


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(MonitorConfig, argv, prog="vaectl monitor")
    report = monitor(config)
    if not report["passed"]:
        raise InputError("monitoring checks failed: " + "; ".join(report["failures"]) + f" (report: {report['report']['html']})")
    return report


if __name__ == "__main__":
    run_cli(main)
