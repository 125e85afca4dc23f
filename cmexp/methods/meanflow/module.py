"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, arXiv 2505.13447): a one-step generator trained
from scratch on the average velocity ``u(z_t, r, t)`` of the linear path, with the objective of
``cmexp.methods.meanflow.loss`` and the wrapper of ``cmexp.methods.meanflow.precond``.

Copies: ``model`` (online theta, trained; the target is its stop-gradient, so there is no
target network) and ``ema`` (sampling EMA). Checkpoints are of family ``flow_map`` and sample
with the ``meanflow`` sampler (``cmexp.methods.meanflow.sampler``): ``x = e - u(e, 0, 1)`` in
one step, flow-map jumps on the shared jump plan for more. The tangent is computed on the
unwrapped network inside ``training_step`` (gradient-free); the online pass runs inside
Lightning's DDP forward, so gradients are all-reduced as usual.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from cmexp.inference.plan import SamplingSpec
from cmexp.methods.meanflow.loss import MeanFlowLoss, check_meanflow_tangent
from cmexp.methods.meanflow.precond import MeanFlowPrecond, linear_path_alpha_bars, t_to_sigma
from cmexp.training.base import DiffusionLitModule, OptimizerFactory, PrecondFactory


def check_jump_times(times: Sequence[float], key: str = "model.jump_times") -> tuple[float, ...]:
    """Multistep sampling's times after t = 1 as floats: strictly descending inside (0, 1);
    otherwise a ValueError naming ``key``."""
    out = tuple(float(t) for t in times)
    if any(not 0 < t < 1 for t in out) or any(b >= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(
            f"{key} must be a strictly descending list of times in (0, 1) such as [0.5] (each "
            f"jump goes from t to r < t), got {list(out)}"
        )
    return out


class MeanFlowLitModule(DiffusionLitModule):
    """MeanFlow training (MeanFlow Alg. 1) from random weights.

    Args:
        net: raw network with a second time input (``net.guidance_embed=true``: ``t - r``).
        loss: :class:`~cmexp.methods.meanflow.loss.MeanFlowLoss`.
        optimizer: partial optimizer (CIFAR-10: Adam lr 6e-4, betas (0.9, 0.999)).
        precond: :class:`~cmexp.methods.meanflow.precond.MeanFlowPrecond` with its constants.
        jump_times: times t of multistep sampling after t = 1 (the paper's 2 steps: 0.5),
            written into checkpoints as sigma taus ``t / (1 - t)``.
        num_scales: T of the jump grid ``t = i / T`` that ``steps=k`` (trailing, uniform in t)
            and ``tau_indices`` index.
        base: the shared settings (``ema_decay``: CIFAR-10 0.99995; ``lr_warmup_kimg``:
            10k iterations x 1024; ``compile_net``, ``channels_last``), passed through to
            :class:`~cmexp.training.base.DiffusionLitModule`.
    """

    kind = "meanflow"

    def __init__(
        self,
        net: nn.Module,
        loss: MeanFlowLoss,
        optimizer: OptimizerFactory,
        precond: PrecondFactory = MeanFlowPrecond,
        jump_times: Sequence[float] = (0.5,),
        num_scales: int = 1000,
        **base: Any,
    ) -> None:
        super().__init__(optimizer, **base)
        self.model = precond(net)
        self._init_ema()
        self.loss = loss
        if loss.guidance.active and self.model.label_dim == 0:
            raise ValueError(
                f"model.loss.guidance (omega={loss.guidance.omega}, kappa={loss.guidance.kappa}) "
                "needs a class-conditional net: set dataset.use_labels=true, or omega=1 kappa=0"
            )
        self.jump_times = check_jump_times(jump_times)
        self.taus = tuple(t_to_sigma(t) for t in self.jump_times)
        for t, tau in zip(self.jump_times, self.taus, strict=True):
            if not tau >= self.model.sigma_min:
                raise ValueError(
                    f"model.jump_times entry {t} is sigma = t / (1 - t) = {tau:.4g}, below "
                    f"model.precond.sigma_min = {self.model.sigma_min}"
                )
        if int(num_scales) != num_scales or num_scales < 2:
            raise ValueError(f"model.num_scales must be an integer >= 2, got {num_scales!r}")
        self.num_scales = int(num_scales)
        check_meanflow_tangent(loss.tangent, self.model)  # no forward-mode AD: one error

    def compute_loss(
        self, images: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        out = self.loss(self.model, images, labels, shard=self.shard())
        extra = {
            "error": float(out.error.mean()),  # ||u - u_tgt||^2 before the adaptive weight
            "weight": float(out.weight.mean()),
            "r_below_t": float((out.r < out.t).float().mean()),  # the fraction with r != t
        }
        return out.loss.mean(), extra

    def sampling_spec(self) -> SamplingSpec:
        """Family ``flow_map``, sampler ``meanflow``; sigma_max = inf (t = 1); the jump grid
        ``t = i / num_scales`` as the linear path's alpha_bars (``steps=k``: uniform in t)."""
        m = self.model
        return SamplingSpec(
            family="flow_map",
            sampler="meanflow",
            sigma_min=m.sigma_min,
            sigma_max=math.inf,
            num_scales=self.num_scales,
            taus=self.taus,
            alpha_bars=linear_path_alpha_bars(self.num_scales),
        )

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "jump_times": list(self.jump_times),
            "meanflow": self.loss.describe(),
        }
