"""Encoding for inference: posterior means and a deterministic anomaly score."""

from __future__ import annotations

import math

import numpy as np
import torch

from vae.data.normalizer import Normalizer
from vae.losses import column_nll, elbo_terms, missingness_nll, value_nll
from vae.model import VAE


@torch.inference_mode()
def encode_matrix(
    model: VAE, normalizer: Normalizer, matrix: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(posterior_mean, anomaly_score) for raw feature rows; the model must already be on `device`.

    The anomaly score is the negative ELBO in nats evaluated at the posterior mean, so the same
    row always gets the same score; higher means more unusual.
    """
    return encode_normalized(model, torch.from_numpy(normalizer(matrix)).to(device, non_blocking=True))


@torch.inference_mode()
def encode_normalized(model: VAE, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """`encode_matrix` for rows already normalized, on the model's device (training's validation rows)."""
    terms = elbo_terms(model, x, sample=False)
    return terms.posterior.mean.float().cpu().numpy(), terms.negative_elbo.float().cpu().numpy()


def attributes(model: VAE) -> bool:
    """Whether the model's score splits by input column: tables (gaussian or mixed over feature columns)."""
    return model.config.likelihood == "mixed" or (
        model.config.likelihood == "gaussian" and model.config.architecture == "mlp"
    )


@torch.inference_mode()
def encode_with_attribution(
    model: VAE, normalizer: Normalizer, matrix: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`encode_matrix` plus each row's surprise per column (rows, columns), in nats: how far the
    decoder's prediction of the column misses the row's value (vae.losses.column_nll, surprise=True).

    Mixed tables predict each column from the others: the column is marked missing on the way in
    (the model's own missingness mask), so an outlier cannot explain itself through the latent and
    push the blame onto the columns it distorts. One forward pass over rows x columns. A column's
    missingness term (models with the head) comes from the row as it is: hiding an observed column
    would make its presence look surprising. Gaussian models (no mask) use the full reconstruction.
    The KL term stays apart.
    """
    x = torch.from_numpy(normalizer(matrix)).to(device, non_blocking=True)
    posterior, decoded = model(x, sample=False)
    score = column_nll(model, decoded.float(), x).sum(dim=-1) + posterior.kl()
    if model.layout is None:
        surprise = column_nll(model, decoded.float(), x, surprise=True)
    else:
        rows, columns = x.shape
        targets = x.repeat(columns, 1)  # block j: every row, with column j hidden from the encoder
        hidden = targets.clone()
        hidden[
            torch.arange(rows * columns, device=x.device),
            torch.arange(columns, device=x.device).repeat_interleave(rows),
        ] = math.nan
        _, predicted = model(hidden, sample=False)
        every = value_nll(model, predicted.float(), targets, surprise=True).view(columns, rows, columns)
        surprise = torch.diagonal(every, dim1=0, dim2=2)  # (rows, columns): block j's column j
        surprise = surprise + missingness_nll(model, decoded.float(), x, surprise=True)
    return (
        posterior.mean.float().cpu().numpy(),
        score.float().cpu().numpy(),
        surprise.float().cpu().numpy(),
    )
