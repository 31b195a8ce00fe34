"""Anomaly score variants on the five ODDS sets, in process: the research harness for the default table
recipe (issue 31), not the product's path (`benchmarks.anomaly` is).

Each seed trains small mixed-table VAEs with the library (vae.model, vae.losses) as the train job's
recipe does (10% key-hash validation split, KL warm-up, 5% trimmed loss), without Ray, and scores every
row several ways; IsolationForest in the same run. Variants:

    robust-z2      the recipe before 2026-12-07: robust/log transforms (benchmarks.anomaly.legacy_transforms),
                   latent 2, -ELBO at the posterior mean
    robust         the same with latent 8
    quantile       quantile transforms (normal scores), latent 8: heavy tails and point masses tamed
    asinh-z2       today's recipe: the asinh transform (robust scaling, then a signed log of the tails)
    asinh          the same with latent 8
    knn            the robust model's posterior mean: mean distance to its 10 nearest validation rows
    knn-asinh      the same over the asinh model's posterior mean
    max3 / mean3   robust, quantile and knn, each as its quantile among the validation rows (never
                   trained on), combined by max (a row is as unusual as its most unusual view) or mean
    views3         asinh, quantile and knn-asinh, calibrated the same way, averaged
    asinh-b1       asinh, latent 8, beta 1: the latent stays informative (beta 8 leaves no unit active on
                   thyroid, cardio, pendigits and wbc: those models score with a per-column Gaussian)
    knn-b1         k-NN over asinh-b1's posterior means
    mean-b1        asinh-b1 and knn-b1, calibrated, averaged

Each model's active latent units (posterior-mean variance over the validation rows > 0.01, as the train
job counts them) are printed and saved beside the AUCs.

Sets: the five ODDS sets, and three held-out sets built the ODDS way from data that scikit-learn ships
(no download; never used to choose a variant): wbc (breast cancer: benign rows, 21 malignant ones),
wine (classes 2 and 3, 10 rows of class 1), optdigits (8x8 digits 1-9, 50 zeros).

    python -m benchmarks.anomaly_variants [--seeds 3] [--first-seed 0] [--sets thyroid,wbc] [--data-dir ...]
"""

from __future__ import annotations

import argparse
import math
from statistics import mean
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from benchmarks.anomaly import DATA_DIR, ODDS, legacy_transforms, load_odds, odds_table
from benchmarks.common import parse_args, save
from vae.data.keys import is_validation, key_hash
from vae.data.tabular import TableStats, fit_table
from vae.diagnostics import active_units
from vae.losses import elbo_terms
from vae.model import VAE, ModelConfig

VALIDATION = 0.1
NEIGHBOURS = 10
HELD_OUT = ("wbc", "wine", "optdigits")


def held_out_set(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels) of a held-out set: one class's rows subsampled as the anomalies, the way ODDS built
    its wbc, wine and optdigits sets, from scikit-learn's bundled copies (fixed sample, seed 0)."""
    from sklearn import datasets

    loaders = {
        "wbc": (datasets.load_breast_cancer, 0, 21),  # (loader, anomaly class, anomalies kept)
        "wine": (datasets.load_wine, 0, 10),
        "optdigits": (datasets.load_digits, 0, 50),
    }
    load, anomaly_class, kept = loaders[name]
    x, y = load(return_X_y=True)
    rng = np.random.default_rng(0)
    picked = rng.choice(np.flatnonzero(y == anomaly_class), kept, replace=False)
    rows = np.concatenate([np.flatnonzero(y != anomaly_class), picked])
    labels = np.concatenate([np.zeros(len(rows) - kept, int), np.ones(kept, int)])
    order = rng.permutation(len(rows))
    return x[rows][order].astype(np.float32), labels[order]


def trained(
    codes: np.ndarray,
    layout: tuple,
    train: np.ndarray,
    seed: int,
    latent: int,
    epochs: int,
    beta: float = 8.0,
) -> VAE:
    """The benchmark recipe (hidden [32, 16], beta 8 reached over 10 epochs, trim 0.05, batch 64)."""
    torch.manual_seed(seed)
    model = VAE(
        ModelConfig(codes.shape[1], latent, (32, 16), "mixed", column_layout=layout, missingness=True)
    )
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.from_numpy(codes[train])
    warmup, step = 10 * math.ceil(len(x) / 64), 0
    for _ in range(epochs):
        for rows in torch.randperm(len(x)).split(64):
            loss = elbo_terms(model, x[rows]).loss(beta=beta * min(1.0, step / warmup), trim_fraction=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return model.eval()


class View(NamedTuple):
    """One model's reading of every row."""

    score: np.ndarray  # -ELBO at the posterior mean
    posterior_mean: np.ndarray
    active_units: int  # as the train job counts them: posterior-mean variance over validation rows > 0.01


def view(
    table: pa.Table,
    transform: str,
    validation: np.ndarray,
    seed: int,
    latent: int,
    epochs: int,
    beta: float = 8.0,
) -> View:
    """Every row under one transform (robust-log: the old auto's choice per column)."""
    kinds = tuple((name, "numeric") for name in table.column_names[1:])
    chosen = legacy_transforms(table) if transform == "robust-log" else {}
    stats = TableStats.of(table, kinds, key_hash(table.column(0)))
    schema = fit_table(stats, kinds, chosen, "robust" if chosen else transform)
    codes = schema.codes(table)[0]
    model = trained(codes, schema.layout, ~validation, seed, latent, epochs, beta)
    with torch.no_grad():
        terms = elbo_terms(model, torch.from_numpy(codes), sample=False)
    posterior_mean = terms.posterior.mean.numpy()
    return View(
        terms.negative_elbo.numpy(), posterior_mean, active_units(posterior_mean[validation].var(axis=0))
    )


def knn_distance(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    distances = torch.cdist(torch.from_numpy(points), torch.from_numpy(reference))
    return distances.topk(NEIGHBOURS, largest=False).values.mean(dim=1).numpy()


def calibrated(score: np.ndarray, validation: np.ndarray) -> np.ndarray:
    """Each row's score as its quantile among the validation rows' scores."""
    reference = np.sort(score[validation])
    return np.searchsorted(reference, score) / (len(reference) + 1)


def variants(table: pa.Table, seed: int, epochs: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Every variant's scores, and the active latent units of each model they come from."""
    validation = is_validation(key_hash(table.column(0)), VALIDATION)
    models = {
        "robust-z2": view(table, "robust-log", validation, seed, 2, epochs),
        "robust": view(table, "robust-log", validation, seed, 8, epochs),
        "quantile": view(table, "quantile", validation, seed, 8, epochs),
        "asinh-z2": view(table, "asinh", validation, seed, 2, epochs),
        "asinh": view(table, "asinh", validation, seed, 8, epochs),
        # beta 1: the latent stays informative (beta 8 ends with no unit active on most of these sets)
        "asinh-b1": view(table, "asinh", validation, seed, 8, epochs, beta=1.0),
    }
    knn, knn_asinh, knn_alive = (
        knn_distance(models[name].posterior_mean, models[name].posterior_mean[validation])
        for name in ("robust", "asinh", "asinh-b1")
    )
    robust, quantile, asinh, alive = (
        models[name].score for name in ("robust", "quantile", "asinh", "asinh-b1")
    )
    views = np.stack([calibrated(s, validation) for s in (robust, quantile, knn)])
    asinh_views = np.stack([calibrated(s, validation) for s in (asinh, quantile, knn_asinh)])
    scores = {
        **{name: model.score for name, model in models.items() if name != "asinh-b1"},
        "knn": knn,
        "knn-asinh": knn_asinh,
        "max3": views.max(axis=0) + 1e-3 * views.mean(axis=0),  # ties at the top broken by the mean
        "mean3": views.mean(axis=0),
        "views3": asinh_views.mean(axis=0),
        "asinh-b1": alive,
        "knn-b1": knn_alive,
        "mean-b1": (calibrated(alive, validation) + calibrated(knn_alive, validation)) / 2,
    }
    return scores, {name: model.active_units for name, model in models.items()}


def against_forest(group: str, sets: list[dict]) -> dict:
    """Per variant: on how many of the sets its ROC AUC is at least IsolationForest's, and its mean."""
    forest = [summary["iforest"]["roc_auc"] for summary in sets]
    found = {}
    for variant in sets[0]:
        ours = [summary[variant]["roc_auc"] for summary in sets]
        wins = sum(o >= f for o, f in zip(ours, forest, strict=True))
        found[variant] = {"sets_at_or_above": wins, "mean": round(mean(ours), 4)}
        print(
            f"{group:8s} {variant:10s} at or above IsolationForest on {wins} of {len(ours)}; "
            f"mean {mean(ours):.4f} (IsolationForest {mean(forest):.4f})"
        )
    return found


def main() -> None:
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import average_precision_score, roc_auc_score

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed of the run")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data-dir", type=type(DATA_DIR), default=DATA_DIR)
    parser.add_argument("--sets", default=",".join(ODDS + HELD_OUT))
    args = parse_args(parser, seeds=1, epochs=1, sets="thyroid,wine")
    torch.set_num_threads(1)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    results: dict = {"seeds": list(seeds), "epochs": args.epochs, "data_sets": {}}
    for name in args.sets.split(","):
        x, labels = held_out_set(name) if name in HELD_OUT else load_odds(args.data_dir / f"{name}.mat")
        table = odds_table(x)
        roc: dict[str, list[float]] = {}
        pr: dict[str, list[float]] = {}
        units: dict[str, list[int]] = {}
        for seed in seeds:
            scores, active = variants(table, seed, args.epochs)
            for variant, count in active.items():
                units.setdefault(variant, []).append(count)
            scores["iforest"] = -IsolationForest(random_state=seed).fit(x).score_samples(x)
            for variant, score in scores.items():
                roc.setdefault(variant, []).append(float(roc_auc_score(labels, score)))
                pr.setdefault(variant, []).append(float(average_precision_score(labels, score)))
        summary = {v: {"roc_auc": round(mean(roc[v]), 4), "pr_auc": round(mean(pr[v]), 4)} for v in roc}
        for variant, counts in units.items():
            summary[variant]["active_units"] = mean(counts)
        results["data_sets"][name] = summary
        shown = "  ".join(f"{v} {s['roc_auc']:.4f}" for v, s in summary.items())
        print(f"{name:10s} ROC AUC  {shown}", flush=True)
        shown = "  ".join(f"{variant} {mean(counts):.1f}" for variant, counts in units.items())
        print(f"{name:10s} active latent units  {shown}", flush=True)
    for group, members in (("odds", ODDS), ("held_out", HELD_OUT)):
        sets = [results["data_sets"][name] for name in members if name in results["data_sets"]]
        if sets:
            results.setdefault("against_iforest", {})[group] = against_forest(group, sets)
    save("anomaly_variants", results, show=False)


if __name__ == "__main__":
    main()
