"""The training objectives an example names on its command line."""

from __future__ import annotations

from pyro_dgm.infer.elbo import TraceAnalyticKL_ELBO
from pyro_dgm.infer.free_bits import FreeBitsELBO
from pyro_dgm.infer.iwae import ImportanceWeightedELBO

__all__ = ["OBJECTIVES", "make_objective"]

#: the training objectives :func:`make_objective` builds
OBJECTIVES = ("elbo", "iwae")


def make_objective(
    objective: str = "elbo", num_particles: int = 1, gradient: str = "reparam",
    free_bits: float = 0.0,
) -> TraceAnalyticKL_ELBO | ImportanceWeightedELBO:
    """The training objective an example's ``--objective``, ``--num-particles`` and
    ``--gradient`` name, for models whose sample sites lie in a plate named ``"data"``:

    * ``"elbo"``: :class:`~pyro_dgm.infer.TraceAnalyticKL_ELBO` (closed-form KL where one
      exists) averaged over ``num_particles`` vectorized samples; with ``free_bits``
      :math:`\\lambda > 0`, :class:`~pyro_dgm.infer.FreeBitsELBO` (a KL floor of
      :math:`\\lambda` nats per group of units);
    * ``"iwae"``: :class:`~pyro_dgm.infer.ImportanceWeightedELBO` with ``num_particles``
      :math:`= K` and the gradient estimator ``gradient``.

    :raises ValueError: for an unknown ``objective``, ``num_particles < 1``, a ``gradient``
        other than ``"reparam"`` with the ELBO, or ``free_bits`` with the IWAE bound or
        negative.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be positive, got {num_particles}")
    if objective == "iwae":
        if free_bits:
            raise ValueError(f"free_bits is for objective='elbo', got free_bits={free_bits}")
        return ImportanceWeightedELBO(num_particles, gradient=gradient)
    if gradient != "reparam":
        raise ValueError(f"gradient={gradient!r} is for objective='iwae'; the ELBO uses "
                         "gradient='reparam'")
    if free_bits:
        particles = {} if num_particles == 1 else {"num_particles": num_particles,
                                                    "vectorize_particles": True}
        return FreeBitsELBO(free_bits, **particles)
    if num_particles == 1:
        return TraceAnalyticKL_ELBO()
    return TraceAnalyticKL_ELBO(num_particles=num_particles, vectorize_particles=True)
