"""Truncated consistency models, stage 2 (TCM, Lee et al., ICLR 2025): a consistency model
trained on ``[t', T]`` only, initialised from a stage-1 consistency model whose frozen copy is
its boundary condition below t' (:mod:`cmexp.methods.tcm.loss`).

Copies: ``model`` (the student f_theta, trained; its own stop-gradient is the target, as in
ECT), ``ema`` (sampling EMA, continuing the stage-1 EMA it starts from) and the frozen stage-1
model (``self.teacher``; kept out of checkpoints, rebuilt from ``model.stage1_path`` on resume).
The student samples as any consistency model (family "consistency"): the tau search, editing
and export work on ``tcm`` checkpoints as on CD/CT/ECT ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from cmexp.diffusion.ema import ema_update_
from cmexp.diffusion.precond import ECTPrecond
from cmexp.inference.plan import SamplingSpec
from cmexp.methods.tcm.loss import TCMLoss
from cmexp.training.base import (
    DiffusionLitModule,
    OptimizerFactory,
    PrecondFactory,
    check_taus,
    frozen_copy,
)
from cmexp.training.teacher import init_from_consistency_model


def check_transition(transition_t: float, model: nn.Module) -> float:
    """t' strictly inside the wrapper's ``(sigma_min, sigma_max)``; a ValueError naming
    ``model.transition_t`` otherwise."""
    t = float(transition_t)
    if not model.sigma_min < t < model.sigma_max:
        raise ValueError(
            "model.transition_t must be in (model.precond.sigma_min, model.precond.sigma_max) = "
            f"({model.sigma_min}, {model.sigma_max}), got {transition_t}"
        )
    return t


class TCMLitModule(DiffusionLitModule):
    """TCM stage 2.

    Args:
        net: raw network with the stage-1 model's architecture. loss: :class:`TCMLoss`.
        stage1_path: a cmexp ECT/CD/CT checkpoint (or ``zoo:fmnist_cd``): its sampling-EMA
            weights initialise the student and the sampling EMA, and a frozen copy of them is
            the boundary model below t' (NVlabs/TCM ``--transfer`` and ``--tcm_teacher_pkl``,
            both the stage-1 snapshot; FastGen ``config_tcm.py``: teacher, net and EMA from the
            stage-1 EMA).
        transition_t: t', the truncation point, in ``(sigma_min, sigma_max)`` (TCM: 1.0).
        double_kimg: images (thousands) per stage of the gap schedule.
        start_stage: the stage at the first step (TCM continues stage 1's tick count,
            ``--resume_tick``, so stage 2 starts where stage 1 ended).
        precond: the student's wrapper; its constants must be the stage-1 model's, and its
            training-time scalings too (``ECTPrecond`` with EDM scalings after an ECT stage 1,
            the boundary scalings, ``model/precond=cm``, after CD/CT).
        num_scales, rho: the Karras grid that ``tau_indices`` and the tau search index.
        taus: default levels after T for multistep sampling (FastGen ``config_tcm.py``: 1.0).
    """

    kind = "tcm"

    def __init__(
        self,
        net: nn.Module,
        loss: TCMLoss,
        optimizer: OptimizerFactory,
        stage1_path: str | None = None,
        transition_t: float = 1.0,
        double_kimg: float = 25600.0,
        start_stage: int = 0,
        ema_decay: float = 0.9999,
        lr_warmup_kimg: float = 0.0,
        compile_net: bool = False,
        channels_last: bool = False,
        precond: PrecondFactory = ECTPrecond,
        rho: float = 7.0,
        num_scales: int = 18,
        taus: Sequence[float] = (1.0,),
    ) -> None:
        super().__init__(optimizer, ema_decay, lr_warmup_kimg, compile_net, channels_last)
        if not double_kimg > 0:
            raise ValueError(f"model.double_kimg must be > 0, got {double_kimg!r}")
        if int(start_stage) < 0:
            raise ValueError(f"model.start_stage must be >= 0, got {start_stage!r}")
        self.model = precond(net)
        self.transition_t = check_transition(transition_t, self.model)
        self.stage1_path = self._load_stage1(stage1_path)
        self.attach_teacher(frozen_copy(self.model))  # the boundary model, out of checkpoints
        self._init_ema()
        ema_update_(self.ema, self.model, 0.0)
        loss.transition_t, loss.sigma_max = self.transition_t, self.model.sigma_max
        self.loss = loss
        self.double_kimg = float(double_kimg)
        self.start_stage = int(start_stage)
        self.rho = float(rho)
        self.num_scales = int(num_scales)
        self.taus = check_taus(taus, self.model)

    def _load_stage1(self, path: str | None) -> str:
        """Copy the stage-1 model's sampling-EMA weights into the student after checking that
        the two compute the same function (constants, training-time scalings, network)."""
        if not path:
            raise ValueError(
                "model.stage1_path is required for TCM stage 2: the last.ckpt of an ECT/CD/CT run "
                "(e.g. +experiment=fmnist_tcm_stage1) or zoo:fmnist_cd"
            )
        return init_from_consistency_model(
            self.model, path, "model.stage1_path", "TCM stage 2 starts from a consistency model"
        )

    @property
    def stage1(self) -> nn.Module:
        """The frozen stage-1 model (the boundary condition below t')."""
        held = self.teacher
        assert held is not None
        return held

    def stage_at(self, kimg: float) -> int:
        """``start_stage + floor(kimg / double_kimg)``."""
        return self.start_stage + int(kimg // self.double_kimg)

    def compute_loss(
        self, images: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        kimg = self.batches_seen * self.global_batch_size(images.shape[0]) / 1000
        self.loss.stage = self.stage_at(kimg)
        self.stage1.train(self.model.training)  # same dropout and scalings as the student (TCM)
        out = self.loss(self.model, self.stage1, images, labels, shard=self.shard())
        edge = out.boundary
        extra = {
            "stage": self.loss.stage,
            "ratio": self.loss.ratio(),
            "boundary_loss": float(out.raw.detach()[edge].mean()) if bool(edge.any()) else 0.0,
            "below_transition": float((out.sigma_next < self.transition_t).float().mean()),
        }
        return out.loss.mean(), extra

    def sampling_spec(self) -> SamplingSpec:
        return self.consistency_spec(self.num_scales)

    @contextlib.contextmanager
    def sampling_mode(self) -> Iterator[None]:
        """Samples use the wrapper's eval-mode scalings (the boundary ones): the sampling EMA
        in eval mode while they are drawn."""
        was_training = self.ema.training
        self.ema.eval()
        try:
            yield
        finally:
            self.ema.train(was_training)

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "stage1_path": self.stage1_path,
            "transition_t": self.transition_t,
            "double_kimg": self.double_kimg,
            "start_stage": self.start_stage,
        }
