"""The training report written beside a model version: loss curves, KL per dimension, latent PCA (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt
import numpy as np

from vae.diagnostics import ACTIVE_UNIT_THRESHOLD, pca_2d


def write_training_report(
    directory: str | Path,
    history: list[dict],
    kl_per_dim: list[float],
    posterior_mean_variance: list[float],
    validation_latents: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    label_name: str | None = None,
) -> list[str]:
    """Write the report's PNG files into directory; returns their file names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [_curves(directory, history), _kl_per_dim(directory, kl_per_dim, posterior_mean_variance)]
    if validation_latents is not None and len(validation_latents) >= 2:
        written.append(_latent_pca(directory, validation_latents, labels, label_name))
    return written


def _curves(directory: Path, history: list[dict]) -> str:
    epochs = [h["epoch"] for h in history]
    figure, (elbo_axis, kl_axis) = plt.subplots(1, 2, figsize=(11, 4))
    elbo_axis.plot(epochs, [h["negative_elbo"] for h in history], label="train -ELBO")
    elbo_axis.plot(epochs, [h["val_negative_elbo"] for h in history], label="validation -ELBO")
    elbo_axis.plot(
        epochs, [h["val_reconstruction"] for h in history], label="validation reconstruction", linestyle="--"
    )
    elbo_axis.set(xlabel="epoch", ylabel="nats per example", title="Negative ELBO")
    elbo_axis.legend()
    kl_axis.plot(epochs, [h["val_kl"] for h in history], label="validation KL (nats)")
    kl_axis.plot(epochs, [h["beta"] for h in history], label="KL weight beta", linestyle=":")
    kl_axis.set(xlabel="epoch", title="KL and active units")
    units_axis = kl_axis.twinx()
    units_axis.plot(epochs, [h["active_units"] for h in history], color="tab:red", label="active units")
    units_axis.set_ylabel("active units")
    kl_axis.legend(loc="upper left")
    units_axis.legend(loc="lower right")
    return _save(figure, directory / "curves.png")


def _kl_per_dim(directory: Path, kl_per_dim: list[float], variance: list[float]) -> str:
    figure, axis = plt.subplots(figsize=(max(6, 0.25 * len(kl_per_dim)), 4))
    active = np.asarray(variance) > ACTIVE_UNIT_THRESHOLD
    axis.bar(range(len(kl_per_dim)), kl_per_dim, color=np.where(active, "tab:blue", "tab:gray"))
    axis.set(
        xlabel="latent dimension",
        ylabel="KL (nats per example)",
        title=f"Validation KL per dimension ({int(active.sum())} of {len(active)} active, grey = inactive)",
    )
    return _save(figure, directory / "kl_per_dim.png")


def _latent_pca(
    directory: Path, latents: np.ndarray, labels: np.ndarray | None, label_name: str | None
) -> str:
    points, explained = pca_2d(latents)
    figure, axis = plt.subplots(figsize=(6, 5))
    if labels is None:
        axis.scatter(points[:, 0], points[:, 1], s=4, alpha=0.6)
    else:
        values = np.unique(labels)
        colour_of = {value: i for i, value in enumerate(values)}
        scatter = axis.scatter(
            points[:, 0],
            points[:, 1],
            s=4,
            alpha=0.7,
            cmap="tab10" if len(values) <= 10 else "viridis",
            c=[colour_of[v] for v in labels],
        )
        if len(values) <= 20:
            axis.legend(
                scatter.legend_elements()[0],
                [str(v) for v in values],
                title=label_name,
                fontsize=7,
                loc="best",
            )
    axis.set(
        xlabel=f"PC1 ({explained[0]:.0%})",
        ylabel=f"PC2 ({explained[1]:.0%})",
        title=f"Validation posterior means, {len(latents)} rows",
    )
    return _save(figure, directory / "latent_pca.png")


def _save(figure: plt.Figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path.name
