"""ELBO terms in nats per example. log p(x) >= E_q[log p(x|z)] - KL(q(z|x) || p(z))."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vae.model import LOG_2PI, VAE, DiagonalGaussian


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_d log Bern(x_d; sigmoid(logits_d)) per example.

    For x in [0, 1] that is not binary this equals the expected log-likelihood of a dynamically
    binarized x (b_d ~ Bern(x_d)), so it stays a normalized likelihood in expectation.
    """
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=-1)


def gaussian_log_likelihood(mean: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_d log N(x_d; mean_d, exp(logvar_d)) per example."""
    return -0.5 * torch.sum(LOG_2PI + logvar + (x - mean).pow(2) / logvar.exp(), dim=-1)


def reconstruction_nll(model: VAE, decoded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) per example under the model's likelihood, given the decoder's output for z."""
    values, presence = reconstruction_terms(model, decoded, x)
    return values if presence is None else values + presence


def reconstruction_terms(
    model: VAE, decoded: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-log p(x|z) per example split into the values' terms and the missingness head's (None for a
    model without the head)."""
    if model.config.likelihood == "bernoulli":
        return -bernoulli_log_likelihood(decoded, x), None
    values = value_nll(model, decoded, x).sum(dim=-1)
    if model.layout is None or not model.layout.missingness:
        return values, None
    return values, missingness_nll(model, decoded, x).sum(dim=-1)


def _decoder_logvar(model: VAE) -> torch.Tensor:
    # Bounded so a constant feature cannot drive its variance (and the loss) to minus infinity.
    return model.decoder_logvar.clamp(-7.0, 7.0)


def column_nll(model: VAE, decoded: torch.Tensor, x: torch.Tensor, surprise: bool = False) -> torch.Tensor:
    """-log p(x_j|z) per example and column (rows, columns). Mixed tables: missing entries (NaN) have
    no value term; a model with the missingness head adds each column's -log p(present_j|z), so the
    terms are of what the row holds and of what it lacks, -log p(x_observed, mask | z) (as not-MIWAE
    with the mask depending on z only), and every row has one mask term per column. Without the head
    (versions from before it) missing entries are skipped (as HI-VAE does).

    surprise=True: each term minus its value at the decoder's most likely outcome, so >= 0 and 0 when
    the row's value (and presence) is the decoder's best guess: how much each column makes the row
    unusual.
    """
    return value_nll(model, decoded, x, surprise) + missingness_nll(model, decoded, x, surprise)


def value_nll(model: VAE, decoded: torch.Tensor, x: torch.Tensor, surprise: bool = False) -> torch.Tensor:
    """The values' terms of `column_nll`: 0 where x_j is missing."""
    logvar = _decoder_logvar(model)
    if model.layout is None:  # gaussian: one column per feature
        squared = (x - decoded).pow(2) / logvar.exp()
        return 0.5 * squared if surprise else 0.5 * (LOG_2PI + logvar + squared)
    layout = model.layout
    observed = ~torch.isnan(x)
    values = torch.nan_to_num(x, nan=0.0)
    nll = torch.zeros_like(values)
    if layout.numeric:
        mean, column_logvar = decoded[:, layout.numeric_outputs], logvar[layout.numeric_outputs]
        squared = (values[:, layout.numeric] - mean).pow(2) / column_logvar.exp()
        nll[:, layout.numeric] = 0.5 * squared if surprise else 0.5 * (LOG_2PI + column_logvar + squared)
    if layout.binary:
        nll[:, layout.binary] = _bernoulli_nll(
            decoded[:, layout.binary_outputs], values[:, layout.binary], surprise
        )
    for j, start, width in layout.categorical:
        logits = decoded[:, start : start + width]
        categorical = F.cross_entropy(logits, values[:, j].long().clamp(0, width - 1), reduction="none")
        if surprise:
            categorical = categorical - (torch.logsumexp(logits, dim=-1) - logits.max(dim=-1).values)
        nll[:, j] = categorical
    return nll * observed


def missingness_nll(
    model: VAE, decoded: torch.Tensor, x: torch.Tensor, surprise: bool = False
) -> torch.Tensor:
    """The mask's terms of `column_nll`: -log p(present_j | z) per example and column (0 without the head)."""
    layout = model.layout
    if layout is None or not layout.missingness:
        return torch.zeros_like(x)
    present = (~torch.isnan(x)).to(decoded.dtype)
    return _bernoulli_nll(decoded[:, layout.outputs : layout.decoded], present, surprise)


def _bernoulli_nll(logits: torch.Tensor, target: torch.Tensor, surprise: bool) -> torch.Tensor:
    nll = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    # the most likely outcome's -log p is softplus(-|logit|)
    return nll - F.softplus(-logits.abs()) if surprise else nll


@dataclass
class ElboTerms:
    """Per-example terms; the negative ELBO is reconstruction + kl (nats)."""

    reconstruction: torch.Tensor  # -E_q[log p(x|z)], one sample (with the presence terms, if any)
    kl: torch.Tensor  # KL(q(z|x) || N(0, I)), closed form
    posterior: DiagonalGaussian
    presence: torch.Tensor | None = None  # the missingness head's part of reconstruction

    @property
    def negative_elbo(self) -> torch.Tensor:
        return self.reconstruction + self.kl

    def loss(self, beta: float = 1.0, free_bits: float = 0.0, trim_fraction: float = 0.0) -> torch.Tensor:
        """The training objective: batch mean of reconstruction + beta * KL.

        free_bits > 0 (Kingma et al. 2016): each latent dimension's batch-mean KL counts as at
        least free_bits nats, so the optimizer gains nothing by shutting a dimension off entirely.
        trim_fraction > 0: the batch's highest-loss rows (that share) are left out of the mean, so
        the outliers in unlabeled data shape the model less and keep high anomaly scores. The
        presence terms count on every row and do not choose the trimmed ones: rows with missing
        values would be trimmed first, and the head would learn missing values rarer than they are.
        """
        presence = self.presence if self.presence is not None else torch.zeros_like(self.reconstruction)
        values = self.reconstruction - presence
        keep = torch.ones_like(self.reconstruction, dtype=torch.bool)
        if trim_fraction > 0.0:
            per_row = (values + beta * self.kl).detach()
            kept = max(1, math.ceil(len(per_row) * (1.0 - trim_fraction)))
            keep = torch.zeros_like(keep).index_fill_(0, per_row.topk(kept, largest=False).indices, True)
        if free_bits <= 0.0:
            return (values + beta * self.kl)[keep].mean() + presence.mean()
        kl_per_dim = self.posterior.kl_per_dim()[keep].mean(dim=0)
        return values[keep].mean() + presence.mean() + beta * kl_per_dim.clamp(min=free_bits).sum()


def elbo_terms(
    model: VAE | torch.nn.parallel.DistributedDataParallel,
    x: torch.Tensor,
    sample: bool = True,
    generator: torch.Generator | None = None,
) -> ElboTerms:
    """One-sample ELBO terms; sample=False evaluates at the posterior mean (deterministic).

    Accepts a DDP-wrapped model: the forward pass goes through the wrapper, the likelihood's
    settings are read from the wrapped module.
    """
    posterior, decoded = model(x, sample=sample, generator=generator)
    vae = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    # float32 even under bf16 autocast: sums over hundreds of features need the precision.
    values, presence = reconstruction_terms(vae, decoded.float(), x)
    reconstruction = values if presence is None else values + presence
    return ElboTerms(reconstruction, posterior.kl(), posterior, presence)
