"""The MeanFlow objective (Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative
Modeling", arXiv 2505.13447, Sec. 4 and Alg. 1).

Per example: ``(t, r)`` from :class:`TimePairSampler` (``r <= t``), ``e ~ N(0, I)``,
``z_t = (1 - t) x + t e`` and the conditional velocity ``v = e - x``. The MeanFlow identity
``u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t)`` with the total derivative
``d/dt u = v d_z u + d_t u`` (r held fixed) gives the target

    u_tgt = v - (t - r) (v d_z u_theta + d_t u_theta)           (one JVP, tangents (v, 0, 1))
    loss  = sg(w) ||u_theta(z_t, r, t) - sg(u_tgt)||^2          (sum over pixels)
    w     = 1 / (||u_theta - u_tgt||^2 + c)^p                   (adaptive loss weighting)

``sg`` is the stop-gradient: the target carries no gradient, so ``v d_z u + d_t u`` is one
forward-mode product (``torch.func.jvp``) through the network under no_grad, with the same
dropout masks as the online pass (``replay_rng``), or its central finite difference
(``tangent=finite_difference``): the shared tangent objects of :mod:`cmexp.losses.tangent`.
The network sees ``(t, t - r)`` (:class:`~cmexp.methods.meanflow.precond.MeanFlowPrecond`);
its derivative in t at fixed r moves both.

Classifier-free guidance as the paper trains it (Sec. 4.2; App. B.1, Eq. 21): the
target's velocity is the guided field
``v~ = omega v + kappa u_theta(z_t, t, t | c) + (1 - omega - kappa) u_theta(z_t, t, t | null)``
inside ``t in [t_start, t_end]`` (``v`` outside), also the JVP's tangent; the labels of a
``label_dropout`` fraction become the null label and keep ``v``. One network evaluation then
samples the guided model (effective scale ``omega / (1 - kappa)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cmexp.diffusion.karras import append_dims
from cmexp.diffusion.rng import global_draw, replay_rng
from cmexp.losses.tangent import DirectionalDerivative


class TimePairSampler:
    """The paper's ``(r, t)`` sampler: ``t`` and ``r`` logit-normal, ``sigmoid(N(P_mean,
    P_std^2))`` (MeanFlow Sec. 4.3, "lognorm(P_mean, P_std)"), drawn independently; a
    ``ratio`` fraction keeps ``r != t`` and the rest has ``r = t`` (flow matching on those).

    ``version="v0"`` (the paper's, py-meanflow ``sample_two_timesteps_t_r_v0``): sort so that
    ``t >= r``, then ``r = t`` with probability ``1 - ratio``. ``"v1"`` (py-meanflow's improved
    recipe, ``..._v1``, with its own r distribution): ``r = t`` with probability ``1 - ratio``,
    then ``r = min(t, r)``.

    Args:
        P_mean_t, P_std_t: logit-normal of t (CIFAR-10: -2.0, 2.0; ImageNet: -0.4, 1.0).
        P_mean_r, P_std_r: of r (null: t's; py-meanflow v1: -4.0, 1.6 with t's -0.6, 1.6).
        ratio: the probability of ``r != t`` (CIFAR-10: 0.75; ImageNet: 0.25).
        version: "v0" or "v1".
    """

    def __init__(
        self,
        P_mean_t: float = -2.0,
        P_std_t: float = 2.0,
        P_mean_r: float | None = None,
        P_std_r: float | None = None,
        ratio: float = 0.75,
        version: str = "v0",
    ) -> None:
        P_mean_r = P_mean_t if P_mean_r is None else P_mean_r
        P_std_r = P_std_t if P_std_r is None else P_std_r
        for key, value in (("P_std_t", P_std_t), ("P_std_r", P_std_r)):
            if not value > 0:
                raise ValueError(f"model.loss.times.{key} must be > 0, got {value!r}")
        if not 0 <= ratio <= 1:
            raise ValueError(f"model.loss.times.ratio must be in [0, 1], got {ratio!r}")
        if version not in ("v0", "v1"):
            raise ValueError(f"model.loss.times.version must be v0 or v1, got {version!r}")
        self.P_mean_t, self.P_std_t = float(P_mean_t), float(P_std_t)
        self.P_mean_r, self.P_std_r = float(P_mean_r), float(P_std_r)
        self.ratio, self.version = float(ratio), str(version)

    def __call__(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """``[n, 2]`` float32 pairs ``(t, r)`` with ``0 <= r <= t <= 1`` (global torch RNG;
        draw through ``global_draw`` for DDP)."""
        t = torch.sigmoid(torch.randn(n, device=device) * self.P_std_t + self.P_mean_t)
        r = torch.sigmoid(torch.randn(n, device=device) * self.P_std_r + self.P_mean_r)
        same = torch.rand(n, device=device) < 1 - self.ratio
        if self.version == "v0":
            t, r = torch.maximum(t, r), torch.minimum(t, r)
            r = torch.where(same, t, r)
        else:
            r = torch.minimum(t, torch.where(same, t, r))
        return torch.stack([t, r], dim=1)


class MeanFlowGuidance:
    """Classifier-free guidance folded into the target (MeanFlow Sec. 4.2 and, with kappa,
    the improved CFG of App. B.1, Eq. 21): inside ``t in [t_start, t_end]``

        v~ = omega v + kappa u_theta(z_t, t, t | c) + (1 - omega - kappa) u_theta(z_t, t, t | null)

    and ``v~ = v`` outside. ``omega = 1, kappa = 0`` is no guidance (``v~ = v``, no extra
    network passes): the default, and the only setting an unconditional net takes. The two
    ``u_theta(z_t, t, t)`` passes are the online network's, without gradient and without
    dropout (the JAX code's ``train=False``).

    Args:
        omega: omega (the paper's ImageNet B/4 ablation: 3.0 with kappa = 0; its improved CFG
            uses kappa > 0; effective scale ``omega / (1 - kappa)``).
        kappa: kappa in [0, 1).
        t_start, t_end: the t interval in which guidance applies (0 <= t_start <= t_end <= 1).
    """

    def __init__(
        self, omega: float = 1.0, kappa: float = 0.0, t_start: float = 0.0, t_end: float = 1.0
    ) -> None:
        if not omega >= 0:
            raise ValueError(f"model.loss.guidance.omega must be >= 0, got {omega!r}")
        if not 0 <= kappa < 1:
            raise ValueError(f"model.loss.guidance.kappa must be in [0, 1), got {kappa!r}")
        if not 0 <= t_start <= t_end <= 1:
            raise ValueError(
                "model.loss.guidance needs 0 <= t_start <= t_end <= 1, got "
                f"t_start={t_start}, t_end={t_end}"
            )
        self.omega, self.kappa = float(omega), float(kappa)
        self.t_start, self.t_end = float(t_start), float(t_end)

    @property
    def active(self) -> bool:
        """Whether the target differs from the unguided one (omega != 1 or kappa != 0)."""
        return self.omega != 1.0 or self.kappa != 0.0

    @property
    def effective_scale(self) -> float:
        """``omega' = omega / (1 - kappa)`` (App. B.1)."""
        return self.omega / (1.0 - self.kappa)

    def describe(self) -> dict[str, float]:
        """What a checkpoint records (``checkpoint["cmexp"]["meanflow"]["guidance"]``)."""
        return {
            "omega": self.omega,
            "kappa": self.kappa,
            "t_start": self.t_start,
            "t_end": self.t_end,
            "effective_scale": self.effective_scale,
        }

    def velocity(
        self,
        model: nn.Module,
        z: Tensor,
        t: Tensor,
        v: Tensor,
        class_labels: Tensor,
        dropped: Tensor,
    ) -> Tensor:
        """The guided field ``v~`` ``[B,C,H,W]`` for z, v ``[B,C,H,W]``, t ``[B]``, labels
        ``[B]`` and the ``[B]`` mask of the samples whose label was dropped (they keep v)."""
        if not self.active:
            return v
        null = torch.full_like(class_labels, model.label_dim)
        with torch.no_grad(), eval_mode(model):
            if self.kappa != 0.0:
                both = model.u(
                    torch.cat([z, z]),
                    torch.cat([t, t]),
                    torch.cat([t, t]),
                    torch.cat([class_labels, null]),
                )
                u_cond, u_null = both[: z.shape[0]], both[z.shape[0] :]
            else:
                u_cond, u_null = torch.zeros_like(v), model.u(z, t, t, null)
        guided = self.omega * v + self.kappa * u_cond + (1 - self.omega - self.kappa) * u_null
        inside = (t >= self.t_start) & (t <= self.t_end) & ~dropped
        return torch.where(append_dims(inside, v.ndim), guided.to(v.dtype), v)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout) inside, its previous mode afterwards."""
    was = model.training
    model.train(False)
    try:
        yield
    finally:
        model.train(was)


@dataclass
class MeanFlowLossOutput:
    """Per-sample loss ``[B]`` (adaptively weighted), times ``t``, ``r`` ``[B]``, the squared
    error ``||u - u_tgt||^2`` before weighting ``[B]`` and the weights ``[B]``."""

    loss: Tensor
    t: Tensor
    r: Tensor
    error: Tensor
    weight: Tensor


class MeanFlowLoss:
    """The MeanFlow objective (module docstring; MeanFlow Alg. 1).

    Args:
        tangent: the shared directional derivative (``tangent=jvp | finite_difference``;
            :mod:`cmexp.losses.tangent`).
        times: the ``(r, t)`` sampler (:class:`TimePairSampler`).
        norm_p: p of the adaptive weighting ``1 / (||.||^2 + c)^p`` (CIFAR-10: 0.75;
            ImageNet: 1.0; 0 = the plain squared l2 loss).
        norm_eps: c of the adaptive weighting (py-meanflow: 1e-3).
        guidance: classifier-free guidance folded into the target (:class:`MeanFlowGuidance`;
            None or omega = 1, kappa = 0: none).
        label_dropout: the fraction of a class-conditional run's labels replaced by the null
            label (the paper: 0.1; unconditional runs have no labels).
    """

    def __init__(
        self,
        tangent: DirectionalDerivative,
        times: TimePairSampler | None = None,
        norm_p: float = 0.75,
        norm_eps: float = 1e-3,
        guidance: MeanFlowGuidance | None = None,
        label_dropout: float = 0.1,
    ) -> None:
        if not norm_p >= 0:
            raise ValueError(f"model.loss.norm_p must be >= 0, got {norm_p!r}")
        if not norm_eps > 0:
            raise ValueError(f"model.loss.norm_eps must be > 0, got {norm_eps!r}")
        if not 0 <= label_dropout < 1:
            raise ValueError(f"model.loss.label_dropout must be in [0, 1), got {label_dropout!r}")
        self.tangent = tangent
        self.times = times if times is not None else TimePairSampler()
        self.norm_p, self.norm_eps = float(norm_p), float(norm_eps)
        self.guidance = guidance if guidance is not None else MeanFlowGuidance()
        self.label_dropout = float(label_dropout)

    def __call__(
        self,
        model: nn.Module,
        images: Tensor,
        class_labels: Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> MeanFlowLossOutput:
        """images ``[B,C,H,W]`` in [-1, 1]; ``shard``: (rank, world_size): times, noise and
        label dropout are drawn for the global batch and sliced."""
        b, dev = images.shape[0], images.device
        tr = global_draw(lambda n: self.times(n, dev), b, shard)
        e = global_draw(
            lambda n: torch.randn((n, *images.shape[1:]), device=dev, dtype=images.dtype), b, shard
        )
        keep = None
        if class_labels is not None:
            keep = global_draw(lambda n: torch.rand(n, device=dev), b, shard)
        return self.terms(model, images, e, tr[:, 0], tr[:, 1], class_labels, keep)

    def terms(
        self,
        model: nn.Module,
        x: Tensor,
        e: Tensor,
        t: Tensor,
        r: Tensor,
        class_labels: Tensor | None = None,
        keep: Tensor | None = None,
        velocity: Tensor | None = None,
    ) -> MeanFlowLossOutput:
        """The loss for given data ``x``, noise ``e`` (both ``[B,C,H,W]``) and times ``t``,
        ``r`` ``[B]`` with ``0 <= r <= t <= 1``. ``keep`` ``[B]`` uniform: labels with
        ``keep < label_dropout`` become the null label. ``velocity``: the instantaneous
        velocity of the target, ``e - x`` (the conditional velocity, MeanFlow's) when None;
        any field ``v(z_t, t)`` otherwise (the closed-form tests give the exact one)."""
        if bool((r > t).any()):
            raise ValueError(
                "MeanFlow's average velocity is over [r, t]: every r must be <= t, got r > t for "
                f"{int((r > t).sum())} of {t.numel()} samples"
            )
        tt, rr = append_dims(t, x.ndim).to(x.dtype), append_dims(r, x.ndim).to(x.dtype)
        z = (1 - tt) * x + tt * e
        v = e - x if velocity is None else velocity
        labels, dropped = class_labels, None
        if class_labels is not None:
            dropped = (
                keep < self.label_dropout
                if keep is not None
                else torch.zeros_like(class_labels, dtype=torch.bool)
            )
            labels = torch.where(dropped, torch.full_like(class_labels, model.label_dim), labels)
            v = self.guidance.velocity(model, z, t, v, class_labels, dropped)
        elif self.guidance.active:
            raise ValueError(
                "model.loss.guidance (omega != 1 or kappa != 0) needs class labels: set "
                "dataset.use_labels=true"
            )

        def fn(zz: Tensor, ts: Tensor) -> Tensor:
            return model.u(zz, r, ts, labels)  # r held fixed: d/dt moves t and t - r

        # The tangent pass runs first on a replay of the RNG state the online pass then uses
        # (same dropout masks; the stream continues as after one pass).
        with replay_rng(x.device) as replay:
            with torch.no_grad(), replay():
                dudt = self.tangent.derivative(fn, (z, t), (v, torch.ones_like(t))).detach()
            u = model.u(z, r, t, labels)
        target = (v - (tt - rr) * dudt.to(v.dtype)).detach()
        error = ((u - target) ** 2).flatten(1).sum(1)
        weight = (error.detach() + self.norm_eps) ** (-self.norm_p)
        return MeanFlowLossOutput(
            loss=weight * error, t=t, r=r, error=error.detach(), weight=weight
        )

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about the objective (``checkpoint["cmexp"]["meanflow"]``)."""
        times = self.times
        return {
            "times": {
                "P_mean_t": times.P_mean_t,
                "P_std_t": times.P_std_t,
                "P_mean_r": times.P_mean_r,
                "P_std_r": times.P_std_r,
                "ratio": times.ratio,
                "version": times.version,
            },
            "norm_p": self.norm_p,
            "norm_eps": self.norm_eps,
            "label_dropout": self.label_dropout,
            "guidance": self.guidance.describe(),
        }


def check_meanflow_tangent(tangent: DirectionalDerivative, model: nn.Module) -> None:
    """One tangent through ``model.u`` (a :class:`MeanFlowPrecond`) on a one-image batch; a layer
    without forward-mode AD raises a ValueError naming it (nothing to check for finite
    differences). The global RNG is untouched."""
    gen = torch.Generator().manual_seed(0)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    shape = (1, model.img_channels, model.img_resolution, model.img_resolution)
    z = torch.randn(shape, generator=gen).to(dev)
    v = torch.randn(shape, generator=gen).to(dev)
    t, r = torch.full((1,), 0.7, device=dev), torch.full((1,), 0.3, device=dev)
    labels = torch.zeros(1, dtype=torch.long, device=dev) if model.label_dim > 0 else None
    tangent.check_probe(
        model,
        lambda: model.u(z, r, t, labels),
        lambda: tangent.derivative(
            lambda a, b: model.u(a, r, b, labels), (z, t), (v, torch.ones_like(t))
        ),
    )
