"""The LightningModule of the log-uniform EDM test method."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from cmexp.diffusion.precond import EDMPrecond
from cmexp.inference.plan import SamplingSpec
from cmexp.training.base import DiffusionLitModule, OptimizerFactory, PrecondFactory
from tests.plugin_method.loss import LogUniformEDMLoss


class LogUniformEDMLitModule(DiffusionLitModule):
    """An EDM denoiser trained with :class:`LogUniformEDMLoss`, sampled with Heun."""

    kind = "loguniform_edm"

    def __init__(
        self,
        net: nn.Module,
        loss: LogUniformEDMLoss,
        optimizer: OptimizerFactory,
        ema_decay: float = 0.99,
        precond: PrecondFactory = EDMPrecond,
        sample_num_scales: int = 18,
        **base: Any,
    ) -> None:
        super().__init__(optimizer, ema_decay, **base)
        self.model = precond(net)
        self._init_ema()
        self.loss = loss
        self.sample_num_scales = int(sample_num_scales)

    def compute_loss(
        self, images: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        return self.loss(self.model, images, labels, shard=self.shard()).mean(), {}

    def sampling_spec(self) -> SamplingSpec:
        m = self.model
        return SamplingSpec(
            family="denoiser",
            sigma_min=m.sigma_min,
            sigma_max=m.sigma_max,
            num_scales=self.sample_num_scales,
            sampler="heun",
        )
