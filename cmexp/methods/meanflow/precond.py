"""MeanFlow's average-velocity network on the linear path, and the path read in the suite's sigma.

The path (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447,
Sec. 3): ``z_t = (1 - t) x + t e``, ``e ~ N(0, I)``, ``t in [0, 1]``; the conditional velocity
is ``v = e - x``. The average velocity over ``[r, t]`` is
``u(z_t, r, t) = (z_t - z_r) / (t - r)``, so a flow-map jump is ``z_r = z_t - (t - r) u``.

The suite's one time variable outside a method's own parametrisation is sigma. ``z_t`` is
``x + sigma e`` scaled by ``1 - t`` with ``sigma = t / (1 - t)`` (``t = sigma / (1 + sigma)``):
t = 1 is sigma = inf (the zero-terminal-SNR end the VP models already use) and t = 0 is
sigma = 0; the flow_map family's samplers pass the state ``x_sigma = z_t / (1 - t)``, and at
sigma = inf the unit noise ``z_1 = e`` itself. Checkpoints record their jump grid as the path's ``alpha_bar(t) = (1 - t)^2 /
((1 - t)^2 + t^2)`` at ``t = i / T`` (:func:`linear_path_alpha_bars`), the suite's
representation of a grid that reaches sigma = inf: the plans of ``steps=k`` are then the
trailing timesteps ``t = 1, 1 - 1/k, ...`` (uniform in t, as the paper's 2-step sampler
1 -> 0.5 -> 0), and ``tau_indices=[j]`` is ``t = (T - j) / T``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cmexp.diffusion.karras import append_dims, as_sigma_batch
from cmexp.diffusion.precond import WrapsNet, register_precond


def sigma_to_t(sigma: float) -> float:
    """``t = sigma / (1 + sigma)`` (sigma = inf -> 1)."""
    sigma = float(sigma)
    if math.isinf(sigma):
        return 1.0
    return sigma / (1.0 + sigma)


def t_to_sigma(t: float) -> float:
    """``sigma = t / (1 - t)`` (t = 1 -> inf)."""
    t = float(t)
    return math.inf if t >= 1.0 else t / (1.0 - t)


def linear_path_alpha_bars(num_steps: int) -> tuple[float, ...]:
    """``alpha_bar(t_i) = (1 - t_i)^2 / ((1 - t_i)^2 + t_i^2)`` at ``t_i = i / T``, i = 1..T
    (``alpha_bar = 1 / (1 + sigma^2)`` with sigma = t / (1 - t)): strictly decreasing, 0 at
    t = 1. ``T = num_steps >= 2``."""
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"model.num_scales must be an integer >= 2, got {num_steps!r}")
    out = []
    for i in range(1, int(num_steps) + 1):
        t = i / num_steps
        a, b = (1 - t) ** 2, t**2
        out.append(a / (a + b))
    return tuple(out)


def check_flow_net(net: nn.Module) -> None:
    """The raw net must take a second time input: MeanFlow feeds ``t - r`` through the nets'
    guidance-scale input (``net.guidance_embed=true``, :mod:`cmexp.nets.guidance`)."""
    if getattr(net, "guidance_embed", None) is None:
        raise ValueError(
            "model=meanflow feeds the second time t - r to the net through its guidance input "
            f"(a zero-initialised embedding added to the time embedding), but this "
            f"{type(net).__name__} has none: set net.guidance_embed=true"
        )


@register_precond("meanflow")
class MeanFlowPrecond(WrapsNet, nn.Module):
    """A raw network as MeanFlow's average velocity ``u(z_t, r, t)``.

    ``u = net(z_t, c t, labels, guidance=c (t - r))`` with ``c = c_noise_scale``: the (t, t - r)
    conditioning of the paper (Table 1c) with the time labels unscaled (c = 1, as py-meanflow's
    U-Net and the JAX DiT embed them). ``t`` goes through the net's noise embedding; ``t - r``
    through its guidance-scale input, a sinusoidal embedding and a zero-initialised linear layer
    added to the noise embedding before the embedding MLP (``net.guidance_embed=true``;
    docs/modes.md says how this differs from the paper's concatenated embeddings). There are
    no EDM scalings: the paper uses no preconditioner.

    :meth:`u` is the network in MeanFlow's time (the loss); ``forward`` is the ``flow_map``
    family's convention in sigma, ``model(x_sigma, sigma, labels, sigma_next=...)`` (shared with
    IMM; the samplers and the shared loader call it).

    Args:
        net: raw network ``net(x [B,C,H,W], noise_labels [B], class_labels, guidance=[B])``.
        sigma_min: the smallest level a flow-map jump may start from (t = sigma / (1 + sigma)),
            the floor of the plans' intermediate levels. sigma_max is inf (t = 1).
        sigma_data: recorded for the suite's interface only (the path has no sigma_data).
        c_noise_scale: scale of the net's time labels (``c t`` and ``c (t - r)``).
    """

    sigma_max = math.inf

    def __init__(
        self,
        net: nn.Module,
        sigma_min: float = 1e-3,
        sigma_data: float = 0.5,
        c_noise_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 < sigma_min < math.inf:
            raise ValueError(f"model.precond.sigma_min must be > 0, got {sigma_min!r}")
        if not sigma_data > 0:
            raise ValueError(f"model.precond.sigma_data must be > 0, got {sigma_data!r}")
        if not c_noise_scale > 0:
            raise ValueError(f"model.precond.c_noise_scale must be > 0, got {c_noise_scale!r}")
        check_flow_net(net)
        self.net = net
        self.sigma_min = float(sigma_min)
        self.sigma_data, self.c_noise_scale = float(sigma_data), float(c_noise_scale)

    @classmethod
    def from_meta(cls, net: nn.Module, meta: dict[str, Any]) -> nn.Module:
        """The wrapper around ``net`` that a checkpoint's metadata describes."""
        return cls(net, meta["sigma_min"], meta["sigma_data"], meta["c_noise_scale"])

    def describe(self) -> dict[str, str]:
        """What a checkpoint records to rebuild the wrapper (``cmexp.inference.loader``)."""
        return {"name": "meanflow"}

    def u(
        self,
        z: Tensor,
        r: Tensor | float,
        t: Tensor | float,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """The average velocity ``u(z_t, r, t)``: z ``[B,C,H,W]``; r, t scalars or ``[B]`` with
        ``r <= t`` (r = t: the instantaneous velocity v(z_t, t)); class_labels ``[B]`` or None
        (a conditional net's null label is ``label_dim``). Differentiable in z, r and t
        (forward-mode AD for the MeanFlow target). Returns ``[B,C,H,W]`` in z's dtype."""
        t = as_sigma_batch(t, z)
        r = as_sigma_batch(r, z)
        c = self.c_noise_scale
        out = self.net(z, c * t, class_labels, guidance=c * (t - r))
        return out.to(z.dtype)

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | None = None,
        sigma_next: Tensor | float | None = None,
    ) -> Tensor:
        """The flow map in the suite's VE variables, the ``flow_map`` family's calling
        convention (shared with IMM): ``x`` ``[B,C,H,W]`` at level ``sigma`` (``x = z_t / (1 -
        t) = x0 + sigma e``; at sigma = inf the state is the unit noise ``z_1 = e`` itself, the
        suite's zero-terminal-SNR convention) mapped to ``sigma_next <= sigma`` (None: 0, the
        data end, which makes the model a consistency-style x0 estimate): ``z_t = (1 - t) x``,
        ``z_r = z_t - (t - r) u(z_t, r, t)``, returned as ``z_r / (1 - r)``. sigma and
        sigma_next are scalars or ``[B]``; the time path is float32 (float64 for float64 x)."""
        sig_t = as_sigma_batch(sigma, x)
        sig_r = as_sigma_batch(0.0 if sigma_next is None else sigma_next, x)
        if x.dtype == torch.float64:
            sig_t, sig_r = sig_t.double(), sig_r.double()
        t, a_t = path_time(sig_t)
        r, a_r = path_time(sig_r)
        if bool((r > t).any()):
            raise ValueError(
                "a flow-map jump goes from sigma to sigma_next <= sigma, got sigma_next > sigma"
            )
        z = append_dims(a_t, x.ndim).to(x.dtype) * x
        z_r = z - append_dims(t - r, x.ndim).to(x.dtype) * self.u(z, r, t, class_labels)
        return (z_r / append_dims(a_r, x.ndim).to(x.dtype)).to(x.dtype)


def path_time(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """``(t, 1 - t)`` of the levels ``sigma`` ``[B]``: ``t = sigma / (1 + sigma)`` and the scale
    ``1 / (1 + sigma)`` from ``x_sigma`` to ``z_t``; at sigma = inf, t = 1 and the scale is 1
    (the state there is ``z_1 = e`` itself)."""
    inf = torch.isinf(sigma)
    finite = torch.where(inf, torch.zeros_like(sigma), sigma)
    t = torch.where(inf, torch.ones_like(sigma), finite / (1 + finite))
    scale = torch.where(inf, torch.ones_like(sigma), 1 / (1 + finite))
    return t, scale


def flow_map_times(sigmas: Sequence[float] | Tensor) -> list[float]:
    """The times of a jump plan ``[T, tau_1, ...]`` (sigmas, descending) and the final 0:
    ``[t_0, t_1, ..., 0]`` with ``t = sigma / (1 + sigma)``. A ValueError unless they are
    strictly descending inside (0, 1] (each jump goes from t to some r < t)."""
    values = sigmas.tolist() if isinstance(sigmas, Tensor) else list(sigmas)
    ts = [sigma_to_t(s) for s in values] + [0.0]
    if not values or any(not 0 < t <= 1 for t in ts[:-1]):
        raise ValueError(
            f"a flow-map plan needs noise levels in (0, inf] (times t = sigma / (1 + sigma) in "
            f"(0, 1]), got sigmas {values}"
        )
    for t, r in zip(ts, ts[1:], strict=False):
        if not r < t:
            raise ValueError(
                f"a flow-map jump goes from t to r < t, but the plan {values} (times "
                f"{[round(x, 6) for x in ts]}) jumps from t={t:.6g} to r={r:.6g}: give "
                "strictly descending taus"
            )
    return ts
