"""Objectives, evaluation and diagnostics for Pyro model/guide pairs."""

from pyro_dgm.infer.diagnostics import (
    ActiveUnits,
    ElboSurgery,
    active_units,
    bits_per_dim,
    elbo_surgery,
    kl_per_unit,
    latent_diagnostics,
)
from pyro_dgm.infer.elbo import TraceAnalyticKL_ELBO
from pyro_dgm.infer.evaluation import (
    DatasetEvaluation,
    ElboTerms,
    LogLikelihoodEstimate,
    dataset_elbo,
    elbo_terms,
    evaluate_dataset,
    importance_log_likelihood,
)
from pyro_dgm.infer.free_bits import FreeBitsELBO
from pyro_dgm.infer.iwae import ImportanceWeightedELBO, RenyiELBO
from pyro_dgm.infer.objectives import OBJECTIVES, make_objective

__all__ = [
    "OBJECTIVES",
    "ActiveUnits",
    "ElboSurgery",
    "active_units",
    "bits_per_dim",
    "elbo_surgery",
    "kl_per_unit",
    "latent_diagnostics",
    "DatasetEvaluation",
    "ElboTerms",
    "FreeBitsELBO",
    "ImportanceWeightedELBO",
    "LogLikelihoodEstimate",
    "RenyiELBO",
    "TraceAnalyticKL_ELBO",
    "dataset_elbo",
    "elbo_terms",
    "evaluate_dataset",
    "importance_log_likelihood",
    "make_objective",
]
