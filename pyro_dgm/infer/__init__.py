"""Objectives, evaluation and training helpers for Pyro model/guide pairs."""

from pyro_dgm.infer.diagnostics import (
    ActiveUnits,
    ElboSurgery,
    active_units,
    bits_per_dim,
    elbo_surgery,
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
from pyro_dgm.infer.iwae import ImportanceWeightedELBO, RenyiELBO
from pyro_dgm.infer.training import (
    OBJECTIVES,
    kl_warmup,
    load_checkpoint,
    make_objective,
    resume_run,
    resume_training_state,
    run_until_interrupted,
    save_checkpoint,
    save_training_state,
    start_run,
    train_epoch,
)

__all__ = [
    "OBJECTIVES",
    "ActiveUnits",
    "ElboSurgery",
    "active_units",
    "bits_per_dim",
    "elbo_surgery",
    "DatasetEvaluation",
    "ElboTerms",
    "ImportanceWeightedELBO",
    "LogLikelihoodEstimate",
    "RenyiELBO",
    "TraceAnalyticKL_ELBO",
    "dataset_elbo",
    "elbo_terms",
    "evaluate_dataset",
    "importance_log_likelihood",
    "kl_warmup",
    "load_checkpoint",
    "make_objective",
    "resume_run",
    "resume_training_state",
    "save_checkpoint",
    "save_training_state",
    "start_run",
    "run_until_interrupted",
    "train_epoch",
]
