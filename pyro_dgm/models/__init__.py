"""The model zoo: deep generative models as Pyro ``PyroModule`` model/guide pairs, the learnable
priors they can use, flow density models of images, and the networks they are built from
(gated MLPs, PixelCNN decoders)."""

from pyro_dgm.models.dequantization import (
    BitsPerDim,
    DequantizedImageFlow,
    UniformDequantization,
    VariationalDequantization,
    evaluate_bits_per_dim,
)
from pyro_dgm.models.hvae import HierarchicalVAE, TwoStreamNet
from pyro_dgm.models.image_flow import ImageFlow, glow, real_nvp
from pyro_dgm.models.latents import GaussianLatent, VonMisesFisherLatent
from pyro_dgm.models.likelihoods import PixelCNNBernoulli, PixelCNNLikelihood
from pyro_dgm.models.networks import GatedConv2d, GatedDense, GatedMLP
from pyro_dgm.models.pixelcnn import GatedMaskedConv2d, MaskedConv2d, PixelCNNDecoder
from pyro_dgm.models.priors import FlowPrior, MixtureOfGaussiansPrior, VampPriorModule
from pyro_dgm.models.vae import VAE

__all__ = [
    "VAE",
    "BitsPerDim",
    "DequantizedImageFlow",
    "UniformDequantization",
    "VariationalDequantization",
    "evaluate_bits_per_dim",
    "FlowPrior",
    "GatedConv2d",
    "GatedDense",
    "GatedMLP",
    "GatedMaskedConv2d",
    "GaussianLatent",
    "HierarchicalVAE",
    "ImageFlow",
    "MaskedConv2d",
    "MixtureOfGaussiansPrior",
    "PixelCNNBernoulli",
    "PixelCNNDecoder",
    "PixelCNNLikelihood",
    "TwoStreamNet",
    "VampPriorModule",
    "VonMisesFisherLatent",
    "glow",
    "real_nvp",
]
