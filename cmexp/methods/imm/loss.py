"""The IMM objective (Zhou, Ermon, Song 2025, Sec. 4 and App. D, Alg. 1), in sigma.

Per step the batch is split into groups of M particles; each group shares one triple
``s < r < t`` (FM time: ``t ~ U(eps, T)``, ``s ~ U(eps, t)``, ``r = r(s, t)``) and holds M
different images ``x^i`` with their own noise ``z^i``:

* ``x_t^i = x^i + sigma_t z^i`` and, by the DDIM interpolant with the same (x, x_t),
  ``x_r^i = x^i + sigma_r z^i`` (IMM's ``DDIM(x_t, x, r, t)``);
* ``y^i = f_theta(x_t^i, s, t)`` (with gradients) and ``yhat^i = f_theta-(x_r^i, s, r)``
  (``theta- = stopgrad theta``, on a replay of the RNG state so both passes see the same
  dropout masks);
* the group's loss is the squared MMD (V-statistic, IMM Eq. 12) of the two particle sets,

      w(s, t) / M^2 sum_ij [k(y^i, y^j) + k(yhat^i, yhat^j) - 2 k(y^i, yhat^j)],

  with the Laplace kernel ``k(x, y) = exp(-max(||x - y||_2, eps) / (|c_out(s, t)| D))``
  (D = C H W; c_out of the flow map's parameterisation, IMM Sec. 4 "kernel function"), the
  particles compared in IMM's FM units (``alpha_s x_sigma``);
* ``r(s, t) = max(s, eta^-1(eta(t) - (eta_max - eta_min) / 2^k))`` (IMM Sec. 4, "mapping
  function", the constant decrement in eta = sigma / sd): in sigma,
  ``sigma_r = max(sigma_s, sigma_t - (sigma_max - sigma_min) / 2^k)``;
* ``w(s, t) = 1/2 sigmoid(b - lambda_t) (-d lambda_t / dt) alpha_t^a / (alpha_t^2 + sigma_t^2)``
  (IMM Eq. 13; lambda_t = 2 ln((1 - t) / t) the FM log-SNR, so
  ``-d lambda / dt = 2 / (t (1 - t))``).

With M = 1 the loss is ``w (2 - 2 k(y, yhat))``: a single-particle, first-moment match, IMM's
reading of consistency training (IMM Sec. 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cmexp.diffusion.karras import append_dims
from cmexp.diffusion.rng import global_draw, replay_rng
from cmexp.methods.imm.precond import fm_time, sigma_of_fm_time, simple_edm_coefficients


@dataclass
class IMMLossOutput:
    """Per-sample loss ``[B]`` (each row holds its group's loss, so the batch mean is the mean
    over groups) and the levels it used, ``[B]`` each."""

    loss: Tensor
    sigma_t: Tensor
    sigma_s: Tensor
    sigma_r: Tensor


def laplace_kernel(x: Tensor, y: Tensor, bandwidth: Tensor, eps: float = 1e-8) -> Tensor:
    """``exp(-max(||x_i - y_j||, eps) / (bandwidth D))`` for every pair of a group.

    Args: x, y ``[G, M, D]``; bandwidth ``[G]`` (|c_out(s, t)|). Returns ``[G, M, M]``. The
    distance is clamped at ``eps`` (so the gradient at x_i = y_j is zero, not NaN).
    """
    d2 = (x[:, :, None, :] - y[:, None, :, :]).square().sum(-1)
    dist = d2.clamp_min(eps * eps).sqrt()
    return torch.exp(-dist / (bandwidth[:, None, None] * x.shape[-1]))


def mmd_squared(x: Tensor, y: Tensor, bandwidth: Tensor, eps: float = 1e-8) -> Tensor:
    """The V-statistic MMD^2 of each group's two particle sets (IMM Eq. 12 without w):
    ``mean_ij k(x_i, x_j) + k(y_i, y_j) - 2 k(x_i, y_j)``. x, y ``[G, M, D]`` -> ``[G]``;
    exactly 0 when x and y are the same set."""
    kxx = laplace_kernel(x, x, bandwidth, eps).mean((1, 2))
    kyy = laplace_kernel(y, y, bandwidth, eps).mean((1, 2))
    kxy = laplace_kernel(x, y, bandwidth, eps).mean((1, 2))
    return kxx + kyy - 2 * kxy


class IMMLoss:
    """IMM's objective (see the module docstring).

    Args:
        group_size: M, particles per (s, r, t) group (IMM: 4); must divide the batch.
        decrement_k: k of the mapping's decrement ``(sigma_max - sigma_min) / 2^k`` (15 here:
            not confirmed, docs/modes.md (IMM)).
        alpha_power: a of w(s, t) (1). logsnr_shift: b of w(s, t) (5).
        kernel_eps: the Laplace kernel's distance floor.
    """

    def __init__(
        self,
        group_size: int = 4,
        decrement_k: float = 15.0,
        alpha_power: float = 1.0,
        logsnr_shift: float = 5.0,
        kernel_eps: float = 1e-8,
    ) -> None:
        if int(group_size) != group_size or group_size < 1:
            raise ValueError(f"model.loss.group_size must be an integer >= 1, got {group_size!r}")
        if not decrement_k >= 0:
            raise ValueError(f"model.loss.decrement_k must be >= 0, got {decrement_k!r}")
        if not kernel_eps > 0:
            raise ValueError(f"model.loss.kernel_eps must be > 0, got {kernel_eps!r}")
        self.group_size = int(group_size)
        self.decrement_k = float(decrement_k)
        self.alpha_power, self.logsnr_shift = float(alpha_power), float(logsnr_shift)
        self.kernel_eps = float(kernel_eps)

    # ------------------------------------------------------------------ the pieces
    def mapping(
        self, sigma_t: Tensor, sigma_s: Tensor, sigma_min: float, sigma_max: float
    ) -> Tensor:
        """``sigma_r = max(sigma_s, sigma_t - (sigma_max - sigma_min) / 2^k)``. Any shape."""
        step = (sigma_max - sigma_min) / 2.0**self.decrement_k
        return torch.maximum(sigma_s, sigma_t - step)

    def weight(self, t: Tensor) -> Tensor:
        """``w(s, t)`` of FM time t (IMM Eq. 13): ``sigmoid(b - lambda_t) / (t (1 - t)) *
        (1 - t)^a / ((1 - t)^2 + t^2)``. Any shape."""
        a_t = 1 - t
        logsnr = 2 * (torch.log(a_t) - torch.log(t))
        dlogsnr = 2 / (t * a_t)  # -d lambda / dt
        return (
            0.5 * torch.sigmoid(self.logsnr_shift - logsnr) * dlogsnr
            * a_t**self.alpha_power / (a_t**2 + t**2)
        )  # fmt: skip

    def sample_times(
        self, groups: int, device: torch.device, model: nn.Module, shard: tuple[int, int] = (0, 1)
    ) -> tuple[Tensor, Tensor]:
        """``(sigma_t, sigma_s)`` ``[groups]`` float32: FM times ``t ~ U(eps, T)``,
        ``s ~ U(eps, t)`` (eps, T: the wrapper's sigma_min, sigma_max), drawn for the global
        batch's groups and sliced to this rank's."""
        sd = model.sigma_data
        lo = float(fm_time(torch.tensor(model.sigma_min, dtype=torch.float64), sd))
        hi = float(fm_time(torch.tensor(model.sigma_max, dtype=torch.float64), sd))
        u = global_draw(lambda n: torch.rand(n, 2, device=device), groups, shard)
        t = lo + (hi - lo) * u[:, 0]
        s = lo + (t - lo) * u[:, 1]
        return sigma_of_fm_time(t, sd), sigma_of_fm_time(s, sd).clamp_min(model.sigma_min)

    # ------------------------------------------------------------------ the loss
    def __call__(
        self,
        online: nn.Module,
        images: Tensor,
        class_labels: Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
        target: nn.Module | None = None,
    ) -> IMMLossOutput:
        """Args:
            online: the flow map f_theta (an :class:`IMMPrecond`, or anything with its call
                ``f(x, sigma_t, labels, sigma_next=sigma_s)`` and its sigma_min, sigma_max,
                sigma_data).
            images: ``[B,C,H,W]``, B a multiple of M; rows ``g M .. g M + M - 1`` are group g.
            shard: ``(rank, world_size)``: times and noise are drawn for the global batch and
                sliced, so a DDP step equals the single-process step (groups never straddle
                ranks: each rank's batch is whole groups).
            target: theta- (None: ``online`` without gradients, IMM's stop-gradient target).
        Returns: :class:`IMMLossOutput`.
        """
        b, m, dev = images.shape[0], self.group_size, images.device
        if b % m:
            raise ValueError(
                f"model.loss.group_size={m} must divide the batch of {b} images (dataset.batch_size)"
            )
        groups = b // m
        sig_t, sig_s = self.sample_times(groups, dev, online, shard)
        sig_r = self.mapping(sig_t, sig_s, online.sigma_min, online.sigma_max)
        rows = (sig_t.repeat_interleave(m), sig_s.repeat_interleave(m), sig_r.repeat_interleave(m))
        t_b, s_b, r_b = rows
        noise = global_draw(
            lambda n: torch.randn((n, *images.shape[1:]), device=dev, dtype=images.dtype), b, shard
        )
        x_t = images + append_dims(t_b, images.ndim).to(images.dtype) * noise
        x_r = images + append_dims(r_b, images.ndim).to(images.dtype) * noise
        tgt = online if target is None else target
        with replay_rng(dev) as replay:
            with torch.no_grad(), replay():
                y_hat = tgt(x_r, r_b, class_labels, sigma_next=s_b)
            y = online(x_t, t_b, class_labels, sigma_next=s_b)
        sd = online.sigma_data
        scale = append_dims(sd / (sd + s_b), images.ndim).to(y.dtype)  # alpha_s: FM units
        shape = (groups, m, math.prod(images.shape[1:]))
        y_fm = (scale * y).reshape(shape)
        y_hat_fm = (scale * y_hat.detach()).reshape(shape)
        t_fm, s_fm = fm_time(sig_t, sd), fm_time(sig_s, sd)
        bandwidth = simple_edm_coefficients(t_fm, s_fm, sd)[1].abs().clamp_min(1e-12)
        mmd = mmd_squared(y_fm.float(), y_hat_fm.float(), bandwidth.float(), self.kernel_eps)
        loss = self.weight(t_fm) * mmd
        return IMMLossOutput(loss=loss.repeat_interleave(m), sigma_t=t_b, sigma_s=s_b, sigma_r=r_b)
