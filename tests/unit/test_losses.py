"""ELBO terms against closed forms and torch.distributions."""

import math

import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from vae import VAE, DiagonalGaussian, ModelConfig, elbo_terms
from vae.losses import bernoulli_log_likelihood, gaussian_log_likelihood


def test_kl_matches_closed_form_of_known_gaussians():
    # KL(N(1, 4) || N(0, 1)) = 0.5 * (mu^2 + var - 1 - log var) = 0.5 * (1 + 4 - 1 - log 4)
    posterior = DiagonalGaussian(torch.tensor([[1.0, 0.0]]), torch.tensor([[math.log(4.0), 0.0]]))
    assert torch.allclose(posterior.kl(), torch.tensor([0.5 * (4.0 - math.log(4.0))]))


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(5, 8), torch.randn(5, 8)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(DiagonalGaussian(mean, logvar).kl(), expected, atol=1e-5)


def test_posterior_nll_and_sample_follow_the_gaussian():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4), torch.randn(3, 4)
    posterior = DiagonalGaussian(mean, logvar)
    z = posterior.sample(torch.Generator().manual_seed(1))
    expected = -Normal(mean, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    assert torch.allclose(posterior.nll(z), expected, atol=1e-5)
    many = DiagonalGaussian(torch.full((20000, 1), 2.0), torch.full((20000, 1), math.log(0.25))).sample()
    assert abs(many.mean().item() - 2.0) < 0.02 and abs(many.std().item() - 0.5) < 0.02


def test_sample_is_reparameterized():
    mean = torch.zeros(2, 3, requires_grad=True)
    logvar = torch.zeros(2, 3, requires_grad=True)
    DiagonalGaussian(mean, logvar).sample().sum().backward()
    assert mean.grad is not None and logvar.grad is not None and torch.all(mean.grad == 1.0)


def test_bernoulli_log_likelihood_matches_distribution_on_binary_data():
    torch.manual_seed(0)
    logits, x = torch.randn(4, 10), torch.randint(0, 2, (4, 10)).float()
    assert torch.allclose(
        bernoulli_log_likelihood(logits, x), Bernoulli(logits=logits).log_prob(x).sum(-1), atol=1e-5
    )


def test_bernoulli_on_grey_values_is_expected_likelihood_of_binarized_data():
    logits, x = torch.tensor([[0.3, -1.2]]), torch.tensor([[0.25, 0.9]])
    p = torch.sigmoid(logits)
    expected = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    assert torch.allclose(bernoulli_log_likelihood(logits, x), expected, atol=1e-6)


def test_gaussian_log_likelihood_matches_distribution():
    torch.manual_seed(0)
    mean, logvar, x = torch.randn(4, 6), torch.randn(6).expand(4, 6), torch.randn(4, 6)
    expected = Normal(mean, (0.5 * logvar).exp()).log_prob(x).sum(-1)
    assert torch.allclose(gaussian_log_likelihood(mean, logvar, x), expected, atol=1e-5)


def test_elbo_terms_are_per_example_and_consistent():
    torch.manual_seed(0)
    for likelihood in ("bernoulli", "gaussian"):
        model = VAE(ModelConfig(input_dim=12, latent_dim=3, hidden_dims=(16,), likelihood=likelihood))
        x = torch.rand(7, 12)
        terms = elbo_terms(model, x, sample=False)
        assert terms.reconstruction.shape == terms.kl.shape == (7,)
        assert torch.allclose(terms.negative_elbo, terms.reconstruction + terms.kl)
        assert torch.all(terms.kl >= 0)
        # deterministic at the posterior mean
        assert torch.equal(elbo_terms(model, x, sample=False).negative_elbo, terms.negative_elbo)


def test_trimmed_loss_leaves_out_the_highest_loss_rows():
    from vae.losses import ElboTerms

    posterior = DiagonalGaussian(torch.zeros(4, 2), torch.zeros(4, 2))  # KL 0 for every row
    terms = ElboTerms(torch.tensor([1.0, 100.0, 3.0, 2.0]), posterior.kl(), posterior)
    assert terms.loss() == torch.tensor(26.5)
    assert terms.loss(trim_fraction=0.25) == torch.tensor(2.0)  # the 100-nat row is left out
    assert terms.loss(trim_fraction=0.5) == torch.tensor(1.5)
