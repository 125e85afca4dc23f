"""The IMM LightningModule: a flow map f(x_t, s, t) trained from scratch with the IMM loss
(``cmexp.methods.imm.loss.IMMLoss``), sampled by pushforward (``cmexp.methods.imm.sampler``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cmexp.inference.plan import SamplingSpec
from cmexp.methods.imm.loss import IMMLoss
from cmexp.methods.imm.precond import IMMPrecond
from cmexp.training.base import DiffusionLitModule, OptimizerFactory, PrecondFactory, check_taus


class IMMLitModule(DiffusionLitModule):
    """IMM: online flow map ``self.model`` (an :class:`IMMPrecond`), its own stop-gradient copy
    as the target theta-, and the sampling EMA ``ema`` for samples and checkpoints.

    Args:
        net: raw network with a second time input (``net.guidance_embed=true``).
        loss: :class:`IMMLoss`. optimizer: partial optimizer.
        precond: :class:`IMMPrecond` and its constants (``conf/model/precond/imm.yaml``).
        rho, num_scales: the Karras grid of more-step plans' default spacing (``steps=k``
            picks evenly spaced levels of it; IMM's own grids are given with ``taus``).
        taus: default levels after T (IMM CIFAR-10 2-step: eta = 1.4, sigma = 0.5 * 1.4 = 0.7).
    """

    kind = "imm"

    def __init__(
        self,
        net: nn.Module,
        loss: IMMLoss,
        optimizer: OptimizerFactory,
        ema_decay: float = 0.9999,
        lr_warmup_kimg: float = 0.0,
        compile_net: bool = False,
        channels_last: bool = False,
        precond: PrecondFactory = IMMPrecond,
        rho: float = 7.0,
        num_scales: int = 18,
        taus: Sequence[float] = (0.7,),
    ) -> None:
        super().__init__(optimizer, ema_decay, lr_warmup_kimg, compile_net, channels_last)
        self.model = precond(net)
        self._init_ema()
        self.loss = loss
        self.rho = float(rho)
        if int(num_scales) != num_scales or num_scales < 2:
            raise ValueError(f"model.num_scales must be an integer >= 2, got {num_scales!r}")
        self.num_scales = int(num_scales)
        self.taus = check_taus(taus, self.model)

    def compute_loss(
        self, images: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        out = self.loss(self.model, images, labels, shard=self.shard())
        boundary = float((out.sigma_r == out.sigma_s).float().mean())
        return out.loss.mean(), {"r_equals_s_fraction": boundary}

    def sampling_spec(self) -> SamplingSpec:
        m = self.model
        return SamplingSpec(
            family="flow_map",
            sampler="pushforward",
            sigma_min=m.sigma_min,
            sigma_max=m.sigma_max,
            rho=self.rho,
            num_scales=self.num_scales,
            taus=self.taus,
        )
