"""Site-level helpers shared by the objectives and the evaluation functions: per-data-point
reduction of a trace site's log-density and the split of its scale into the data plate's
subsampling and the rest (e.g. KL warm-up)."""

from __future__ import annotations

from collections.abc import Callable

import pyro.poutine as poutine
from torch import Tensor


def per_data_point(site: dict, value: Tensor, data_plate: str, particle_dim: int) -> Tensor:
    """Sum a site's (batch-shaped) term over every dim but the particle and data-plate dims,
    returning shape (particles, B); B is 1 for sites outside the data plate."""
    frames = {f.name: f.dim for f in site["cond_indep_stack"] if f.vectorized}
    if data_plate not in frames:
        raise ValueError(
            f"site {site['name']!r} is not inside the data plate {data_plate!r}: per-data-point "
            "evaluation needs every sample site inside it (pass data_plate=<your plate's name>)"
        )
    value = value.reshape((1,) * (-particle_dim - value.dim()) + value.shape)
    keep = {value.dim() + particle_dim, value.dim() + frames[data_plate]}
    summed = [d for d in range(value.dim()) if d not in keep]
    if summed:
        value = value.sum(summed, keepdim=True)
    particle_axis, data_axis = value.dim() + particle_dim, value.dim() + frames[data_plate]
    return value.squeeze().reshape(value.shape[particle_axis], value.shape[data_axis])


def unscaled_log_prob(site: dict) -> Tensor:
    log_prob = site["fn"].log_prob(site["value"])
    if site["mask"] is not None:
        log_prob = log_prob.masked_fill(~site["mask"], 0.0)
    return log_prob


def guess_max_plate_nesting(model: Callable, guide: Callable, args, kwargs) -> int:
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    dims = [
        -f.dim
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for f in site["cond_indep_stack"]
        if f.vectorized
    ]
    return max(dims, default=0)


def plate_subsample_scale(site: dict, plate: str) -> float:
    """The part of a site's scale that subsampling the plate named ``plate`` contributes,
    ``full_size / size`` (1 if the site is not in that plate or it is not subsampled); the
    scales of other plates and of ``poutine.scale`` are not included."""
    for frame in site["cond_indep_stack"]:
        if frame.name == plate and frame.full_size is not None:
            return frame.full_size / frame.size
    return 1.0
