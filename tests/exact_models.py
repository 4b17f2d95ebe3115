"""Latent variable models with exact answers, shared by the objective and evaluation tests."""

import pyro
import pyro.distributions as pyro_dist
import pyro.poutine as poutine
import torch

from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher

F64 = torch.float64


class LinearGaussian:
    """z ~ N(0, I_k), x = W z + b + N(0, s^2 I_n): log p(x) and p(z | x) in closed form."""

    def __init__(self, seed=0, latent=2, observed=4, noise=0.5):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(observed, latent, generator=generator, dtype=F64)
        self.bias = torch.randn(observed, generator=generator, dtype=F64)
        self.noise = noise
        self.latent = latent

    def marginal(self):
        covariance = self.weight @ self.weight.T + self.noise**2 * torch.eye(len(self.bias),
                                                                            dtype=F64)
        return pyro_dist.MultivariateNormal(self.bias, covariance)

    def posterior(self, x):
        precision = torch.eye(self.latent, dtype=F64) + self.weight.T @ self.weight / self.noise**2
        covariance = torch.linalg.inv(precision)
        mean = (x - self.bias) @ self.weight @ covariance / self.noise**2
        return mean, covariance

    def model(self, x, guide_scale=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro_dist.Normal(torch.zeros(self.latent, dtype=F64), 1.0)
                            .to_event(1))
            pyro.sample("x", pyro_dist.Normal(z @ self.weight.T + self.bias, self.noise)
                        .to_event(1), obs=x)

    def exact_guide(self, x, guide_scale=None):
        mean, covariance = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pyro_dist.MultivariateNormal(mean, covariance))

    def rough_guide(self, x, guide_scale=1.5, *model_args):
        """A deliberately imperfect mean-field guide (right mean, inflated scales)."""
        mean, covariance = self.posterior(x)
        scale = guide_scale * covariance.diagonal().sqrt()
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pyro_dist.Normal(mean, scale).to_event(1))


def vmf_problem():
    m, c = 4, 5.0
    direction = torch.tensor([0.0, 0.6, 0.0, 0.8], dtype=F64)

    def model(x, concentration=None, kl_scale=1.0):
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=kl_scale):
                z = pyro.sample("z", HypersphericalUniform(m, dtype=F64).expand([x.shape[0]]))
            pyro.factor("likelihood", c * (z @ direction) * x)

    def guide(x, concentration, kl_scale=1.0):
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=kl_scale):
                pyro.sample("z", VonMisesFisher(direction.expand(x.shape[0], m), concentration))

    return m, c, model, guide
