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

from cmexp.diffusion.samplers import sample_ddim, sample_ddpm, sample_edm_sde
from cmexp.diffusion.sampling import SeededNoise, sample_multistep
from cmexp.diffusion.solvers import sample_euler, sample_heun
from cmexp.inference.loader import LoadedModel
from cmexp.inference.plan import check_sampler
from cmexp.utils.images import image_grid, save_png, to_uint8

#: Options of the stochastic samplers (command-line keys of cmexp.sample / cmexp.eval).
SAMPLER_OPTIONS = {"ddim": ("eta",), "edm_sde": ("s_churn", "s_tmin", "s_tmax", "s_noise")}


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
        k: float(values[k]) for k in SAMPLER_OPTIONS.get(sampler, ()) if values.get(k) is not None
    }


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
    options: dict[str, float] | None = None,
    class_labels: Sequence[int] | None = None,
    guidance: float | None = None,
) -> Tensor:
    """``[num_samples,C,H,W]`` images in [-1,1]. A latent model (``loaded.latent``) samples
    latents ``[num_samples,z,h,w]`` (never clamped: they are not in [-1, 1]) and decodes them.

    Args:
        sigmas: the plan of :func:`cmexp.inference.plan.sigma_plan` / ``solver_plan``:
            consistency models ``[T, tau_1, ...]``; diffusion models the solver grid (ending in
            0, or at sigma_min for a PD plan; ``sigmas[0]`` = inf for a zero-SNR VP model).
        sampler: "consistency" (Alg. 1), or for a denoiser one of
            :data:`cmexp.inference.plan.DIFFUSION_SAMPLERS`.
        options: the sampler's options (DDIM ``eta``; EDM-SDE ``s_churn``, ``s_tmin``,
            ``s_tmax``, ``s_noise``). Fresh noise of stochastic samplers comes from image i's
            own generator, like its initial noise.
        class_labels: a class-conditional model's labels, image i ``class_labels[i % len]``;
            None: one label per image from its seed (:mod:`cmexp.inference.conditional`).
        guidance: the guidance scale w (conditional diffusion models: classifier-free
            guidance; guided CD students: their w input, default the recorded scale).
    """
    from cmexp.inference.conditional import check_guidance, conditioned_model, sample_labels

    loaded.model.to(device)
    m, _ = conditioned_model(loaded, check_guidance(loaded, guidance))
    if loaded.is_consistency != (sampler == "consistency"):
        raise ValueError(
            f"sampler={sampler} does not fit a '{loaded.kind}' checkpoint "
            f"(use {'consistency' if loaded.is_consistency else 'a diffusion sampler'})"
        )
    sampler = check_sampler(sampler, loaded.spec)
    options = dict(options or {})
    solvers = {
        "heun": sample_heun,
        "euler": sample_euler,
        "ddim": sample_ddim,
        "ddpm": sample_ddpm,
        "edm_sde": sample_edm_sde,
    }
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
        clip = loaded.latent is None
        if sampler == "consistency":
            x = sample_multistep(
                m,
                z,
                sigmas,
                loaded.spec.sigma_min,
                class_labels=labels,
                noise=noise.randn_like,
                clip_denoised=clip,
            )
        else:
            sig = torch.as_tensor(sigmas, dtype=torch.float32, device=device)
            x0 = z if torch.isinf(sig[0]) else z * sig[0]  # zero terminal SNR: the VP state z
            kwargs = dict(options)
            if sampler in ("ddim", "ddpm", "edm_sde"):
                kwargs["noise"] = noise.randn_like
            x = solvers[sampler](m, x0, sig, class_labels=labels, **kwargs)
            x = x.clamp(-1, 1) if clip else x
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
