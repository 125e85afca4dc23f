"""The editing tasks of ``python -m cmexp.edit task=NAME`` (CM paper Alg. 4, App. D).

Each task is a small class built from ``conf/task/<name>.yaml`` and called with a consistency
function, real images and per-image noise; it returns the rows of the result grid. The
algorithms themselves are the plain functions of :mod:`cmexp.diffusion.editing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from cmexp.diffusion import editing as E
from cmexp.diffusion.sampling import SeededNoise
from cmexp.inference.plan import SamplingSpec, check_plan, sigma_plan


@dataclass
class EditContext:
    """What every task gets: ``f`` (consistency function), ``images`` ``[B,C,H,W]`` in [-1,1]
    (ground truth), per-image ``noise``, the model's sampling settings ``spec`` (sigma range,
    rho; ``LoadedModel.spec``) and the base ``seed``. ``latent``: a latent model's codec
    (``LoadedModel.latent``; ``f`` then works on latents, ``images`` stay images): only the
    tasks with ``latent_space = True`` (interpolate, stroke) accept it."""

    f: E.ConsistencyFn
    images: Tensor
    noise: SeededNoise
    spec: SamplingSpec
    seed: int = 0
    latent: Any = None

    @property
    def sigma_min(self) -> float:
        return self.spec.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.spec.sigma_max


@dataclass
class EditOutput:
    """``rows``: named ``[B,C,H,W]`` image rows for the grid (in order); ``restoration``: whether
    PSNR/SSIM/LPIPS against the ground truth are meaningful; ``info``: task settings."""

    rows: dict[str, Tensor]
    restoration: bool = True
    info: dict = field(default_factory=dict)


def _edit_sigmas(ctx: EditContext, sigmas: Sequence[float] | None, num_scales: int) -> list[float]:
    """``task.sigmas`` when given (checked against the model's range), else every level of a
    ``num_scales``-level Karras grid with the model's sigma range and rho."""
    if sigmas is not None:
        return check_plan(sigmas, ctx.spec, key="task.sigmas")
    return sigma_plan(
        replace(ctx.spec, num_scales=num_scales),
        steps=num_scales,
        tau_indices=range(1, num_scales),
    )


def _check_factor(factor: int, images: Tensor) -> None:
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"task.factor={factor} must divide the image size {h}x{w}")


def _show_mask(y: Tensor, mask: Tensor) -> Tensor:
    """The masked input as shown in grids: unknown pixels grey (0)."""
    return torch.where(mask.bool().expand_as(y), torch.zeros_like(y), y)


class Inpaint:
    """Fill masked pixels. ``mask``: "center" (central square, side ``mask_size`` or H/2),
    "boxes" (random rectangles per image, from the seed) or a path to a mask image (white =
    fill). ``sigmas``: t_1 > ... > t_N, default all ``num_scales`` Karras levels (the JX
    notebook's ``ts = 0..17`` for N = 18)."""

    def __init__(
        self,
        mask: str = "center",
        mask_size: int | None = None,
        num_boxes: int = 3,
        sigmas: Sequence[float] | None = None,
        num_scales: int = 18,
    ) -> None:
        self.mask, self.mask_size, self.num_boxes = str(mask), mask_size, int(num_boxes)
        self.sigmas, self.num_scales = sigmas, int(num_scales)

    def make_mask(self, images: Tensor, seed: int) -> Tensor:
        if self.mask == "center":
            side = min(images.shape[-2:])
            if self.mask_size is not None and not 0 < self.mask_size <= side:
                raise ValueError(
                    f"task.mask_size must be in [1, {side}] (the image side), got {self.mask_size}"
                )
            return E.center_square_mask(images.shape, self.mask_size)
        if self.mask == "boxes":
            return E.random_boxes_mask(images.shape[0], images.shape, self.num_boxes, seed=seed)
        return E.mask_from_image(self.mask, images.shape)

    def __call__(self, ctx: EditContext) -> EditOutput:
        y = ctx.images
        mask = self.make_mask(y, ctx.seed).to(y)
        sig = _edit_sigmas(ctx, self.sigmas, self.num_scales)
        out = E.inpaint(ctx.f, y, mask, sig, ctx.sigma_min, ctx.noise.randn_like)
        return EditOutput(
            {"before": y, "input": _show_mask(y, mask), "result": out, "ground_truth": y},
            info={"mask": self.mask, "sigmas": sig},
        )


class Colorize:
    """Generate chroma for the luma of RGB images (the paper's orthogonal luma basis)."""

    def __init__(self, sigmas: Sequence[float] | None = None, num_scales: int = 18) -> None:
        self.sigmas, self.num_scales = sigmas, int(num_scales)

    def __call__(self, ctx: EditContext) -> EditOutput:
        y = ctx.images
        if y.shape[1] != 3:
            raise ValueError(
                f"task=colorize needs a 3-channel model and dataset, got {y.shape[1]} channel(s); "
                "Fashion-MNIST is grey: use a CIFAR-10/imagefolder checkpoint"
            )
        sig = _edit_sigmas(ctx, self.sigmas, self.num_scales)
        out = E.colorize(ctx.f, y, sig, ctx.sigma_min, ctx.noise.randn_like)
        luma = (torch.tensor(E.LUMA_WEIGHTS).to(y)[None, :, None, None] * y).sum(1, keepdim=True)
        return EditOutput(
            {"before": y, "input": luma.expand_as(y), "result": out, "ground_truth": y},
            info={"sigmas": sig},
        )


class SuperRes:
    """Generate the detail of each ``factor x factor`` patch, keeping its mean."""

    def __init__(
        self, factor: int = 2, sigmas: Sequence[float] | None = None, num_scales: int = 18
    ) -> None:
        self.factor, self.sigmas, self.num_scales = int(factor), sigmas, int(num_scales)

    def __call__(self, ctx: EditContext) -> EditOutput:
        y = ctx.images
        _check_factor(self.factor, y)
        low = E.downsample(y, self.factor)
        sig = _edit_sigmas(ctx, self.sigmas, self.num_scales)
        out = E.superres(ctx.f, low, self.factor, sig, ctx.sigma_min, ctx.noise.randn_like)
        return EditOutput(
            {"before": y, "input": low, "result": out, "ground_truth": y},
            info={"factor": self.factor, "sigmas": sig},
        )


class Denoise:
    """Remove Gaussian noise of std ``sigma`` (drawn from the seeds) in one step."""

    def __init__(self, sigma: float = 0.3) -> None:
        self.sigma = float(sigma)

    def __call__(self, ctx: EditContext) -> EditOutput:
        if not ctx.sigma_min <= self.sigma <= ctx.sigma_max:
            raise ValueError(
                f"task.sigma must be in [{ctx.sigma_min}, {ctx.sigma_max}], got {self.sigma}"
            )
        y = ctx.images
        noisy = y + self.sigma * ctx.noise.randn_like(y)
        out = E.denoise(ctx.f, noisy, self.sigma)
        return EditOutput(
            {"before": y, "input": noisy.clamp(-1, 1), "result": out, "ground_truth": y},
            info={"sigma": self.sigma},
        )


class Stroke:
    """Stroke-guided generation (SDEdit-style) from coarse colour strokes made from the real
    images (patch means quantised to ``levels`` values), t = (5.38, 2.24) by default. Latent
    models start from the encoded strokes and decode the result (latent SDEdit; the sigmas are
    then in latent units)."""

    latent_space = True

    def __init__(
        self, sigmas: Sequence[float] = (5.38, 2.24), factor: int = 4, levels: int = 4
    ) -> None:
        self.sigmas, self.factor, self.levels = (
            [float(s) for s in sigmas],
            int(factor),
            int(levels),
        )

    def __call__(self, ctx: EditContext) -> EditOutput:
        y = ctx.images
        _check_factor(self.factor, y)
        strokes = E.coarse_strokes(y, self.factor, self.levels)
        sig = check_plan(self.sigmas, ctx.spec, key="task.sigmas")
        if ctx.latent is None:
            out = E.stroke(ctx.f, strokes, sig, ctx.sigma_min, ctx.noise.randn_like)
        else:  # in latent space, never clamped to [-1, 1]
            z = ctx.latent.encode(strokes)
            out = E.edit(
                ctx.f,
                z,
                E.IdentityTransform(),
                torch.ones_like(z[:1, :1]),
                sig,
                ctx.sigma_min,
                ctx.noise.randn_like,
                start=z,
                clip_denoised=False,
            )
            out = ctx.latent.decode(out).clamp(-1, 1)
        return EditOutput(
            {"before": y, "input": strokes, "result": out, "ground_truth": y},
            restoration=False,
            info={"sigmas": self.sigmas, "factor": self.factor},
        )


class Interpolate:
    """One-step samples along the slerp between latent pairs: image pair (2i, 2i+1) of the
    seeds gives strip i of ``num`` images (endpoints included). Latent models slerp between
    noise of the latent shape and decode each one-step sample."""

    latent_space = True

    def __init__(self, num: int = 8) -> None:
        self.num = int(num)

    def __call__(self, ctx: EditContext) -> EditOutput:
        b, c, h, w = ctx.images.shape
        f = ctx.f
        if (
            ctx.latent is not None
        ):  # noise of the latent shape; each one-step sample decoded (then clamped)
            c, h, w = ctx.latent.channels, ctx.latent.resolution, ctx.latent.resolution
            f = _decoded(ctx.f, ctx.latent)
        z = ctx.noise.randn((c, h, w)).to(ctx.images)
        pairs = max(1, b // 2)
        strips = {}
        for i in range(pairs):
            z1, z2 = z[(2 * i) % b], z[(2 * i + 1) % b]
            strips[f"pair{i}"] = E.interpolate(f, z1, z2, self.num, ctx.sigma_max)
        return EditOutput(strips, restoration=False, info={"num": self.num, "pairs": pairs})


def _decoded(f: E.ConsistencyFn, codec: Any) -> E.ConsistencyFn:
    """``f`` followed by the codec's decoder: one-step latent samples as images."""

    def g(x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        return codec.decode(f(x, sigma, class_labels))

    return g


def check_latent_task(task: Any, name: str, ckpt: str) -> None:
    """Editing a latent model: only tasks that work in latent space (``latent_space = True``:
    interpolate, stroke). Inpainting, colorization, super-resolution and denoising constrain
    pixels (masks, luma, patch means, pixel noise), which have no counterpart in the latents:
    a ValueError naming ``task``."""
    if not getattr(task, "latent_space", False):
        raise ValueError(
            f"task={name} edits pixels (a mask, luma, patch means or pixel noise) but ckpt={ckpt} is a latent-space "
            "model; latent models support task=interpolate and task=stroke"
        )
