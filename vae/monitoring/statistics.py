"""Is a latent space still the one downstream models learned? Drift, version movement, anomaly thresholds.

Drift compares a reference batch with a new batch embedded by the same model version. Five tests,
each with a valid p-value, on bounded samples (cost does not grow with the data):

    per_dimension   two-sample Kolmogorov-Smirnov per latent dimension, Holm-adjusted (family-wise)
    mmd             RBF-kernel MMD^2 (median-heuristic bandwidth), block estimator, permutation null
    mean_shift      squared standardized mean difference, permutation null
    covariance      relative Frobenius distance of the standardized covariances, permutation null
    classifier      held-out ROC AUC of a gradient-boosted classifier telling the batches apart;
                    under no drift its held-out scores are exchangeable, so Mann-Whitney gives p

Drift is declared when the Bonferroni-combined p-value (5 x the smallest) is below alpha, so the
false-positive rate of the whole procedure is at most alpha.

Movement compares two model versions on the same entities: both spaces standardized (centred,
scaled to unit total variance), aligned by orthogonal Procrustes, then linear CKA, per-entity
distance after alignment and k-NN neighbourhood overlap. Rotations and reflections, which a VAE
retrained from another seed is free to make, cost nothing; real changes in geometry do.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

DRIFT_TESTS = ("per_dimension", "mmd", "mean_shift", "covariance", "classifier")
ANOMALY_QUANTILES = (0.9, 0.95, 0.99, 0.999)


# ---------------------------------------------------------------------------------------------
# Drift within one latent space


def drift_test(
    reference: np.ndarray,
    new: np.ndarray,
    alpha: float = 0.05,
    permutations: int = 200,
    seed: int = 0,
    max_rows: int = 5000,
    mmd_block: int = 512,
) -> dict:
    """All five tests on (up to max_rows per side of) two samples of posterior means, and the combined
    decision."""
    reference, new = _check_pair(reference, new)
    rng = np.random.default_rng(seed)
    reference, new = _subsample(reference, max_rows, rng), _subsample(new, max_rows, rng)
    results = {
        "per_dimension": per_dimension_test(reference, new, alpha),
        "mmd": mmd_test(reference, new, permutations, rng, mmd_block),
        "mean_shift": mean_shift_test(reference, new, permutations, rng),
        "covariance": covariance_test(reference, new, permutations, rng, max_rows=min(max_rows, 2000)),
        "classifier": classifier_test(reference, new, rng),
    }
    smallest = min(results[name]["p_value"] for name in DRIFT_TESTS)
    combined = min(1.0, len(DRIFT_TESTS) * smallest)
    strongest = min(DRIFT_TESTS, key=lambda name: results[name]["p_value"])
    return {
        "detected": combined < alpha,
        "p_value": combined,
        "alpha": alpha,
        "strongest_test": strongest,
        "reference_rows": len(reference),
        "new_rows": len(new),
        "permutations": permutations,
        "seed": seed,
        "tests": results,
    }


def per_dimension_test(reference: np.ndarray, new: np.ndarray, alpha: float = 0.05) -> dict:
    """Kolmogorov-Smirnov per dimension; Holm's adjustment keeps the chance of any false alarm below alpha."""
    result = stats.ks_2samp(reference, new, axis=0)
    statistic, p = np.atleast_1d(result.statistic), np.atleast_1d(result.pvalue)
    adjusted = holm(p)
    return {
        "p_value": float(adjusted.min()),
        "ks_statistic": _rounded(statistic),
        "p_values": _rounded(p, 6),
        "adjusted_p_values": _rounded(adjusted, 6),
        "drifted_dimensions": [int(i) for i in np.flatnonzero(adjusted < alpha)],
        "drifted_share": float((adjusted < alpha).mean()),
    }


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    scaled = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def rbf_bandwidth(points: np.ndarray, rng: np.random.Generator, max_points: int = 1000) -> float:
    """The median heuristic: the median distance between two points of the pooled sample."""
    sample = _subsample(points, max_points, rng)
    distances = np.sqrt(_squared_distances(sample, sample))
    upper = distances[np.triu_indices(len(sample), k=1)]
    median = float(np.median(upper)) if len(upper) else 1.0
    return median if median > 0 else 1.0


def mmd_test(
    reference: np.ndarray, new: np.ndarray, permutations: int, rng: np.random.Generator, block: int = 512
) -> dict:
    """Block MMD^2 (Zaremba et al. 2013): the mean of unbiased MMD^2 over disjoint blocks of `block` rows
    per side.

    The null is built by permuting the labels within each block: a group of permutations under which
    two samples from one distribution are exchangeable, so the p-value is exact, and each block's
    kernel matrix is computed once (cost linear in the rows, not quadratic). Up to `block` rows per
    side this is the ordinary quadratic-time unbiased MMD^2.
    """
    rows = min(len(reference), len(new))
    reference, new = reference[rng.permutation(len(reference))[:rows]], new[rng.permutation(len(new))[:rows]]
    bandwidth = rbf_bandwidth(np.concatenate([reference, new]), rng)
    blocks = max(1, rows // block)
    observed, null = 0.0, np.zeros(permutations)
    for index in range(blocks):
        part = slice(index * rows // blocks, (index + 1) * rows // blocks)
        pooled = np.concatenate([reference[part], new[part]])
        size = len(pooled) // 2
        kernel = np.exp(-_squared_distances(pooled, pooled) / (2.0 * bandwidth**2))
        np.fill_diagonal(kernel, 0.0)  # unbiased: no k(x, x) terms
        labels = np.zeros((len(pooled), permutations + 1))
        labels[:size, 0] = 1.0  # column 0: the observed split
        for column in range(1, permutations + 1):
            labels[rng.permutation(len(pooled))[:size], column] = 1.0
        statistics = _mmd_from_labels(kernel, labels, size)
        observed += statistics[0] / blocks
        null += statistics[1:] / blocks
    return {
        "p_value": float((1 + np.sum(null >= observed)) / (1 + permutations)),
        "mmd2": float(observed),
        "bandwidth": bandwidth,
        "block_rows": rows // blocks,
        "blocks": blocks,
        "rows_per_side": rows,
        "null": _rounded(null, 8),
    }


def _mmd_from_labels(kernel: np.ndarray, labels: np.ndarray, size: int) -> np.ndarray:
    """Unbiased MMD^2 for each column of 0/1 labels (1 = first sample), from a zero-diagonal kernel."""
    other = 1.0 - labels
    first = np.sum(labels * (kernel @ labels), axis=0)
    second = np.sum(other * (kernel @ other), axis=0)
    cross = np.sum(labels * (kernel @ other), axis=0)
    return (first + second) / (size * (size - 1)) - 2.0 * cross / size**2


def mean_shift_test(
    reference: np.ndarray, new: np.ndarray, permutations: int, rng: np.random.Generator
) -> dict:
    """Mean of the squared per-dimension mean differences in pooled standard deviations, permutation
    p-value."""
    pooled = _standardized(np.concatenate([reference, new]))
    weights = np.empty((permutations + 1, len(pooled)))
    weights[0] = np.r_[np.full(len(reference), -1.0 / len(reference)), np.full(len(new), 1.0 / len(new))]
    for row in range(1, permutations + 1):
        weights[row] = rng.permutation(weights[0])
    statistics = np.mean((weights @ pooled) ** 2, axis=1)
    difference = weights[0] @ pooled
    return {
        "p_value": float((1 + np.sum(statistics[1:] >= statistics[0])) / (1 + permutations)),
        "mean_squared_standardized_difference": float(statistics[0]),
        "standardized_mean_difference": _rounded(difference),
        "largest_dimension": int(np.argmax(np.abs(difference))),
    }


def covariance_test(
    reference: np.ndarray, new: np.ndarray, permutations: int, rng: np.random.Generator, max_rows: int = 2000
) -> dict:
    """||C_new - C_reference||_F / ||C_pooled||_F of the standardized data, permutation p-value."""
    reference, new = _subsample(reference, max_rows, rng), _subsample(new, max_rows, rng)
    pooled = _standardized(np.concatenate([reference, new]))
    scale = np.linalg.norm(np.cov(pooled, rowvar=False)) or 1.0
    is_new = np.r_[np.zeros(len(reference), bool), np.ones(len(new), bool)]

    def statistic(mask: np.ndarray) -> float:
        return float(
            np.linalg.norm(np.cov(pooled[mask], rowvar=False) - np.cov(pooled[~mask], rowvar=False)) / scale
        )

    observed = statistic(is_new)
    null = np.array([statistic(rng.permutation(is_new)) for _ in range(permutations)])
    return {
        "p_value": float((1 + np.sum(null >= observed)) / (1 + permutations)),
        "relative_frobenius_distance": observed,
        "rows_per_side": [len(reference), len(new)],
    }


def classifier_test(reference: np.ndarray, new: np.ndarray, rng: np.random.Generator) -> dict:
    """Train a classifier on half of each sample to tell them apart; its ROC AUC on the other half.

    0.5 = indistinguishable. The held-out scores of the two samples are exchangeable when there is
    no drift, so a one-sided Mann-Whitney test of them is a valid p-value.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    features = np.concatenate([reference, new])
    labels = np.r_[np.zeros(len(reference)), np.ones(len(new))]
    order = rng.permutation(len(features))
    train, test = order[: len(order) // 2], order[len(order) // 2 :]
    classifier = HistGradientBoostingClassifier(
        max_iter=100,
        learning_rate=0.1,
        max_leaf_nodes=15,
        early_stopping=False,
        random_state=int(rng.integers(2**31)),
    )
    classifier.fit(features[train], labels[train])
    scores = classifier.predict_proba(features[test])[:, 1]
    new_scores, reference_scores = scores[labels[test] == 1], scores[labels[test] == 0]
    if len(new_scores) == 0 or len(reference_scores) == 0:
        return {"p_value": 1.0, "auc": 0.5, "test_rows": len(test)}
    result = stats.mannwhitneyu(new_scores, reference_scores, alternative="greater")
    return {
        "p_value": float(result.pvalue),
        "auc": float(result.statistic / (len(new_scores) * len(reference_scores))),
        "test_rows": len(test),
    }


# ---------------------------------------------------------------------------------------------
# Movement between two model versions


def movement(
    keys: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    neighbours: int = 10,
    top: int = 20,
    max_rows: int = 5000,
    seed: int = 0,
) -> dict:
    """How far the same entities moved from one version's space (`before`) to another's (`after`).

    Both standardized, `before` rotated onto `after` by orthogonal Procrustes. Movement is the
    distance after alignment in units of the spaces' RMS spread: 0 = same place, ~1.4 = unrelated.
    """
    if len(before) != len(after) or len(keys) != len(before):
        raise ValueError(
            f"movement needs the same entities in both versions: {len(keys)} keys, {len(before)} and "
            f"{len(after)} rows"
        )
    if len(before) < neighbours + 2:
        raise ValueError(f"movement needs more than {neighbours + 1} shared entities, got {len(before)}")
    rng = np.random.default_rng(seed)
    if len(before) > max_rows:
        picked = np.sort(rng.choice(len(before), max_rows, replace=False))
        keys, before, after = keys[picked], before[picked], after[picked]
    source, target = _unit_total_variance(before), _unit_total_variance(after)
    width = max(source.shape[1], target.shape[1])  # versions may differ in latent size: pad with zeros
    source, target = _pad(source, width), _pad(target, width)
    rotation = procrustes_rotation(source, target)
    distances = np.linalg.norm(source @ rotation - target, axis=1)
    overlap = knn_overlap(source, target, neighbours)
    movers = np.argsort(-distances)[:top]
    return {
        "rows": len(keys),
        "linear_cka": linear_cka(source, target),
        "movement": {
            "mean": float(distances.mean()),
            **{f"p{q}": float(np.percentile(distances, q)) for q in (50, 90, 99)},
            "max": float(distances.max()),
        },
        "knn_overlap": {
            "k": neighbours,
            "mean": float(overlap.mean()),
            "p10": float(np.percentile(overlap, 10)),
        },
        "top_movers": [{"key": _plain(keys[i]), "movement": float(distances[i])} for i in movers],
        "distances": _rounded(distances, 4),
    }


def procrustes_rotation(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The orthogonal R minimizing ||source @ R - target||_F (Schoenemann 1966): U V^T of svd(source^T
    target)."""
    u, _, vt = np.linalg.svd(source.T @ target)
    return u @ vt


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centered kernel alignment (Kornblith et al. 2019): 1 = same geometry up to rotation and
    scale."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    normalizer = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / normalizer) if normalizer > 0 else 0.0


def knn_overlap(x: np.ndarray, y: np.ndarray, k: int = 10) -> np.ndarray:
    """Per row: the share of its k nearest neighbours (itself excluded) that are the same in both spaces."""
    first, second = nearest_neighbours(x, k), nearest_neighbours(y, k)
    pairs = zip(first, second, strict=True)
    return np.array([len(np.intersect1d(a, b, assume_unique=True)) / k for a, b in pairs])


def nearest_neighbours(points: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Indices of each row's k nearest other rows (exact, in chunks of rows)."""
    result = np.empty((len(points), k), dtype=np.int64)
    for start in range(0, len(points), chunk):
        distances = _squared_distances(points[start : start + chunk], points)
        distances[np.arange(len(distances)), np.arange(start, start + len(distances))] = np.inf  # not itself
        result[start : start + chunk] = np.argpartition(distances, k, axis=1)[:, :k]
    return result


# ---------------------------------------------------------------------------------------------
# Anomaly thresholds


def anomaly_thresholds(
    scores: np.ndarray, quantiles: tuple[float, ...] = ANOMALY_QUANTILES
) -> dict[str, float]:
    """Score quantiles of (validation) rows: a row above the q threshold is rarer than 1 - q of them."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if len(scores) == 0:
        raise ValueError("no finite anomaly scores to calibrate thresholds on")
    return {str(q): float(np.quantile(scores, q)) for q in quantiles}


def anomaly_calibration(
    latents: np.ndarray, scores: np.ndarray, quantile: float, rows: int
) -> tuple[dict, dict]:
    """What a model version keeps for monitoring from its validation rows: the reference (up to
    `rows` posterior means and scores) and the anomaly thresholds, `quantile`'s chosen."""
    reference = {"posterior_mean": latents[:rows], "anomaly_score": scores[:rows]}
    thresholds = anomaly_thresholds(reference["anomaly_score"], tuple(sorted({*ANOMALY_QUANTILES, quantile})))
    anomaly = {
        "quantile": quantile,
        "threshold": thresholds[str(quantile)],
        "thresholds": thresholds,
        "validation_rows": len(reference["anomaly_score"]),
    }
    return reference, anomaly


# ---------------------------------------------------------------------------------------------


def _check_pair(reference: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference, new = np.asarray(reference, np.float64), np.asarray(new, np.float64)
    if reference.ndim != 2 or new.ndim != 2 or reference.shape[1] != new.shape[1]:
        raise ValueError(f"drift compares vectors of one size: reference {reference.shape}, new {new.shape}")
    if min(len(reference), len(new)) < 20:
        raise ValueError(
            f"drift needs at least 20 rows on each side: reference {len(reference)}, new {len(new)}"
        )
    if not (np.isfinite(reference).all() and np.isfinite(new).all()):
        raise ValueError("latent vectors contain NaN or infinite values")
    return reference, new


def _subsample(points: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    return points if len(points) <= rows else points[np.sort(rng.choice(len(points), rows, replace=False))]


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    distances = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * a @ b.T
    return np.maximum(distances, 0.0)


def _standardized(points: np.ndarray) -> np.ndarray:
    spread = points.std(axis=0)
    return (points - points.mean(axis=0)) / np.where(spread > 1e-12, spread, 1.0)


def _unit_total_variance(points: np.ndarray) -> np.ndarray:
    centered = np.asarray(points, np.float64) - np.mean(points, axis=0)
    scale = math.sqrt(float((centered**2).sum(axis=1).mean()))
    return centered / scale if scale > 0 else centered


def _pad(points: np.ndarray, width: int) -> np.ndarray:
    return np.pad(points, ((0, 0), (0, width - points.shape[1]))) if points.shape[1] < width else points


def _rounded(values: np.ndarray, digits: int = 5) -> list[float]:
    return [round(float(v), digits) for v in np.asarray(values).ravel()]


def _plain(value):
    return value.item() if hasattr(value, "item") else value
