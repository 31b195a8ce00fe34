"""The checks a batch of embeddings must pass: collapse, drift, movement between versions, and the
anomaly rate. `vaectl monitor` reports them; `vaectl publish` refuses to switch "current" when one fails.

    collapse      share of latent units whose posterior mean varies (Var > 0.01) over every row
    drift         the new batch against a reference of the same version (vae.monitoring.statistics.drift_test)
    movement      the same entities embedded by another version (vae.monitoring.statistics.movement)
    anomaly rate  reported against the version's calibrated rate (not a check)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from vae.data.keys import in_sample, key_hash
from vae.diagnostics import ACTIVE_UNIT_THRESHOLD
from vae.embeddings.catalog import Properties
from vae.embeddings.contract import key_column, latent_matrix
from vae.errors import InputError
from vae.monitoring.explain import anomaly_attribution, input_explanation
from vae.monitoring.profile import InputProfile, read_profile
from vae.monitoring.statistics import drift_test, movement
from vae.monitoring.thresholds import Thresholds
from vae.versions.artifacts import ModelVersionInfo, load_profile_text, load_reference

MIN_DRIFT_ROWS = 20  # below this the drift tests have no power worth a gate
SAMPLED_COLUMNS = ("latent", "anomaly_score", "model_version")  # what a sample reads besides the key
MAX_INPUT_PLOTS = 3  # input columns the report plots, reference vs batch


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    value: float | None  # None: skipped


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

    @classmethod
    def of_table(cls, table: pa.Table, source: str, sample_rows: int) -> LatentSample:
        """A key-hash sample of about `sample_rows` rows of an embeddings table held in memory."""
        if table.num_rows == 0:
            raise InputError(f"{source}: the embeddings have no rows")
        latents = latent_matrix(table.column("latent"), source)
        variance = latents.astype(np.float64).var(axis=0)
        key = key_column(table.schema, source, SAMPLED_COLUMNS)
        keep = sample_mask(table.column(key), sample_rows, table.num_rows)
        return cls.of_sampled(table.filter(pa.array(keep)), source, table.num_rows, variance)

    @classmethod
    def of_sampled(
        cls, sampled: pa.Table, source: str, total_rows: int, variance: np.ndarray
    ) -> LatentSample:
        """From rows already sampled (e.g. in a streaming pass), with the variance over all rows."""
        versions = sorted(set(sampled.column("model_version").unique().to_pylist()))
        if len(versions) != 1:
            raise InputError(
                f"{source}: holds vectors of {len(versions)} model versions "
                f"({', '.join(map(str, versions[:4]))}); a sample is of one version's table"
            )
        keys = sampled.column(key_column(sampled.schema, source, SAMPLED_COLUMNS)).to_numpy(
            zero_copy_only=False
        )
        scores = sampled.column("anomaly_score").to_numpy(zero_copy_only=False).astype(np.float64)
        latents = latent_matrix(sampled.column("latent"), source)
        return cls(source, versions[0], keys, latents, scores, total_rows, variance)


def sample_mask(keys: pa.Array | pa.ChunkedArray, sample_rows: int, total_rows: int) -> np.ndarray:
    """Rows in a key-hash sample of about `sample_rows` of `total_rows`: the same keys in any dataset."""
    return in_sample(key_hash(keys), min(1.0, sample_rows / max(total_rows, 1)))


def comparable(new: LatentSample, baseline: LatentSample, neighbours: int = 10) -> bool:
    """Whether two versions' samples share enough entities for the movement checks (k-NN needs k + 2)."""
    return len(np.intersect1d(new.keys, baseline.keys)) >= neighbours + 2


def evaluate(
    new: LatentSample,
    version: ModelVersionInfo,
    thresholds: Thresholds,
    reference: LatentSample | None = None,
    baseline: LatentSample | None = None,
    permutations: int = 200,
    neighbours: int = 10,
    seed: int = 0,
) -> tuple[dict, dict]:
    """Every check on a new batch of one version: (report, arrays for the report's plots).

    The reference is another batch of the same version, else the version's own validation reference."""
    checks = [collapse_check(new, thresholds)]
    reference_latents, reference_scores, reference_source = _reference(version, reference)
    drift, check = drift_check(new, reference_latents, thresholds, permutations, seed, version.version)
    checks.append(check)
    moved, distances = None, None
    if baseline is not None:
        moved, distances, movement_checks = movement_check(new, baseline, thresholds, neighbours, seed)
        checks += movement_checks
    failures = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    report = {
        "model_version": new.model_version,
        "new": new.source,
        "rows": new.total_rows,
        "sampled_rows": len(new.latents),
        "reference": reference_source,
        "baseline": baseline.source if baseline else None,
        "sampling": _sampling(new, reference, baseline),
        "checks": [asdict(c) for c in checks],
        "passed": not failures,
        "failures": failures,
        "drift": drift,
        "movement": moved,
        "anomaly": anomaly_rate(new, version, reference_scores if reference is None else None),
        "verdict": _verdict(checks, moved),
        "created_at": datetime.now(UTC).isoformat(),
    }
    arrays = {
        "reference": reference_latents,
        "new": new.latents,
        "reference_scores": reference_scores,
        "new_scores": new.scores,
        "movement_distances": distances,
    }
    return report, arrays


def collapse_check(new: LatentSample, thresholds: Thresholds) -> Check:
    latent_dim = new.latents.shape[1]
    active = int((new.variance > ACTIVE_UNIT_THRESHOLD).sum())
    share = active / latent_dim
    detail = (
        f"{active} of {latent_dim} latent units active in this batch "
        f"({share:.0%}; need {thresholds.min_active_share:.0%})"
    )
    return Check("collapse", bool(share >= thresholds.min_active_share), detail, share)


def drift_check(
    new: LatentSample,
    reference: np.ndarray | None,
    thresholds: Thresholds,
    permutations: int,
    seed: int,
    version_name: str,
) -> tuple[dict | None, Check]:
    if reference is None:
        reason = f"no reference: {version_name} was saved without a validation reference and none was given"
        return None, _skipped("drift", reason)
    if min(len(reference), len(new.latents)) < MIN_DRIFT_ROWS:
        rows = f"{len(reference)} reference, {len(new.latents)} new"
        return None, _skipped("drift", f"too few rows to test ({rows}; need {MIN_DRIFT_ROWS} each)")
    if reference.shape[1] != new.latents.shape[1]:
        raise InputError(
            f"the reference has {reference.shape[1]}-d latents, the new batch {new.latents.shape[1]}-d"
        )
    drift = drift_test(
        reference,
        new.latents,
        alpha=thresholds.drift_alpha,
        permutations=permutations,
        seed=seed,
        max_rows=len(new.latents),
    )
    detail = (
        f"combined p = {drift['p_value']:.3g} "
        f"(alpha {thresholds.drift_alpha}; strongest: {drift['strongest_test']})"
    )
    return drift, Check("drift", not bool(drift["detected"]), detail, float(drift["p_value"]))


def movement_check(
    new: LatentSample, baseline: LatentSample, thresholds: Thresholds, neighbours: int, seed: int
) -> tuple[dict, np.ndarray, list[Check]]:
    shared, new_index, baseline_index = np.intersect1d(new.keys, baseline.keys, return_indices=True)
    if not comparable(new, baseline, neighbours):
        raise InputError(
            f"{new.source} and {baseline.source} share {len(shared)} sampled entities; movement needs the "
            "same rows embedded by both versions (embed the reference data with each version)"
        )
    moved = movement(
        shared, baseline.latents[baseline_index], new.latents[new_index], neighbours=neighbours, seed=seed
    )
    distances = np.asarray(moved.pop("distances"))
    moved["baseline_version"] = baseline.model_version
    cka, overlap = float(moved["linear_cka"]), float(moved["knn_overlap"]["mean"])
    checks = [
        Check(
            "movement_cka",
            bool(cka >= thresholds.min_linear_cka),
            f"linear CKA {cka:.3f} to {baseline.model_version} (need {thresholds.min_linear_cka})",
            cka,
        ),
        Check(
            "movement_knn",
            bool(overlap >= thresholds.min_knn_overlap),
            f"k-NN overlap@{neighbours} {overlap:.3f} (need {thresholds.min_knn_overlap})",
            overlap,
        ),
    ]
    return moved, distances, checks


def anomaly_rate(
    new: LatentSample, version: ModelVersionInfo, reference_scores: np.ndarray | None = None
) -> dict:
    """The share of the sample above the version's threshold, and the share calibration expects. With
    the version's validation scores (the calibration's own rows), also how many of those exceed the
    threshold and a one-sided Fisher exact p-value of the batch's excess: the calibrated rate itself
    comes from a few hundred rows and is noisy, so a rate above it is evidence only when this is small."""
    calibration = version.metadata.get("anomaly") or {}
    threshold = calibration.get("threshold")
    result = {
        "threshold": threshold,
        "quantile": calibration.get("quantile"),
        "rate": float((new.scores > threshold).mean()) if threshold is not None else None,
        "expected_rate": 1 - calibration["quantile"] if calibration else None,
        "score_p50": float(np.median(new.scores)),
        "score_p99": float(np.percentile(new.scores, 99)),
        "p_value": None,
    }
    if threshold is not None and reference_scores is not None and len(reference_scores):
        from scipy.stats import fisher_exact

        above, rows = int((new.scores > threshold).sum()), len(new.scores)
        reference_above = int((reference_scores > threshold).sum())
        table = [[above, rows - above], [reference_above, len(reference_scores) - reference_above]]
        result |= {
            "reference_rows": len(reference_scores),
            "reference_above": reference_above,
            "p_value": float(fisher_exact(table, alternative="greater")[1]),
        }
    return result


def _reference(
    version: ModelVersionInfo, reference: LatentSample | None
) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    if reference is not None:
        return reference.latents, reference.scores, reference.source
    stored = load_reference(version)
    if stored is None:
        return None, None, None
    latents = stored["posterior_mean"]
    return (
        latents,
        stored["anomaly_score"],
        f"validation reference of {version.version} ({len(latents)} rows)",
    )


def _skipped(name: str, detail: str) -> Check:
    return Check(name, True, f"skipped: {detail}", None)


def _sampling(new: LatentSample, reference: LatentSample | None, baseline: LatentSample | None) -> str:
    parts = [
        f"new: {len(new.latents):,} of {new.total_rows:,} rows sampled by key hash; active units over all "
        "rows"
    ]
    for name, sample in (("reference", reference), ("baseline", baseline)):
        if sample is not None:
            parts.append(f"{name}: {len(sample.latents):,} of {sample.total_rows:,} rows")
    tail = ". Drift tests use at most the new sample's size per side; movement the shared sampled entities."
    return "; ".join(parts) + tail


def _verdict(checks: list[Check], moved: dict | None) -> str:
    failed = [c.name for c in checks if not c.passed]
    text = "All checks passed." if not failed else f"Failed: {', '.join(failed)}."
    if moved is None:
        return text
    if moved["linear_cka"] >= 0.95 and moved["knn_overlap"]["mean"] >= 0.7:
        return text + (
            " The new version keeps the baseline's geometry (up to rotation): downstream models that use "
            "raw coordinates still need retraining or the aligned vectors, those using distances or "
            "neighbours do not."
        )
    return (
        text
        + " The geometry changed: downstream models trained on the baseline's vectors should be retrained."
    )


def explain_inputs(
    report: dict,
    arrays: dict,
    version: ModelVersionInfo,
    batch_profile: InputProfile | None,
    anomalous: pa.Table | None = None,
) -> None:
    """Add what moved in the inputs to a batch's report (report["inputs"]: ranked columns, a summary
    phrase for the decision line, a note) and the top columns' values to its plots; with the batch's
    anomalous rows (top_columns, top_shares), each column's share of their surprise."""
    text = load_profile_text(version)
    reference = InputProfile.from_json(text) if text else None
    inputs = input_explanation(reference, batch_profile, report.get("drift"))
    if anomalous is not None and anomalous.num_rows and "top_columns" in anomalous.column_names:
        inputs["anomaly_attribution"] = anomaly_attribution(
            anomalous.column("top_columns").to_pylist(), anomalous.column("top_shares").to_pylist()
        )
    report["inputs"] = inputs
    if reference is not None and batch_profile is not None:
        arrays["input_columns"] = [
            (shift["column"], reference, batch_profile) for shift in inputs["columns"][:MAX_INPUT_PLOTS]
        ]


def batch_inputs(catalog, table, batch_id: str) -> tuple[InputProfile | None, pa.Table | None]:
    """A committed batch's input profile (None: embedded without one) and its anomalous rows' top
    columns and shares (None: a table from before attribution), for explain_inputs."""
    import pyarrow.compute as pc

    batch = next((b for b in catalog.batches(table) if b.batch_id == batch_id), None)
    url = batch.properties.get(Properties.PROFILE) if batch else None
    profile = read_profile(url) if url else None
    if "top_columns" not in table.schema().column_names:
        return profile, None
    rows = catalog.read(table, ["is_anomaly", "top_columns", "top_shares"], batches=[batch_id])
    return profile, rows.filter(pc.fill_null(rows.column("is_anomaly"), False))
