"""A Gaussian-posterior VAE with MLP encoder and decoder. The loss lives in `vae.losses`."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

Likelihood = Literal["bernoulli", "gaussian"]
LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: everything needed to rebuild the module before loading its weights."""

    input_dim: int
    latent_dim: int = 16
    hidden_dims: tuple[int, ...] = (256, 128)
    # bernoulli: data in [0, 1] (images); gaussian: standardized real-valued data (tabular)
    likelihood: Likelihood = "bernoulli"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        return cls(**{**values, "hidden_dims": tuple(values["hidden_dims"])})


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) for a batch of examples."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        # Clamped so exp() cannot overflow early in training.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized sample: gradients flow to mean and logvar."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per example, in nats: 0.5 * sum(mean^2 + var - 1 - logvar)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar, dim=-1)

    def nll(self, z: torch.Tensor) -> torch.Tensor:
        """-log q(z|x) per example, in nats."""
        return 0.5 * torch.sum(LOG_2PI + self.logvar + (z - self.mean).pow(2) / self.logvar.exp(), dim=-1)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        hidden = list(config.hidden_dims)
        # The encoder emits mean and logvar side by side.
        self.encoder = _mlp([config.input_dim, *hidden, 2 * config.latent_dim])
        self.decoder = _mlp([config.latent_dim, *reversed(hidden), config.input_dim])
        # Gaussian likelihood: one learned log-variance per feature, so the likelihood is a real
        # normalized density rather than a squared error with an arbitrary scale.
        self.decoder_logvar = nn.Parameter(torch.zeros(config.input_dim), requires_grad=config.likelihood == "gaussian")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = self.encoder(x).chunk(2, dim=-1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits or Gaussian means, one per input feature."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[DiagonalGaussian, torch.Tensor]:
        """Posterior and decoder output. Training goes through here so DDP can sync gradients."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return posterior, self.decode(z)
