"""Consistency-model sampling (CM paper Alg. 1) and per-seed noise.

Samplers are plain functions over a consistency function ``f(x, sigma, class_labels)`` and
an explicit descending list of noise levels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NoiseFn = Callable[[Tensor], Tensor]


class SeededNoise:
    """One torch.Generator per image, so a seed gives the same image whatever the batch
    size or split (EDM's StackedRandomGenerator idea).

    Args:
        seeds: one integer per image in the batch.
        device: where the noise is returned; it is always drawn by CPU generators, so a seed
            gives the same image on every device (a CUDA generator draws other numbers).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator().manual_seed(int(s) % (1 << 63)) for s in seeds]
        self.device = torch.device(device)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """``[len(seeds), *shape]`` standard normal noise."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators]
        ).to(self.device)

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} but {len(self.generators)} seeds")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)


def check_sigmas(sigmas: Sequence[float] | Tensor, sigma_min: float) -> list[float]:
    """The noise levels of a multistep sampler or editor as floats: at least one, strictly
    descending, none below ``sigma_min``; otherwise a ValueError naming ``sigmas``."""
    sig = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if not sig:
        raise ValueError("sigmas must hold at least one noise level")
    if any(b >= a for a, b in zip(sig, sig[1:])):
        raise ValueError(f"sigmas must be strictly descending, got {sig}")
    if sig[-1] < sigma_min:
        raise ValueError(f"every sigma must be >= sigma_min={sigma_min}, got {sig[-1]}")
    return sig


@torch.no_grad()
def sample_onestep(
    consistency_fn: Callable[..., Tensor],
    z: Tensor,
    sigma_max: float = 80.0,
    class_labels: Tensor | None = None,
) -> Tensor:
    """One-step generation ``x = f(T z, T)`` (CM paper Sec. 3). ``z``: ``[B,C,H,W]`` ~ N(0, I)."""
    return consistency_fn(sigma_max * z, sigma_max, class_labels)


@torch.no_grad()
def sample_multistep(
    consistency_fn: Callable[..., Tensor],
    z: Tensor,
    sigmas: Sequence[float] | Tensor,
    sigma_min: float = 0.002,
    class_labels: Tensor | None = None,
    noise: NoiseFn | None = None,
    clip_denoised: bool = True,
    clip_output: bool | None = None,
) -> Tensor:
    """Multistep consistency sampling (CM paper Alg. 1).

    ``x = f(sigmas[0] z, sigmas[0])``; then for each later tau in ``sigmas``:
    ``x = f(x + sqrt(tau^2 - eps^2) z', tau)``. NFE = len(sigmas). CIFAR-10 CD 2-step uses
    ``sigmas = [80, 0.585]`` (grid index 11 of N = 18, found by the paper's greedy search).

    Args:
        z: ``[B,C,H,W]`` initial standard normal noise.
        sigmas: descending noise levels, ``sigmas[0]`` = T, all > sigma_min.
        noise: draws the re-noising z' like its argument (default ``torch.randn_like``; pass
            ``SeededNoise(...).randn_like`` for per-seed determinism).
        clip_denoised: clamp each f output to [-1, 1] before re-noising (the CM paper's code;
            ECT's and FastGen's samplers do not).
        clip_output: clamp the result to [-1, 1] (None: as ``clip_denoised``).
    """
    sig = check_sigmas(sigmas, sigma_min)
    noise = noise or torch.randn_like
    x = consistency_fn(sig[0] * z, sig[0], class_labels)
    for tau in sig[1:]:
        if clip_denoised:
            x = x.clamp(-1, 1)
        x = x + (tau**2 - sigma_min**2) ** 0.5 * noise(x)
        x = consistency_fn(x, tau, class_labels)
    return x.clamp(-1, 1) if (clip_denoised if clip_output is None else clip_output) else x
