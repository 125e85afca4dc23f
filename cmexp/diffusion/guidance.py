"""Classifier-free guidance (Ho & Salimans 2022) for every sampler and for guided consistency
distillation.

Convention (the guidance *scale* w): ``D_w = D_uncond + w (D_cond - D_uncond)``, so w = 1 is
the plain conditional denoiser, w = 0 the unconditional one and w > 1 guides (Ho & Salimans
write ``(1 + w') eps_c - w' eps_u``: their w' is w - 1). The unconditional pass uses the null
label (index ``label_dim`` of the nets' label embedding), which the teacher learns through label
dropout (:func:`drop_labels`, p = 0.1 by default; Ho & Salimans use 0.1 or 0.2).

Guided consistency distillation (Luo et al. 2023, LCM Eq. 9; Meng et al. 2023, guided
distillation): the teacher's ODE step uses ``D_w`` with w drawn per sample from a range
(:class:`GuidanceRange`), the student takes w as an input (:class:`ScaleConditioned`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cmexp.diffusion.karras import append_dims, as_sigma_batch

#: Network passes per denoiser evaluation with guidance (conditional + unconditional).
GUIDED_PASSES = 2


def _label_dim(model: Any) -> int:
    return int(getattr(model, "label_dim", 0) or 0)


class GuidedDenoiser(nn.Module):
    """``D_w(x, sigma, c) = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null))``.

    Both passes run as one batch of 2B (the NFE of a guided sampler counts 2 network passes per
    evaluation: :data:`GUIDED_PASSES`). Any sampler or solver step takes it as its denoiser.

    Args:
        denoiser: a conditional denoiser ``D(x, sigma, class_labels)`` with ``label_dim`` > 0
            classes (the null label is ``label_dim``), e.g. an :class:`EDMPrecond` teacher.
        scale: w, a number or ``[B]`` per sample.
        label_dim: the null label index (default: ``denoiser.label_dim``).

    Shapes: x ``[B,C,H,W]``; sigma scalar or ``[B]``; class_labels int ``[B]`` (required).
    """

    def __init__(
        self, denoiser: Callable[..., Tensor], scale: float | Tensor, label_dim: int | None = None
    ) -> None:
        super().__init__()
        self.label_dim = _label_dim(denoiser) if label_dim is None else int(label_dim)
        if self.label_dim < 1:
            raise ValueError(
                "guidance needs a class-conditional denoiser (label_dim >= 1), got label_dim=0"
            )
        self._denoiser = [denoiser]  # not a submodule: the wrapper holds no weights of its own
        self.scale = scale
        for name in ("sigma_min", "sigma_max", "sigma_data", "img_resolution", "img_channels"):
            if hasattr(denoiser, name):
                setattr(self, name, getattr(denoiser, name))

    @property
    def denoiser(self) -> Callable[..., Tensor]:
        return self._denoiser[0]

    def forward(
        self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None
    ) -> Tensor:
        if class_labels is None:
            raise ValueError("a guided denoiser needs class_labels (the conditional pass)")
        b = x.shape[0]
        sig = as_sigma_batch(sigma, x)
        null = torch.full_like(class_labels, self.label_dim)
        both = self.denoiser(
            torch.cat([x, x]), torch.cat([sig, sig]), torch.cat([class_labels, null])
        )
        cond, uncond = both[:b], both[b:]
        w = torch.as_tensor(self.scale, device=x.device, dtype=cond.dtype)
        w = append_dims(w.reshape(-1), x.ndim) if w.ndim else w
        return uncond + w * (cond - uncond)


class ScaleConditioned(nn.Module):
    """A w-conditioned model (a guided CD student) with w fixed: ``f(x, sigma, c) =
    model(x, sigma, c, guidance=w)``, so Alg. 1 and the editors take it as they are."""

    def __init__(self, model: nn.Module, scale: float | Tensor) -> None:
        super().__init__()
        self.model, self.scale = model, scale
        for name in (
            "sigma_min",
            "sigma_max",
            "sigma_data",
            "img_resolution",
            "img_channels",
            "label_dim",
        ):
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    def forward(
        self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None
    ) -> Tensor:
        return self.model(x, sigma, class_labels, guidance=self.scale)


class GuidanceRange:
    """Per-sample guidance scales ``w ~ U[w_min, w_max]`` for guided CD (LCM: w in [2, 14]
    in Ho & Salimans' convention, i.e. [3, 15] here; Meng et al. sample w in [0, 4] of theirs).

    Args:
        w_min, w_max: the range, ``0 <= w_min <= w_max`` (equal: one fixed scale).
        sample: the scale of in-training sample grids and the checkpoint's default for
            ``cmexp.sample`` (inside the range).
    """

    def __init__(self, w_min: float = 1.0, w_max: float = 4.0, sample: float = 2.0) -> None:
        if not 0 <= w_min <= w_max:
            raise ValueError(
                f"model.loss.guidance needs 0 <= w_min <= w_max, got w_min={w_min}, w_max={w_max}"
            )
        if not w_min <= sample <= w_max:
            raise ValueError(
                f"model.loss.guidance.sample={sample} must lie in [w_min={w_min}, w_max={w_max}]"
            )
        self.w_min, self.w_max, self.sample = float(w_min), float(w_max), float(sample)

    def __call__(self, n: int, device: torch.device) -> Tensor:
        """``[n]`` scales (from the global torch RNG; draw through ``global_draw`` for DDP)."""
        return self.w_min + (self.w_max - self.w_min) * torch.rand(n, device=device)

    def describe(self) -> dict[str, float]:
        """What a checkpoint records (``checkpoint["cmexp"]["guidance"]``)."""
        return {"w_min": self.w_min, "w_max": self.w_max, "sample": self.sample}


def drop_labels(labels: Tensor, p: float, label_dim: int, keep: Tensor) -> Tensor:
    """Label dropout for classifier-free guidance training (Ho & Salimans 2022, Alg. 1):
    labels where ``keep >= p`` stay, the others become the null label ``label_dim``.

    Args:
        labels: int ``[B]``. keep: uniform ``[B]`` in [0, 1) (drawn for the global batch).
        p: dropout probability (``model.label_dropout``; 0.1 by default).
    """
    if not 0 <= p < 1:
        raise ValueError(f"model.label_dropout must be in [0, 1), got {p}")
    return torch.where(keep < p, torch.full_like(labels, label_dim), labels)


def seeded_labels(seeds: range | list[int], num_classes: int) -> Tensor:
    """One class label per image from its seed (``[len(seeds)]`` int64): a stream of its own
    (numpy's SeedSequence of ``(seed, 1)``), so labels and the image noise never share draws
    and a seed gives the same label whatever the batch size."""
    if num_classes < 1:
        raise ValueError(f"seeded_labels needs num_classes >= 1, got {num_classes}")
    return torch.tensor(
        [int(np.random.default_rng([int(s) % (1 << 63), 1]).integers(num_classes)) for s in seeds],
        dtype=torch.long,
    )
