"""Batched, seeded generation from a loaded model and the files it is written to.

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

from cmexp.diffusion.sampling import SeededNoise, sample_multistep
from cmexp.diffusion.solvers import sample_euler, sample_heun
from cmexp.inference.loader import LoadedModel
from cmexp.utils.images import image_grid, save_png, to_uint8


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
        sigmas: the plan of :func:`cmexp.inference.plan.sigma_plan`: consistency models
            ``[T, tau_1, ...]``; EDM the solver grid ending in 0.
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

        starts = tqdm(
            starts, total=math.ceil(num_samples / batch_size), desc="sampling", unit="batch"
        )
    for start in starts:
        n = min(batch_size, num_samples - start)
        noise = SeededNoise(range(seed + start, seed + start + n), device)
        z = noise.randn(shape)
        if sampler == "consistency":
            x = sample_multistep(m, z, sigmas, loaded.spec.sigma_min, noise=noise.randn_like)
        else:
            sig = torch.as_tensor(sigmas, dtype=torch.float32, device=device)
            x = solvers[sampler](m, z * sig[0], sig).clamp(-1, 1)
        out.append(x.cpu())
    return torch.cat(out)


def save_samples(
    images: Tensor, out_dir: str | Path, grid_size: int = 64, name: str = "samples"
) -> dict[str, str]:
    """Write ``<name>.npz`` (``arr_0``: uint8 ``[N,H,W,C]``, the OpenAI evaluator
    convention) and a PNG grid of the first ``grid_size`` images. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / f"{name}.npz"
    np.savez(npz, arr_0=to_uint8(images).numpy())
    png = save_png(image_grid(images[:grid_size]), out / f"{name}_grid.png", scale=2)
    return {"npz": str(npz), "grid": str(png)}
