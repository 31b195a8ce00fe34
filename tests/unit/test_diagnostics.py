"""The library's training pieces without Ray: conv model, free bits, schedules, diagnostics,
resumable training state and the PNG report."""

import math

import numpy as np
import pytest
import torch

from vae import VAE, DiagonalGaussian, ModelConfig, elbo_terms
from vae.diagnostics import (
    active_units,
    collapse_warning,
    importance_weighted_nll,
    pca_2d,
    posterior_mean_variance,
)
from vae.losses import ElboTerms
from vae.training import Schedule, load_training_state, save_training_state
from vae.training_report import write_training_report


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 7, 9)])
def test_conv_model_reconstructs_the_declared_image_shape(shape):
    dim = math.prod(shape)
    config = ModelConfig(dim, 4, (32,), architecture="conv", image_shape=shape, conv_channels=(8, 16))
    model = VAE(config)
    x = torch.rand(3, dim)
    terms = elbo_terms(model, x, generator=torch.Generator().manual_seed(0))
    terms.loss().backward()
    assert terms.posterior.mean.shape == (3, 4) and terms.reconstruction.shape == (3,)
    assert model.decode(terms.posterior.mean).shape == (3, dim)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_conv_config_rejects_shapes_it_cannot_model():
    with pytest.raises(ValueError, match="needs image_shape"):
        ModelConfig(64, 4, architecture="conv")
    with pytest.raises(ValueError, match="too small"):
        ModelConfig(16, 4, architecture="conv", image_shape=(1, 4, 4), conv_channels=(8, 16, 32))


def test_free_bits_count_each_dimension_as_at_least_the_floor():
    # posterior == prior: KL is 0 in every dimension, so free bits charge exactly 0.5 nats x 4 dims
    posterior = DiagonalGaussian(torch.zeros(2, 4), torch.zeros(2, 4))
    terms = ElboTerms(reconstruction=torch.tensor([10.0, 20.0]), kl=posterior.kl(), posterior=posterior)
    assert terms.loss(beta=1.0) == pytest.approx(15.0)
    assert terms.loss(beta=1.0, free_bits=0.5) == pytest.approx(15.0 + 4 * 0.5)
    assert terms.loss(beta=0.5, free_bits=0.5) == pytest.approx(15.0 + 0.5 * 4 * 0.5)


def test_schedule_warms_up_and_decays():
    schedule = Schedule(
        1e-3,
        total_steps=100,
        lr_schedule="cosine",
        lr_warmup_steps=10,
        min_lr_ratio=0.1,
        beta=2.0,
        kl_warmup_steps=20,
    )
    assert schedule.lr(0) == pytest.approx(1e-4) and schedule.lr(9) == pytest.approx(1e-3)
    assert schedule.lr(10) == pytest.approx(1e-3) and schedule.lr(100) == pytest.approx(1e-4)
    assert schedule.lr(55) < schedule.lr(30)
    assert schedule.kl_weight(0) == pytest.approx(0.1) and schedule.kl_weight(19) == pytest.approx(2.0)
    assert schedule.kl_weight(500) == 2.0
    assert Schedule(1e-3, 100, "constant").lr(77) == 1e-3


def test_active_units_follow_the_variance_of_posterior_means():
    rng = np.random.default_rng(0)
    means = np.zeros((5000, 4))
    means[:, 0] = rng.normal(0, 1.0, 5000)  # active
    means[:, 1] = rng.normal(0, 0.05, 5000)  # variance 0.0025: inactive
    means[:, 2] = 3.0  # constant: inactive
    means[:, 3] = rng.normal(0, 0.2, 5000)  # variance 0.04: active
    variance = posterior_mean_variance(len(means), means.sum(0), (means**2).sum(0))
    assert np.allclose(variance, means.var(0))
    assert active_units(variance) == 2
    assert collapse_warning(1, 16, 0.1) is not None and "1 of 16" in collapse_warning(1, 16, 0.1)
    assert collapse_warning(2, 16, 0.1) is None


def test_importance_weighted_nll_is_exact_when_the_posterior_is_the_prior_and_z_is_ignored():
    torch.manual_seed(0)
    model = VAE(ModelConfig(6, 3, (8,), "bernoulli"))
    with torch.no_grad():
        model.encoder[-1].weight.zero_()  # q(z|x) = N(0, I) = p(z)
        model.encoder[-1].bias.zero_()
        model.decoder[0].weight.zero_()  # p(x|z) does not depend on z
    x = torch.bernoulli(torch.rand(5, 6), generator=torch.Generator().manual_seed(1))
    exact = elbo_terms(model, x, sample=False).reconstruction  # log p(x) = log p(x|z) for any z
    estimate = importance_weighted_nll(model, x, samples=50, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(estimate, exact, atol=1e-4)


def test_importance_weighted_nll_is_tighter_than_the_elbo():
    torch.manual_seed(0)
    model = VAE(ModelConfig(20, 4, (16,), "bernoulli"))
    x = torch.bernoulli(torch.rand(64, 20), generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    negative_elbo = torch.stack(
        [elbo_terms(model, x, generator=generator).negative_elbo for _ in range(200)]
    ).mean()
    iw_nll = importance_weighted_nll(model, x, samples=200, generator=generator).mean()
    assert iw_nll < negative_elbo - 0.1


def test_pca_finds_the_direction_of_largest_variance():
    rng = np.random.default_rng(0)
    line = rng.normal(size=(500, 1)) * np.array([[3.0, 4.0, 0.0]]) + 0.01 * rng.normal(size=(500, 3))
    points, explained = pca_2d(line)
    assert points.shape == (500, 2) and explained[0] > 0.99


def test_training_state_round_trip_continues_exactly(tmp_path):
    def fresh() -> tuple[VAE, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = VAE(ModelConfig(10, 3, (16,), "gaussian"))
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    def step(model: VAE, optimizer: torch.optim.Optimizer, seed: int) -> None:
        x = torch.randn(8, 10, generator=torch.Generator().manual_seed(seed))
        optimizer.zero_grad()
        elbo_terms(model, x, generator=torch.Generator().manual_seed(seed)).loss().backward()
        optimizer.step()

    model, optimizer = fresh()
    for seed in range(3):
        step(model, optimizer, seed)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    save_training_state(tmp_path, model, best, optimizer, {"epoch": 3, "history": [{"epoch": 3}]})
    step(model, optimizer, 3)

    restored_model, restored_optimizer = fresh()
    restored_best, state = load_training_state(tmp_path, restored_model, restored_optimizer)
    step(restored_model, restored_optimizer, 3)
    assert state == {"epoch": 3, "history": [{"epoch": 3}]}
    assert all(torch.equal(best[k], restored_best[k]) for k in best)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), restored_model.state_dict().values(), strict=True)
    )


def test_report_writes_three_pngs(tmp_path):
    history = [
        {
            "epoch": e,
            "negative_elbo": 30 - e,
            "val_negative_elbo": 31 - e,
            "val_reconstruction": 28 - e,
            "val_kl": 2 + 0.1 * e,
            "beta": min(1, e / 2),
            "active_units": e,
        }
        for e in range(1, 5)
    ]
    latents = np.random.default_rng(0).normal(size=(100, 4))
    written = write_training_report(
        tmp_path, history, [0.5, 0.01, 1.2, 0.0], [0.3, 0.001, 0.8, 0.0], latents, np.arange(100) % 3, "label"
    )
    assert written == ["curves.png", "kl_per_dim.png", "latent_pca.png"]
    for name in written:
        content = (tmp_path / name).read_bytes()
        assert content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) > 5_000
