"""MeanFlow's sampler in the registry's calling convention (family ``flow_map``, sampler
``meanflow``): one-step ``x = e - u(e, 0, 1)`` and multistep flow-map jumps
``z_r = z_t - (t - r) u(z_t, r, t)`` (MeanFlow Sec. 4.1 and Alg. 2) on the shared jump plan
``[T, tau_1, ...]`` (``cmexp.inference.plan.sigma_plan``), ended at the data end sigma = 0.

It calls the model in the ``flow_map`` convention ``model(x_sigma, sigma, labels,
sigma_next=...)`` (shared with IMM), in which MeanFlow's wrapper converts each level to
``t = sigma / (1 + sigma)`` and jumps with u; so it also samples any other flow map of the
family (an IMM checkpoint: ``pushforward`` without its final stop at sigma_min). The plan may
start at sigma = inf (t = 1): the state there is the unit noise itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

from torch import Tensor, nn

from cmexp.methods.meanflow.precond import flow_map_times


def run(
    model: nn.Module,
    z: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    sigma_min: float,
    class_labels: Tensor | None = None,
    noise: Callable[[Tensor], Tensor] | None = None,
    clip: bool = True,
) -> Tensor:
    """Flow-map jumps from unit noise ``z`` ``[B,C,H,W]`` through the plan's levels and 0.

    The start is ``z`` itself at sigma = inf (MeanFlow's ``z_1 = e``) and ``sigmas[0] z``
    otherwise (the suite's VE start); then ``x <- model(x, sigma, labels, sigma_next)`` for
    each consecutive pair of ``[sigmas..., 0]``: one network evaluation per level, no fresh
    noise (``noise`` is unused: the map is deterministic). The levels must fall strictly (each
    jump goes from t to r < t; :func:`~cmexp.methods.meanflow.precond.flow_map_times`).
    ``clip`` clamps the final image to [-1, 1] (pixel models; latents are never clamped);
    the intermediate states are noisy and left alone. ``sigma_min`` is unused (the last jump
    lands on 0).
    """
    flow_map_times(sigmas)  # r > t anywhere: one error naming the plan
    levels = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    x = z if levels[0] == float("inf") else levels[0] * z
    for sigma, sigma_next in pairwise([*levels, 0.0]):
        x = model(x, sigma, class_labels, sigma_next=sigma_next)
    return x.clamp(-1, 1) if clip else x
