"""Is the latent space healthy? Active units, importance-weighted likelihood, collapse, PCA.

Burda et al. 2015: a latent unit u is active when Cov_x(E_q(z|x)[z_u]) > 0.01. The k-sample
importance-weighted bound log p(x) >= E[log 1/k sum_i p(x, z_i) / q(z_i | x)] tightens toward the
true log-likelihood as k grows, so its negative is the NLL figure papers report.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vae.losses import reconstruction_nll
from vae.model import LOG_2PI, VAE

ACTIVE_UNIT_THRESHOLD = 0.01


def posterior_mean_variance(count: float, mean_sum: np.ndarray, mean_square_sum: np.ndarray) -> np.ndarray:
    """Per-dimension variance over examples of the posterior mean, from sums (all-reducible)."""
    average = mean_sum / count
    return np.maximum(mean_square_sum / count - average**2, 0.0)


def active_units(variance: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    return int((variance > threshold).sum())


def collapse_warning(active: int, latent_dim: int, min_active_share: float) -> str | None:
    """A message when fewer than min_active_share of the latent units carry information, else None."""
    if active >= min_active_share * latent_dim:
        return None
    return (
        f"posterior collapse: {active} of {latent_dim} latent units are active (Cov > "
        f"{ACTIVE_UNIT_THRESHOLD}), below {min_active_share:.0%}; try kl_warmup_epochs, free_bits, a "
        "smaller latent_dim or a smaller batch"
    )


@torch.no_grad()
def importance_weighted_nll(
    model: VAE,
    x: torch.Tensor,
    samples: int = 1000,
    generator: torch.Generator | None = None,
    rows_per_pass: int = 65536,
) -> torch.Tensor:
    """-log p(x) estimated with `samples` importance samples from q(z|x), per example, in nats."""
    posterior = model.encode(x)
    chunk = max(1, rows_per_pass // len(x))
    log_weights = []
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        noise = torch.randn((n, *posterior.mean.shape), generator=generator, device=x.device)
        z = posterior.mean + posterior.std * noise  # (n, batch, latent)
        decoded = model.decode(z.flatten(0, 1)).float()
        log_likelihood = -reconstruction_nll(model, decoded, x.repeat(n, 1)).view(n, len(x))
        log_prior = -0.5 * (z.pow(2) + LOG_2PI).sum(dim=-1)
        log_weights.append(log_likelihood + log_prior + posterior.nll(z))
    return -(torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(samples))


def pca_2d(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows onto their first two principal components; returns (points, explained variance ratio)."""
    centered = latents - latents.mean(axis=0)
    _, singular_values, components = np.linalg.svd(centered, full_matrices=False)
    variance = singular_values**2
    return centered @ components[:2].T, variance[:2] / max(variance.sum(), 1e-12)
