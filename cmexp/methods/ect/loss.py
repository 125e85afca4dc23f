"""Easy consistency tuning (ECT, Geng et al., "Consistency Models Made Easy", ICLR 2025).

Continuous-time consistency training that starts from a pretrained diffusion model. Per
example (ECT ``training/loss.py``, CIFAR-10 branch):

* ``t ~ lognormal(P_mean, P_std)`` (-1.1, 2.0: iCT's proposal, continuous here);
* ``r = t (1 - n(t) / q^(stage+1))`` clamped at 0, with ``n(t) = 1 + k sigmoid(-b t)``
  (k = 8, b = 1, q = 2): the gap ``t - r`` shrinks by ``q`` at every stage, and early stages
  give ``r = 0`` for small t, where the target is the clean image (a denoising loss: the
  diffusion model is the ``dt = t`` end of the consistency family);
* the same noise for both points, ``x_t = x + t z``, ``x_r = x + r z`` (CM paper Alg. 3);
* target ``stopgrad f_theta(x_r, r)`` from the online network itself (no target EMA, mu = 0),
  on a replay of the RNG state so both passes see the same dropout mask;
* loss ``d(f_theta(x_t, t), target) / (t - r)`` with ECT's d: the l2 norm, optionally
  pseudo-Huber ``sqrt(||.||^2 + c^2) - c`` (``c = 0``: the plain norm, ECT's CIFAR-10 default,
  which is the "adaptive weighting" ``||.||^2 / ||.||`` of the squared error).

The stage is set by the training module from the images seen (``double_kimg``; ECT CIFAR-10:
``--double 250`` ticks of 12.8 kimg = 3,200 kimg = 25k iterations at batch 128).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cmexp.diffusion.karras import append_dims
from cmexp.diffusion.rng import global_draw, replay_rng
from cmexp.losses.distances import L2NormDistance, Metric
from cmexp.losses.types import ConsistencyFn, ConsistencyLossOutput
from cmexp.losses.weighting import ICTWeighting


class ECTLoss:
    """ECT objective (see the module docstring).

    Args:
        metric: d(x, y) -> ``[B]``; default :class:`L2NormDistance` (ECT's c = 0); ECT's c > 0 is
            ``PseudoHuberDistance(c)``.
        weighting: lambda(t, r) -> ``[B]``; default ``1/(t - r)`` (``ICTWeighting``, ECT's
            CIFAR-10 weighting).
        P_mean, P_std: lognormal proposal of t (ECT/iCT: -1.1, 2.0).
        q: gap shrink factor per stage (> 1; ECT: 2).
        k, b: the mapping ``n(t) = 1 + k sigmoid(-b t)`` (8, 1); ``k = 0`` is ECT's "const"
            mapping ``r = t (1 - 1/q^(stage+1))``.
        stage: current stage (set by the module every step).
    """

    def __init__(
        self,
        metric: Metric | None = None,
        weighting: Callable[[Tensor, Tensor], Tensor] | None = None,
        P_mean: float = -1.1,
        P_std: float = 2.0,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        stage: int = 0,
    ) -> None:
        if not q > 1:
            raise ValueError(
                f"model.loss.q must be > 1 (the gap t - r shrinks by q per stage), got {q!r}"
            )
        if not P_std > 0:
            raise ValueError(f"model.loss.P_std must be > 0, got {P_std!r}")
        if k < 0 or b < 0:
            raise ValueError(f"model.loss.k and model.loss.b must be >= 0, got k={k!r}, b={b!r}")
        self.metric = metric if metric is not None else L2NormDistance()
        self.weighting = weighting if weighting is not None else ICTWeighting()
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.q, self.k, self.b = float(q), float(k), float(b)
        self.stage = int(stage)

    def t_to_r(self, t: Tensor, stage: int | None = None) -> Tensor:
        """``r = max(t (1 - n(t)/q^(stage+1)), 0)``, ``n(t) = 1 + k sigmoid(-b t)``. Any shape."""
        stage = self.stage if stage is None else int(stage)
        n = 1.0 + self.k * torch.sigmoid(-self.b * t)
        return (t * (1.0 - n / self.q ** (stage + 1))).clamp_min(0.0)

    def sample_t(self, batch_size: int, device: torch.device) -> Tensor:
        """``t ~ exp(N(P_mean, P_std^2))``, ``[batch_size]`` float32."""
        return (torch.randn(batch_size, device=device) * self.P_std + self.P_mean).exp()

    def __call__(
        self,
        online: ConsistencyFn,
        images: Tensor,
        class_labels: Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> ConsistencyLossOutput:
        """Args:
            online: f_theta (called with gradients at t, without at r).
            images: ``[B,C,H,W]`` clean data. shard: ``(rank, world_size)``: t and the noise are
                drawn for the global batch and sliced (a DDP step equals the global-batch step).
        Returns: :class:`ConsistencyLossOutput` with ``loss [B]``, ``sigma = t``, ``sigma_next = r``.
        """
        b, dev = images.shape[0], images.device
        t = global_draw(lambda n: self.sample_t(n, dev), b, shard)
        r = self.t_to_r(t)
        noise = global_draw(
            lambda n: torch.randn((n, *images.shape[1:]), device=dev, dtype=images.dtype), b, shard
        )
        t4, r4 = (
            append_dims(t, images.ndim).to(images.dtype),
            append_dims(r, images.ndim).to(images.dtype),
        )
        x_t, x_r = images + t4 * noise, images + r4 * noise
        keep = append_dims(r > 0, images.ndim)
        with replay_rng(dev) as replay:
            with torch.no_grad(), replay():
                if bool(keep.any()):
                    # r = 0 rows are replaced by the data; evaluate them at a valid level
                    r_safe = torch.where(r > 0, r, t)
                    f_r = torch.nan_to_num(online(x_r, r_safe, class_labels))
                    tgt = torch.where(keep, f_r, images)
                else:
                    tgt = images
            pred = online(x_t, t, class_labels)
        loss = self.weighting(t, r) * self.metric(pred, tgt.detach())
        return ConsistencyLossOutput(loss=loss, sigma=t, sigma_next=r)
