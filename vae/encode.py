"""Encoding for inference: posterior means and a deterministic anomaly score."""

from __future__ import annotations

import numpy as np
import torch

from vae.losses import elbo_terms
from vae.model import VAE
from vae.preprocessing import Normalizer


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
