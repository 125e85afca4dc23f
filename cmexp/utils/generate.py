"""Batched, seeded generation from a loaded checkpoint and the files it is written to.

Image ``i`` of a request always uses seed ``seed + i`` (one generator per image), so the same
seeds give the same images whatever the batch size, device split or ``num_samples``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cmexp.diffusion.karras import append_zero, karras_sigmas
from cmexp.diffusion.sampling import SeededNoise, sample_multistep
from cmexp.diffusion.solvers import sample_euler, sample_heun
from cmexp.utils.checkpoint import LoadedModel
from cmexp.utils.images import image_grid, save_png, to_uint8


def consistency_sigmas(
    loaded: LoadedModel,
    steps: int,
    taus: Sequence[float] | None = None,
    tau_indices: Sequence[int] | None = None,
    grid_num_scales: int = 18,
    rho: float = 7.0,
) -> list[float]:
    """The descending noise levels ``[T, tau_1, ..., tau_{steps-1}]`` of Alg. 1.

    Precedence: explicit ``taus``; else ``tau_indices`` into the Karras grid of
    ``grid_num_scales`` levels (index 0 = T; CIFAR-10 CD 2-step: index 11 of 18 = 0.585);
    else the run's ``model.sample_sigmas`` when it has enough; else evenly spaced grid
    indices ``j * (N // steps)`` (diffusers' default spacing).
    """
    m = loaded.model
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if taus is not None and tau_indices is not None:
        raise ValueError("give either taus or tau_indices, not both")
    if taus is not None:
        mids = [float(t) for t in taus]
        src = "taus"
    elif tau_indices is not None:
        grid = karras_sigmas(grid_num_scales, m.sigma_min, m.sigma_max, rho, dtype=torch.float64)
        for j in tau_indices:
            if not 0 < int(j) < grid_num_scales:
                raise ValueError(f"tau_indices entries must be in [1, {grid_num_scales - 1}] (grid_num_scales={grid_num_scales}), got {j}")
        mids = [float(grid[int(j)]) for j in tau_indices]
        src = "tau_indices"
    else:
        stored = [float(s) for s in (loaded.model_config("sample_sigmas") or [])]
        if len(stored) >= steps - 1:
            mids = stored[: steps - 1]
        else:
            grid = karras_sigmas(grid_num_scales, m.sigma_min, m.sigma_max, rho, dtype=torch.float64)
            mids = [float(grid[j * (grid_num_scales // steps)]) for j in range(1, steps)]
        src = "default"
    if len(mids) != steps - 1:
        raise ValueError(f"steps={steps} needs {steps - 1} intermediate noise levels, got {len(mids)} from {src}")
    sig = [float(m.sigma_max), *mids]
    if any(b >= a for a, b in zip(sig, sig[1:])) or sig[-1] <= m.sigma_min:
        raise ValueError(f"{src} must be descending and lie in (sigma_min={m.sigma_min}, sigma_max={m.sigma_max}), got {mids}")
    return sig


def teacher_sigmas(loaded: LoadedModel, num_scales: int = 18, rho: float = 7.0) -> Tensor:
    """EDM sampler grid: ``num_scales`` Karras levels and a final 0 (Heun NFE = 2N - 1)."""
    m = loaded.model
    return append_zero(karras_sigmas(num_scales, m.sigma_min, m.sigma_max, rho))


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    num_samples: int,
    sigmas: Sequence[float] | Tensor,
    seed: int = 0,
    batch_size: int = 256,
    sampler: str = "consistency",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """``[num_samples,C,H,W]`` images in [-1,1].

    Args:
        sigmas: consistency models: ``[T, tau_1, ...]`` (:func:`consistency_sigmas`);
            EDM: the solver grid ending in 0 (:func:`teacher_sigmas`).
        sampler: "consistency" (Alg. 1), or "heun"/"euler" for an EDM denoiser.
    """
    m = loaded.model.to(device)
    if loaded.is_consistency != (sampler == "consistency"):
        raise ValueError(
            f"sampler={sampler} does not fit a '{loaded.kind}' checkpoint "
            f"(use {'consistency' if loaded.is_consistency else 'heun or euler'})"
        )
    solvers = {"heun": sample_heun, "euler": sample_euler}
    if sampler != "consistency" and sampler not in solvers:
        raise ValueError(f"sampler must be heun or euler for an EDM checkpoint, got {sampler!r}")
    shape = (m.img_channels, m.img_resolution, m.img_resolution)
    out = []
    starts = range(0, num_samples, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, total=math.ceil(num_samples / batch_size), desc="sampling", unit="batch")
    for start in starts:
        n = min(batch_size, num_samples - start)
        noise = SeededNoise(range(seed + start, seed + start + n), device)
        z = noise.randn(shape)
        if sampler == "consistency":
            x = sample_multistep(m, z, sigmas, m.sigma_min, noise=noise.randn_like)
        else:
            sig = torch.as_tensor(sigmas, dtype=torch.float32, device=device)
            x = solvers[sampler](m, z * sig[0], sig).clamp(-1, 1)
        out.append(x.cpu())
    return torch.cat(out)


def nfe(sigmas: Sequence[float] | Tensor, sampler: str) -> int:
    """Network evaluations: one per level for Alg. 1; Heun 2N - 1, Euler N on an N + 1 grid."""
    n = len(sigmas)
    return {"consistency": n, "heun": 2 * (n - 1) - 1, "euler": n - 1}[sampler]


def save_samples(images: Tensor, out_dir: str | Path, grid_size: int = 64, name: str = "samples") -> dict[str, str]:
    """Write ``<name>.npz`` (``arr_0``: uint8 ``[N,H,W,C]``, the OpenAI evaluator
    convention) and a PNG grid of the first ``grid_size`` images. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / f"{name}.npz"
    np.savez(npz, arr_0=to_uint8(images).numpy())
    png = save_png(image_grid(images[:grid_size]), out / f"{name}_grid.png", scale=2)
    return {"npz": str(npz), "grid": str(png)}
