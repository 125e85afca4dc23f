"""Truncated consistency models, stage 2 (TCM, Lee et al., "Truncated Consistency Models",
ICLR 2025, arXiv 2410.14895; code NVlabs/TCM ``training/loss.py``, ``training/networks_tcm.py``).

The consistency function on the truncated range is split at the transition time t' (paper
Sec. 4, the TCM parameterisation)::

    f(x, t) = f_theta(x, t)   for t >= t'   (the trained stage-2 student)
    f(x, t) = f_1(x, t)       for t <  t'   (the frozen stage-1 consistency model)

so the stage-1 model is the student's boundary condition at t'. Per example:

* ``ln t`` from a Student-t (or normal) law with location ``P_mean``, scale ``P_std`` and
  ``df`` degrees of freedom, truncated to ``[ln t', ln T]`` (inverse-CDF sampling; TCM CIFAR-10
  stage 2: 0, 0.2, df 0.01);
* a fixed share ``boundary_prob`` of the global batch gets ``t = t'`` exactly (the boundary
  rows: TCM draws exactly ``int(B p)`` of them);
* ``r = t - dt``, ``dt = t (1 - ratio) (1 + k sigmoid(-b t))`` (ECT's gap) with
  ``ratio = min(1 - q^-(stage+1), ratio_limit)``, clamped at 0 (the data is the target there);
* the same noise at both points, ``x_t = x + t z``, ``x_r = x + r z``; target
  ``stopgrad f(x_r, r)`` from the split function above (rows with r < t' read the frozen
  stage-1 model), every pass on the same dropout mask;
* per-row loss ``d(f_theta(x_t, t), target) / (t - r)`` and the objective (paper Eq. for the
  total loss: consistency loss plus ``w_b`` times the boundary loss)::

      L = mean_{non-boundary rows} l_i + w_boundary * mean_{boundary rows} l_i

  returned as a per-row ``[B]`` tensor whose mean over the global batch is ``L``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cmexp.diffusion.karras import append_dims
from cmexp.diffusion.rng import global_draw, replay_rng
from cmexp.losses.distances import L2NormDistance, Metric
from cmexp.losses.types import ConsistencyFn
from cmexp.losses.weighting import ICTWeighting

TIME_DISTS = ("student_t", "normal")


@dataclass
class TCMLossOutput:
    """``loss [B]`` (its global-batch mean is the objective), the levels ``sigma = t`` and
    ``sigma_next = r`` (``[B]`` each), ``boundary [B]`` bool (rows at t = t') and ``raw [B]``
    (the weighted per-row loss before the batch weights)."""

    loss: Tensor
    sigma: Tensor
    sigma_next: Tensor
    boundary: Tensor
    raw: Tensor


def split_function(
    student: ConsistencyFn, stage1: ConsistencyFn, transition_t: float
) -> Callable[..., Tensor]:
    """TCM's consistency function: ``student`` where ``sigma >= t'``, ``stage1`` below.

    Each network sees the whole batch (only when some row needs it) on the same RNG state, so
    both share one dropout mask, as NVlabs/TCM ``TCMPrecond`` does. x ``[B,C,H,W]``, sigma
    ``[B]``; returns ``[B,C,H,W]``."""

    def f(x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        upper = sigma >= transition_t
        with replay_rng(x.device) as replay:
            if bool(upper.all()):
                return student(x, sigma, class_labels)
            with replay():
                out = stage1(x, sigma, class_labels)
            if not bool(upper.any()):
                return out
            mine = student(x, sigma, class_labels)
        return torch.where(append_dims(upper, x.ndim), mine, out)

    return f


class TCMLoss:
    """TCM's stage-2 objective (see the module docstring).

    Args:
        metric: d(x, y) -> ``[B]``; TCM: pseudo-Huber with c = 1e-8 (``-c 1e-8``), i.e. the l2
            norm; default :class:`L2NormDistance`.
        weighting: lambda(t, r) -> ``[B]``; default ``1/(t - r)`` (TCM ``--weighting default``).
        time_dist: ``"student_t"`` (TCM ``--tdist t``) or ``"normal"`` (``--tdist normal``) law
            of ln t, truncated to ``[ln t', ln T]``.
        P_mean, P_std, df: its location, scale and degrees of freedom (TCM: 0, 0.2, 0.01).
        q, k, b: ECT's gap (2, 8, 1); ratio_limit: the cap of ``1 - q^-(stage+1)`` (0.999).
        boundary_prob: share of the global batch put at t = t' (TCM CIFAR-10: 0.25).
        w_boundary: weight of the boundary loss (TCM CIFAR-10: 0.1).
        transition_t, sigma_max: t' and T (set by the module from ``model.transition_t`` and
            the wrapper). stage: current stage (set by the module every step).
    """

    def __init__(
        self,
        metric: Metric | None = None,
        weighting: Callable[[Tensor, Tensor], Tensor] | None = None,
        time_dist: str = "student_t",
        P_mean: float = 0.0,
        P_std: float = 0.2,
        df: float = 0.01,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        ratio_limit: float = 0.999,
        boundary_prob: float = 0.25,
        w_boundary: float = 0.1,
        transition_t: float = 1.0,
        sigma_max: float = 80.0,
        stage: int = 0,
    ) -> None:
        if time_dist not in TIME_DISTS:
            raise ValueError(
                f"model.loss.time_dist must be one of {', '.join(TIME_DISTS)}, got {time_dist!r}"
            )
        for key, value in (("P_std", P_std), ("df", df)):
            if not value > 0:
                raise ValueError(f"model.loss.{key} must be > 0, got {value!r}")
        if not q > 1:
            raise ValueError(f"model.loss.q must be > 1, got {q!r}")
        if not 0 < ratio_limit < 1:
            raise ValueError(f"model.loss.ratio_limit must be in (0, 1), got {ratio_limit!r}")
        if not 0 <= boundary_prob < 1:
            raise ValueError(f"model.loss.boundary_prob must be in [0, 1), got {boundary_prob!r}")
        if w_boundary < 0 or k < 0 or b < 0:
            raise ValueError("model.loss.w_boundary, model.loss.k and model.loss.b must be >= 0")
        self.metric = metric if metric is not None else L2NormDistance()
        self.weighting = weighting if weighting is not None else ICTWeighting()
        self.time_dist = time_dist
        self.P_mean, self.P_std, self.df = float(P_mean), float(P_std), float(df)
        self.q, self.k, self.b = float(q), float(k), float(b)
        self.ratio_limit = float(ratio_limit)
        self.boundary_prob, self.w_boundary = float(boundary_prob), float(w_boundary)
        self.transition_t, self.sigma_max = float(transition_t), float(sigma_max)
        self.stage = int(stage)

    # ------------------------------------------------------------------ time and gap
    def ratio(self, stage: int | None = None) -> float:
        """``min(1 - q^-(stage+1), ratio_limit)`` (NVlabs/TCM ``ECMLoss.update_schedule``)."""
        stage = self.stage if stage is None else int(stage)
        return min(1.0 - self.q ** -(stage + 1), self.ratio_limit)

    def t_to_r(self, t: Tensor, stage: int | None = None) -> Tensor:
        """``r = max(t - t (1 - ratio) (1 + k sigmoid(-b t)), 0)``. Any shape."""
        dt = t * (1.0 - self.ratio(stage)) * (1.0 + self.k * torch.sigmoid(-self.b * t))
        return (t - dt).clamp_min(0.0)

    def _law(self):  # noqa: ANN202 - a scipy.stats frozen distribution
        from scipy import stats

        if self.time_dist == "student_t":
            return stats.t(self.df)
        return stats.norm()

    def t_from_uniform(self, u: Tensor) -> Tensor:
        """Inverse-CDF map of ``u`` in [0, 1] ``[n]`` to ``t`` in ``[t', T]`` ``[n]`` (float32,
        on u's device): ``ln t = P_mean + P_std F^-1(F(a) + u (F(b) - F(a)))`` with the
        standardised bounds ``a, b`` of ``ln t'``, ``ln T`` (NVlabs/TCM ``misc.truncated_t``)."""
        law = self._law()
        lo = (np.log(self.transition_t) - self.P_mean) / self.P_std
        hi = (np.log(self.sigma_max) - self.P_mean) / self.P_std
        f_lo, f_hi = law.cdf(lo), law.cdf(hi)
        p = f_lo + u.detach().double().cpu().numpy() * (f_hi - f_lo)
        log_t = self.P_mean + self.P_std * law.ppf(p)
        t = np.clip(np.exp(log_t), self.transition_t, self.sigma_max)
        return torch.from_numpy(t).to(device=u.device, dtype=torch.float32)

    def sample_t(self, n: int, device: torch.device) -> Tensor:
        """``n`` draws of the truncated law, ``[n]`` float32."""
        return self.t_from_uniform(torch.rand(n, device=device, dtype=torch.float64))

    def boundary_mask(self, n: int, device: torch.device) -> Tensor:
        """Exactly ``int(n boundary_prob)`` rows of ``n`` at random, ``[n]`` bool."""
        picked = torch.randperm(n, device=device)[: int(n * self.boundary_prob)]
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[picked] = True
        return mask

    # ------------------------------------------------------------------ objective
    def __call__(
        self,
        student: ConsistencyFn,
        stage1: ConsistencyFn,
        images: Tensor,
        class_labels: Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> TCMLossOutput:
        """Args:
            student: f_theta (gradients at t; no gradients at r). stage1: the frozen stage-1
                model. images: ``[B,C,H,W]`` clean data. shard: ``(rank, world_size)``: the
                levels, the boundary rows and the noise are drawn for the global batch and
                sliced, so a DDP step equals the global-batch step.
        Returns: :class:`TCMLossOutput`.
        """
        b, dev = images.shape[0], images.device
        world = shard[1]
        t = global_draw(lambda n: self.sample_t(n, dev), b, shard)
        edge = global_draw(lambda n: self.boundary_mask(n, dev), b, shard)
        t = torch.where(edge, torch.full_like(t, self.transition_t), t)
        r = self.t_to_r(t)
        noise = global_draw(
            lambda n: torch.randn((n, *images.shape[1:]), device=dev, dtype=images.dtype), b, shard
        )
        t4 = append_dims(t, images.ndim).to(images.dtype)
        r4 = append_dims(r, images.ndim).to(images.dtype)
        x_t, x_r = images + t4 * noise, images + r4 * noise
        keep = append_dims(r > 0, images.ndim)
        f = split_function(student, stage1, self.transition_t)
        with replay_rng(dev) as replay:
            with torch.no_grad(), replay():
                if bool(keep.any()):
                    r_safe = torch.where(r > 0, r, t)  # r = 0 rows take the data
                    tgt = torch.where(keep, torch.nan_to_num(f(x_r, r_safe, class_labels)), images)
                else:
                    tgt = images
            pred = student(x_t, t, class_labels)
        raw = self.weighting(t, r) * self.metric(pred, tgt.detach())
        total = b * world  # the global batch
        n_edge = int(total * self.boundary_prob)
        scale = torch.where(
            edge,
            torch.full_like(raw, self.w_boundary * total / max(n_edge, 1)),
            torch.full_like(raw, total / (total - n_edge)),
        )
        return TCMLossOutput(loss=raw * scale, sigma=t, sigma_next=r, boundary=edge, raw=raw)
