"""Continuous-time consistency training and distillation, sCT and sCD (Lu & Song 2024, arXiv
2410.11081) in TrigFlow time (``cmexp.diffusion.trigflow``), with the objective of
``cmexp.methods.scm.loss``.

Copies: ``model`` (online theta, trained; the objective's F^- is its stop-gradient, so there is
no target network) and ``ema`` (sampling EMA). ``weight_net`` is the learned adaptive weighting
w(t), trained with theta and kept in checkpoints. sCD's teacher is frozen and kept out of
checkpoints. Sampling uses the sigma interface of the TrigFlow wrapper, so every consistency
sampler, editor and the tau search work on sct/scd checkpoints; the checkpoint's ``taus`` are
sCM's intermediate TrigFlow times as sigma = sd tan(t).

The tangent dF^-/dt is computed on the unwrapped network inside ``training_step`` (Lightning's
DDP wrapper drives the online forward/backward, so gradients are all-reduced as usual; the
tangent pass runs under no_grad and carries no gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from cmexp.diffusion.ema import ema_update_
from cmexp.diffusion.trigflow import EDMTrigFlowPrecond, TrigFlowPrecond, check_trigflow_times
from cmexp.inference.plan import SamplingSpec
from cmexp.methods.scm.loss import SCMLoss, check_trigflow_tangent, trigflow_sigma_taus
from cmexp.training.base import DiffusionLitModule, OptimizerFactory, PrecondFactory
from cmexp.training.teacher import check_preconditioning, load_teacher


class SCMLitModule(DiffusionLitModule):
    """Shared sCT/sCD logic.

    Args:
        net: raw network (sCM: positional time embedding, or Fourier scale 0.02, not 16).
        loss: :class:`~cmexp.losses.SCMLoss`.
        weighting: the adaptive weighting w(t) (:class:`~cmexp.losses.AdaptiveWeight`).
        precond: the TrigFlow wrapper with its constants (sCT: ``TrigFlowPrecond``; sCD:
            ``EDMTrigFlowPrecond``): sigma_min, sigma_max, the sigma range of the grids and
            samplers (80 <-> t_max = 1.56454); sigma_data sd (0.5); c_noise_scale, the
            wrapper's time-label scale.
        t_mids: TrigFlow times of multistep sampling after the first step (sCM 2-step: 1.1),
            written into checkpoints as sigma taus ``sd tan(t)``.
        num_scales, rho: the Karras grid that ``tau_indices`` and the tau search index.
    """

    kind = "scm"

    def __init__(
        self,
        net: nn.Module,
        loss: SCMLoss,
        weighting: nn.Module,
        optimizer: OptimizerFactory,
        precond: PrecondFactory = TrigFlowPrecond,
        t_mids: Sequence[float] = (1.1,),
        num_scales: int = 18,
        rho: float = 7.0,
        **base: Any,
    ) -> None:
        super().__init__(optimizer, **base)
        self.model = precond(net)
        self._init_ema()
        self.weight_net = weighting
        if abs(loss.sigma_data - self.model.sigma_data) > 1e-12:
            raise ValueError(
                f"model.loss.sigma_data={loss.sigma_data} must equal "
                f"model.precond.sigma_data={self.model.sigma_data}"
            )
        self.loss = loss
        self.t_mids = tuple(check_trigflow_times(t_mids, "model.t_mids"))
        self.taus = trigflow_sigma_taus(list(self.t_mids), self.model.sigma_data)
        lo, hi = self.model.sigma_min, self.model.sigma_max
        for t, tau in zip(self.t_mids, self.taus, strict=True):
            if not lo < tau < hi:
                raise ValueError(
                    f"model.t_mids entry {t} is sigma = sd tan(t) = {tau:.4g}, outside "
                    f"(model.precond.sigma_min, model.precond.sigma_max) = ({lo}, {hi})"
                )
        if int(num_scales) != num_scales or num_scales < 2:
            raise ValueError(f"model.num_scales must be an integer >= 2, got {num_scales!r}")
        self.num_scales, self.rho = int(num_scales), float(rho)
        check_trigflow_tangent(
            loss.tangent, self.model
        )  # no forward-mode AD: one error naming the layer

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The online network and the adaptive weighting."""
        return [
            p for m in (self.model, self.weight_net) for p in m.parameters() if p.requires_grad
        ]

    def compute_loss(
        self, images: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        out = self.loss(
            self.model, self.weight_net, images, labels, step=self.global_step, shard=self.shard()
        )
        extra = {
            "warmup": out.warmup,
            "tangent_norm": float(out.tangent_norm.mean()),
            "weight_w": float(out.w.mean()),
        }
        return out.loss.mean(), extra

    def sampling_spec(self) -> SamplingSpec:
        return self.consistency_spec(self.num_scales)

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "t_mids": list(self.t_mids)}


class SCTLitModule(SCMLitModule):
    """sCT: continuous-time consistency training from data (sCM Alg. 1 with dx_t/dt =
    cos(t) z - sin(t) x0), TrigFlow parameterisation with c_noise(t) = c_noise_scale t, random
    initialisation."""

    kind = "sct"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.loss.teacher is not None:
            raise ValueError("model.loss of an sCT run must have no teacher (use model=scd)")


class SCDLitModule(SCMLitModule):
    """sCD: continuous-time consistency distillation from an EDM teacher trained by this suite.

    The teacher (``teacher_path``: its sampling-EMA weights, rebuilt by
    :func:`cmexp.training.teacher.load_teacher`) is converted exactly to TrigFlow
    (:class:`~cmexp.diffusion.trigflow.EDMTrigFlowPrecond`: dx_t/dt = sd F_teacher), frozen, in
    eval mode and kept out of checkpoints. The student uses the same EDM-converted
    parameterisation, so with ``init_from_teacher`` (sCM: initialise from the diffusion model)
    its consistency function starts as the teacher's denoiser; ``model.precond.sigma_data`` and
    ``model.precond.c_noise_scale`` must be the teacher's (0.5, 0.25).
    """

    kind = "scd"

    def __init__(
        self,
        *args: Any,
        teacher_path: str | None = None,
        init_from_teacher: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        teacher = load_teacher(teacher_path, self.model.net)
        # the student reads the teacher's network inputs (its sigma range is TrigFlow's own)
        check_preconditioning(self.model, teacher, teacher_path, ("sigma_data", "c_noise_scale"))
        trig_teacher = EDMTrigFlowPrecond.from_denoiser(teacher)
        trig_teacher.source_path = getattr(teacher, "source_path", "")
        self.attach_teacher(trig_teacher)
        self.loss.teacher = trig_teacher
        if init_from_teacher:
            self.model.net.load_state_dict(teacher.net.state_dict())
            ema_update_(self.ema, self.model, 0.0)

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "teacher_path": getattr(self.teacher, "source_path", "")}
