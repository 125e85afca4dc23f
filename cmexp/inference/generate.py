"""Batched, seeded generation from a loaded model and the files it is written to.

Image ``i`` of a request always uses seed ``seed + i`` (one generator per image), so the same
seeds give the same images whatever the batch size, device split or ``num_samples``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cmexp import registry
from cmexp.diffusion.sampling import SeededNoise
from cmexp.inference.loader import LoadedModel
from cmexp.inference.plan import check_clip_denoised, check_sampler
from cmexp.utils.images import image_grid, save_png, to_uint8


def sampler_options(sampler: str, values: Any) -> dict[str, float]:
    """The options of ``sampler`` among the command line's ``values`` (null entries dropped),
    as floats. Every option given is checked, used or not: a ValueError names the key."""
    for key in ("eta", "s_churn", "s_tmin", "s_noise"):
        value = values.get(key)
        if value is not None and not float(value) >= 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    tmin, tmax = values.get("s_tmin"), values.get("s_tmax")
    if tmin is not None and tmax is not None and not float(tmax) >= float(tmin):
        raise ValueError(f"s_tmax must be >= s_tmin, got s_tmax={tmax} < s_tmin={tmin}")
    return {
        k: float(values[k]) for k in registry.sampler(sampler).options if values.get(k) is not None
    }


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    num_samples: int,
    sigmas: Sequence[float] | Tensor,
    seed: int = 0,
    batch_size: int = 256,
    sampler: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    options: dict[str, float] | None = None,
    class_labels: Sequence[int] | None = None,
    guidance: float | None = None,
    clip_denoised: bool | None = None,
) -> Tensor:
    """``[num_samples,C,H,W]`` images in [-1,1]. A latent model (``loaded.latent``) samples
    latents ``[num_samples,z,h,w]`` (never clamped: they are not in [-1, 1]) and decodes them.

    Args:
        sigmas: the plan of :func:`cmexp.inference.plan.sigma_plan` / ``solver_plan``:
            consistency models ``[T, tau_1, ...]``; diffusion models the solver grid (ending in
            0, or at sigma_min for a PD plan; ``sigmas[0]`` = inf for a zero-SNR VP model).
        sampler: a registered sampler of the model's family (``cmexp.registry``):
            "consistency" (Alg. 1) for consistency models, "heun", "euler", "ddim", "ddpm",
            "edm_sde" for denoisers; None: the model's own (``loaded.spec.sampler``).
        options: the sampler's options (DDIM ``eta``; EDM-SDE ``s_churn``, ``s_tmin``,
            ``s_tmax``, ``s_noise``). Fresh noise of stochastic samplers comes from image i's
            own generator, like its initial noise.
        class_labels: a class-conditional model's labels, image i ``class_labels[i % len]``;
            None: one label per image from its seed (:mod:`cmexp.inference.conditional`).
        guidance: the guidance scale w (conditional diffusion models: classifier-free
            guidance; guided CD students: their w input, default the recorded scale).
        clip_denoised: clamp to [-1, 1] each intermediate output of Alg. 1 before re-noising,
            or the denoiser's output in every solver step; None: the model's default
            (:func:`cmexp.inference.plan.check_clip_denoised`). The result of a pixel model
            is clamped to [-1, 1] either way.
    """
    from cmexp.inference.conditional import check_guidance, conditioned_model, sample_labels

    loaded.model.to(device)
    m, _ = conditioned_model(loaded, check_guidance(loaded, guidance))
    sampler = check_sampler(sampler, loaded.spec)
    run = registry.load(registry.sampler(sampler).run)
    options = dict(options or {})
    clip_denoised = check_clip_denoised(
        clip_denoised, loaded.spec, sampler, latent=loaded.latent is not None
    )
    if clip_denoised is not None:
        options["clip_denoised"] = clip_denoised
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
        labels = sample_labels(
            loaded, range(seed + start, seed + start + n), class_labels, offset=start
        )
        labels = labels.to(device) if labels is not None else None
        x = run(
            m,
            z,
            sigmas,
            sigma_min=loaded.spec.sigma_min,
            class_labels=labels,
            noise=noise.randn_like,
            clip=loaded.latent is None,  # latents are not in [-1, 1]: never clamped
            **options,
        )
        if loaded.latent is not None:
            x = loaded.latent.to(device).decode(x).clamp(-1, 1)
        out.append(x.cpu())
    return torch.cat(out)


def save_samples(
    images: Tensor,
    out_dir: str | Path,
    grid_size: int = 64,
    name: str = "samples",
    labels: Tensor | None = None,
) -> dict[str, str]:
    """Write ``<name>.npz`` (``arr_0``: uint8 ``[N,H,W,C]``, the OpenAI evaluator
    convention; ``arr_1``: int64 ``[N]`` class labels of a conditional model, as
    guided-diffusion's class-conditional samples) and a PNG grid of the first ``grid_size``
    images. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / f"{name}.npz"
    arrays = {"arr_0": to_uint8(images).numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy().astype(np.int64)
    np.savez(npz, **arrays)
    png = save_png(image_grid(images[:grid_size]), out / f"{name}_grid.png", scale=2)
    return {"npz": str(npz), "grid": str(png)}
