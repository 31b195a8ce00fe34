"""A Gaussian-posterior VAE: MLP encoder/decoder for vectors and tabular rows, convolutional for
images with a declared shape. The loss lives in `vae.losses`."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

Likelihood = Literal["bernoulli", "gaussian", "mixed"]
Architecture = Literal["mlp", "conv"]
LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: everything needed to rebuild the module before loading its weights."""

    input_dim: int
    latent_dim: int = 16
    hidden_dims: tuple[int, ...] = (256, 128)
    # bernoulli: data in [0, 1] (images); gaussian: standardized real-valued data (tabular)
    likelihood: Likelihood = "bernoulli"
    # conv: stride-2 convolutions over image_shape (C, H, W), then the MLP layers in hidden_dims
    architecture: Architecture = "mlp"
    image_shape: tuple[int, ...] | None = None
    conv_channels: tuple[int, ...] = (32, 64)
    # mixed: (kind, width) per input column (vae.data.tabular.TableSchema.layout); input_dim = columns
    column_layout: tuple[tuple[str, int], ...] = ()
    # mixed: a Bernoulli head per column for "the value is present", so that a row's score is the
    # surprise of what it holds and of what it lacks (False: versions from before, missing values skipped)
    missingness: bool = False

    def __post_init__(self) -> None:
        if self.likelihood == "mixed" and len(self.column_layout) != self.input_dim:
            raise ValueError(f"a mixed model needs a (kind, width) per each of its {self.input_dim} columns")
        if self.missingness and self.likelihood != "mixed":
            raise ValueError("missingness is modelled for mixed tables only")
        if self.architecture == "conv":
            if self.image_shape is None or len(self.image_shape) != 3:
                raise ValueError(
                    f"a conv model needs image_shape (channels, height, width), got {self.image_shape}"
                )
            if math.prod(self.image_shape) != self.input_dim:
                raise ValueError(f"image_shape {self.image_shape} does not hold {self.input_dim} features")
            if min(self.image_shape[1:]) < 2 ** len(self.conv_channels):
                raise ValueError(
                    f"image {self.image_shape} is too small for {len(self.conv_channels)} stride-2 "
                    "convolutions"
                )

    def to_dict(self) -> dict:
        values = asdict(self)
        if not self.column_layout:
            # versions and run claims of other models keep their shape (a resumed run compares it)
            del values["column_layout"]
        if not self.missingness:
            del values["missingness"]  # as versions from before the head wrote it
        return values

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        shape = values.get("image_shape")
        return cls(
            **{
                **values,
                "hidden_dims": tuple(values["hidden_dims"]),
                "image_shape": tuple(shape) if shape else None,
                "conv_channels": tuple(values.get("conv_channels", (32, 64))),
                "column_layout": tuple((kind, int(width)) for kind, width in values.get("column_layout", ())),
                "missingness": bool(values.get("missingness", False)),
            }
        )


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) for a batch of examples."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        # float32 even under bf16 autocast: the KL and densities need the precision.
        self.mean = mean.float()
        # Clamped so exp() cannot overflow early in training.
        self.logvar = logvar.float().clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized sample: gradients flow to mean and logvar."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl_per_dim(self) -> torch.Tensor:
        """KL(q || N(0, I)) per example and latent dimension, in nats: 0.5 * (mean^2 + var - 1 - logvar)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per example, in nats."""
        return self.kl_per_dim().sum(dim=-1)

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


class ConvEncoder(nn.Module):
    """Flat image rows -> stride-2 convolutions (each halves height and width) -> MLP head."""

    def __init__(
        self, image_shape: tuple[int, ...], channels: tuple[int, ...], hidden: list[int], out_features: int
    ):
        super().__init__()
        self.image_shape = image_shape
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise([image_shape[0], *channels]):
            layers += [nn.Conv2d(fan_in, fan_out, kernel_size=4, stride=2, padding=1), nn.SiLU()]
        self.convolutions = nn.Sequential(*layers, nn.Flatten())
        height, width = _conv_sizes(image_shape, len(channels))[-1]
        self.head = _mlp([channels[-1] * height * width, *hidden, out_features])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convolutions(x.view(-1, *self.image_shape)))


class ConvDecoder(nn.Module):
    """The mirror of ConvEncoder: MLP -> transposed convolutions back to the exact image size -> flat rows."""

    def __init__(
        self, image_shape: tuple[int, ...], channels: tuple[int, ...], hidden: list[int], latent_dim: int
    ):
        super().__init__()
        self.sizes = _conv_sizes(image_shape, len(channels))  # (height, width) after each encoder stage
        height, width = self.sizes[-1]
        self.start_shape = (channels[-1], height, width)
        self.body = nn.Sequential(
            _mlp([latent_dim, *reversed(hidden), channels[-1] * height * width]), nn.SiLU()
        )
        up = [*reversed(channels), image_shape[0]]
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(fan_in, fan_out, kernel_size=4, stride=2, padding=1)
            for fan_in, fan_out in itertools.pairwise(up)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(z).view(-1, *self.start_shape)
        # output_size undoes the floor of odd sizes (28 -> 14 -> 7 -> 3 comes back as 3 -> 7 -> 14 -> 28).
        for i, layer in enumerate(self.upsample):
            h = layer(h, output_size=self.sizes[-2 - i])
            if i < len(self.upsample) - 1:
                h = nn.functional.silu(h)
        return h.flatten(1)


def _conv_sizes(image_shape: tuple[int, ...], stages: int) -> list[tuple[int, int]]:
    sizes = [(image_shape[1], image_shape[2])]
    for _ in range(stages):
        height, width = sizes[-1]
        sizes.append(((height - 2) // 2 + 1, (width - 2) // 2 + 1))  # kernel 4, stride 2, padding 1
    return sizes


class ColumnLayout:
    """Where each column of a mixed table sits in the decoder's output, grouped by kind; with
    missingness, one "present" logit per column follows the values' outputs."""

    def __init__(self, layout: tuple[tuple[str, int], ...], missingness: bool = False):
        starts = [0]
        for _, width in layout:
            starts.append(starts[-1] + width)
        self.outputs = starts[-1]  # the values' outputs (means, logits, category logits)
        self.columns = len(layout)
        self.missingness = missingness
        self.decoded = self.outputs + (self.columns if missingness else 0)

        def of(kind: str) -> tuple[list[int], list[int]]:
            picked = [j for j, (k, _) in enumerate(layout) if k == kind]
            return picked, [starts[j] for j in picked]

        self.numeric, self.numeric_outputs = of("numeric")
        self.binary, self.binary_outputs = of("binary")
        self.categorical = [
            (j, starts[j], width) for j, (k, width) in enumerate(layout) if k == "categorical"
        ]

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (NaN = missing) -> encoder inputs: numeric and binary values, one-hot categories (all
        zeros when missing), then the observed mask, so the encoder tells a missing entry from a 0."""
        observed = ~torch.isnan(x)
        values = torch.nan_to_num(x, nan=0.0)
        parts = torch.zeros(len(x), self.outputs, device=x.device, dtype=x.dtype)
        plain = self.numeric + self.binary
        parts[:, self.numeric_outputs + self.binary_outputs] = values[:, plain]
        for j, start, width in self.categorical:
            code = values[:, j].long().clamp(0, width - 1)
            parts[:, start : start + width] = (
                nn.functional.one_hot(code, width).to(x.dtype) * observed[:, j : j + 1]
            )
        return torch.cat([parts, observed.to(x.dtype)], dim=1)


class VAE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        mixed = config.likelihood == "mixed"
        self.layout = ColumnLayout(config.column_layout, config.missingness) if mixed else None
        hidden = list(config.hidden_dims)
        # The encoder emits mean and logvar side by side.
        if config.architecture == "conv":
            assert config.image_shape is not None
            self.encoder: nn.Module = ConvEncoder(
                config.image_shape, config.conv_channels, hidden, 2 * config.latent_dim
            )
            self.decoder: nn.Module = ConvDecoder(
                config.image_shape, config.conv_channels, hidden, config.latent_dim
            )
        elif self.layout is not None:
            inputs = self.layout.outputs + self.layout.columns  # expanded columns + the observed mask
            self.encoder = _mlp([inputs, *hidden, 2 * config.latent_dim])
            self.decoder = _mlp([config.latent_dim, *reversed(hidden), self.layout.decoded])
        else:
            self.encoder = _mlp([config.input_dim, *hidden, 2 * config.latent_dim])
            self.decoder = _mlp([config.latent_dim, *reversed(hidden), config.input_dim])
        # Gaussian likelihood: one learned log-variance per feature (per decoder output for mixed
        # tables; only numeric columns use theirs), so the likelihood is a real normalized density
        # rather than a squared error with an arbitrary scale.
        outputs = self.layout.outputs if self.layout is not None else config.input_dim
        self.decoder_logvar = nn.Parameter(
            torch.zeros(outputs), requires_grad=config.likelihood in ("gaussian", "mixed")
        )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if self.layout is not None:
            x = self.layout.expand(x)
        mean, logvar = self.encoder(x).chunk(2, dim=-1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits or Gaussian means, one per input feature; for mixed tables each column's
        mean, logit or category logits, then each column's "present" logit (vae.model.ColumnLayout)."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[DiagonalGaussian, torch.Tensor]:
        """Posterior and decoder output. Training goes through here so DDP can sync gradients."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return posterior, self.decode(z)
