"""Zero-shot image editing with a consistency model (CM paper Alg. 4, App. D).

Every editor is a plain function over a consistency function ``f(x, sigma, class_labels)`` and
an explicit descending list of noise levels ``sigmas`` (t_1 > ... > t_N). The generic loop is
:func:`edit`: an invertible linear map ``A`` (here always orthogonal, so ``A^-1 = A^T``) and a
binary mask ``Omega`` in A's coordinates (1 = to be generated, 0 = known from the reference y)::

    y <- A^-1[(A y) (1 - Omega)]                # known part only
    x ~ N(y, t_1^2 I);  x <- f(x, t_1);  x <- A^-1[(A y)(1 - Omega) + (A x) Omega]
    for n = 2..N:  x ~ N(x, (t_n^2 - eps^2) I);  x <- f(x, t_n);  re-impose the known part

Transforms (reference.md 4): identity (inpainting, stroke edits), the orthogonal luma/chroma
basis of the paper's colorization (first column proportional to (0.2989, 0.5870, 0.1140)),
and the orthogonal patch basis of super-resolution (first column (1/p, ..., 1/p): the patch
mean). Images are ``[B,C,H,W]`` in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from cmexp.diffusion.sampling import NoiseFn, check_sigmas

ConsistencyFn = Callable[..., Tensor]

#: ITU-R BT.601 luma weights used by the paper's colorization basis (App. D).
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)


def orthogonal_basis(first: Sequence[float] | Tensor) -> Tensor:
    """An orthogonal ``[d,d]`` matrix whose first column is ``first / ||first||`` (QR
    decomposition, signs fixed so the diagonal of R is positive; CM paper App. D).

    ``orthogonal_basis(LUMA_WEIGHTS)`` reproduces the paper's colorization matrix
    ``[[0.4471, -0.8204, 0.3563], [0.8780, 0.4785, 0], [0.1705, -0.3129, -0.9343]]`` up to
    the signs of its last two columns (any signs give the same edit)."""
    v = torch.as_tensor(first, dtype=torch.float64).flatten()
    d = v.numel()
    if d < 1 or not torch.isfinite(v).all() or v.norm() == 0:
        raise ValueError(f"first must be a non-zero finite vector, got {first!r}")
    m = torch.eye(d, dtype=torch.float64)
    m[:, 0] = v
    q, r = torch.linalg.qr(m)
    q = q * torch.sign(torch.diagonal(r)).where(
        torch.diagonal(r) != 0, torch.ones(d, dtype=torch.float64)
    )
    return q


class IdentityTransform:
    """A = I (inpainting and stroke-guided generation)."""

    def forward(self, x: Tensor) -> Tensor:
        """``[B,C,H,W]`` -> the same tensor (A x)."""
        return x

    def inverse(self, coeffs: Tensor) -> Tensor:
        return coeffs


class ColorTransform:
    """Per-pixel RGB -> coordinates in an orthogonal basis Q whose first vector is the luma
    direction (CM paper App. D colorization). ``A x = Q^T x`` per pixel, ``[B,3,H,W]``."""

    def __init__(self, luma: Sequence[float] = LUMA_WEIGHTS) -> None:
        self.Q = orthogonal_basis(luma).float()  # [3, 3], columns = basis vectors

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.Q.shape[0]:
            raise ValueError(
                f"colorization needs {self.Q.shape[0]}-channel images, got {x.shape[1]} channels"
            )
        return torch.einsum("bchw,cd->bdhw", x, self.Q.to(x))

    def inverse(self, coeffs: Tensor) -> Tensor:
        return torch.einsum("bdhw,cd->bchw", coeffs, self.Q.to(coeffs))

    def mask(self, like: Tensor) -> Tensor:
        """Omega: generate the two chroma coordinates, keep luma. ``[1,3,1,1]``."""
        m = torch.ones(1, self.Q.shape[0], 1, 1, dtype=like.dtype, device=like.device)
        m[:, 0] = 0
        return m


class PatchTransform:
    """Non-overlapping ``p x p`` patches -> coefficients in an orthogonal basis Q
    (``[p^2, p^2]``) whose first column is ``(1/p, ..., 1/p)``: coefficient 0 is ``p`` times
    the patch mean (CM paper App. D super-resolution).

    ``forward``: ``[B,C,H,W]`` -> ``[B,C,p^2,H/p,W/p]``; ``inverse`` undoes it exactly.
    """

    def __init__(self, factor: int) -> None:
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor!r}")
        self.p = int(factor)
        self.Q = orthogonal_basis(torch.ones(self.p * self.p)).float()

    def _check(self, x: Tensor) -> None:
        h, w = x.shape[-2:]
        if h % self.p or w % self.p:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the super-resolution factor {self.p}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        b, c, h, w = x.shape
        p = self.p
        patches = (
            x.reshape(b, c, h // p, p, w // p, p)
            .permute(0, 1, 2, 4, 3, 5)
            .reshape(b, c, h // p, w // p, p * p)
        )
        coeffs = patches @ self.Q.to(x)  # [B,C,H/p,W/p,p^2]
        return coeffs.permute(0, 1, 4, 2, 3)

    def inverse(self, coeffs: Tensor) -> Tensor:
        b, c, _, hp, wp = coeffs.shape
        p = self.p
        patches = coeffs.permute(0, 1, 3, 4, 2) @ self.Q.to(coeffs).T  # [B,C,H/p,W/p,p^2]
        return (
            patches.reshape(b, c, hp, wp, p, p)
            .permute(0, 1, 2, 4, 3, 5)
            .reshape(b, c, hp * p, wp * p)
        )

    def mask(self, like: Tensor) -> Tensor:
        """Omega: keep coefficient 0 (the patch mean), generate the rest. ``[1,1,p^2,1,1]``."""
        m = torch.ones(1, 1, self.p * self.p, 1, 1, dtype=like.dtype, device=like.device)
        m[:, :, 0] = 0
        return m


Transform = IdentityTransform | ColorTransform | PatchTransform


@torch.no_grad()
def edit(
    consistency_fn: ConsistencyFn,
    y: Tensor,
    transform: Transform,
    mask: Tensor,
    sigmas: Sequence[float] | Tensor,
    sigma_min: float,
    noise: NoiseFn | None = None,
    class_labels: Tensor | None = None,
    clip_denoised: bool = True,
    start: Tensor | None = None,
) -> Tensor:
    """Algorithm 4 of the CM paper.

    Args:
        y: ``[B,C,H,W]`` reference image (only its known part ``(A y)(1 - mask)`` is used).
        transform: the orthogonal map A (``forward``/``inverse``).
        mask: Omega in A's coordinates, broadcastable to ``A(y)``; 1 = generate, 0 = keep.
        sigmas: descending t_1 > ... > t_N, all >= sigma_min.
        sigma_min: the model's eps (``LoadedModel.spec.sigma_min``; 0.002 in the paper).
        noise: draws standard normal noise like its argument (``SeededNoise(...).randn_like``
            for per-seed determinism; default ``torch.randn_like``).
        clip_denoised: clamp f's outputs to [-1, 1] before re-imposing (official code).
        start: the image that x ~ N(start, t_1^2 I) is centred on; default the known part of
            y (the paper). Stroke-guided editing passes the stroke image itself.
    Returns:
        ``[B,C,H,W]`` with ``A(out) (1 - mask) == A(y) (1 - mask)`` (up to float rounding of A).
    """
    sig = check_sigmas(sigmas, sigma_min)
    noise = noise or torch.randn_like
    ay = transform.forward(y)
    mask = mask.to(ay)
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must be binary (1 = generate, 0 = keep)")
    known = ay * (1 - mask)

    def impose(x: Tensor) -> Tensor:
        if clip_denoised:
            x = x.clamp(-1, 1)
        return transform.inverse(torch.where(mask.bool(), transform.forward(x), known))

    x = transform.inverse(known) if start is None else start
    x = x + sig[0] * noise(x)
    x = impose(consistency_fn(x, sig[0], class_labels))
    for t in sig[1:]:
        x = x + math.sqrt(t**2 - sigma_min**2) * noise(x)
        x = impose(consistency_fn(x, t, class_labels))
    return x


# ------------------------------------------------------------------------------ masks
def center_square_mask(shape: Sequence[int], size: int | None = None) -> Tensor:
    """Omega ``[1,1,H,W]`` = 1 on the central ``size x size`` square (default H/2, the JX
    notebook's 16x16 on 32x32 CIFAR-10)."""
    h, w = int(shape[-2]), int(shape[-1])
    size = h // 2 if size is None else int(size)
    if not 0 < size <= min(h, w):
        raise ValueError(f"mask size must be in [1, {min(h, w)}], got {size}")
    m = torch.zeros(1, 1, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    m[..., top : top + size, left : left + size] = 1
    return m


def random_boxes_mask(
    batch: int, shape: Sequence[int], num_boxes: int = 3, max_frac: float = 0.4, seed: int = 0
) -> Tensor:
    """Omega ``[B,1,H,W]``: ``num_boxes`` random rectangles per image (side up to
    ``max_frac`` of the image), drawn from ``seed``."""
    h, w = int(shape[-2]), int(shape[-1])
    g = torch.Generator().manual_seed(int(seed))
    m = torch.zeros(batch, 1, h, w)
    for b in range(batch):
        for _ in range(num_boxes):
            bh = int(torch.randint(2, max(3, int(h * max_frac) + 1), (), generator=g))
            bw = int(torch.randint(2, max(3, int(w * max_frac) + 1), (), generator=g))
            top = int(torch.randint(0, h - bh + 1, (), generator=g))
            left = int(torch.randint(0, w - bw + 1, (), generator=g))
            m[b, :, top : top + bh, left : left + bw] = 1
    return m


def mask_from_image(path: str, shape: Sequence[int], key: str = "task.mask") -> Tensor:
    """Omega ``[1,1,H,W]`` from an image file of the images' size ``H x W``: white (> 127
    after greyscale) = generate. Errors name ``key``."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{key}={path}: no such mask image")
    try:
        with Image.open(file) as im:
            img = im.convert("L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"{key}={path} is not a readable image ({type(err).__name__})") from None
    h, w = int(shape[-2]), int(shape[-1])
    if img.size != (w, h):
        raise ValueError(
            f"{key}={path} is {img.width}x{img.height} pixels; expected {w}x{h} (the model's image size; white = fill)"
        )
    arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(
        img.height, img.width
    )
    return (arr > 127).float()[None, None]


# ------------------------------------------------------------------------------ tasks
def inpaint(
    consistency_fn: ConsistencyFn,
    y: Tensor,
    mask: Tensor,
    sigmas: Sequence[float] | Tensor,
    sigma_min: float,
    noise: NoiseFn | None = None,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Fill the pixels where ``mask`` (``[B or 1, 1 or C, H, W]``) is 1; keep the others."""
    return edit(
        consistency_fn, y, IdentityTransform(), mask, sigmas, sigma_min, noise, class_labels
    )


def colorize(
    consistency_fn: ConsistencyFn,
    y: Tensor,
    sigmas: Sequence[float] | Tensor,
    sigma_min: float,
    noise: NoiseFn | None = None,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Generate chroma for the luma of ``y`` ``[B,3,H,W]`` (only y's luma is read)."""
    t = ColorTransform()
    return edit(consistency_fn, y, t, t.mask(y), sigmas, sigma_min, noise, class_labels)


def superres(
    consistency_fn: ConsistencyFn,
    y: Tensor,
    factor: int,
    sigmas: Sequence[float] | Tensor,
    sigma_min: float,
    noise: NoiseFn | None = None,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Generate the detail of each ``factor x factor`` patch; keep every patch mean of ``y``
    (``y`` may be the low-resolution image replicated to full size, :func:`downsample`)."""
    t = PatchTransform(factor)
    return edit(consistency_fn, y, t, t.mask(y), sigmas, sigma_min, noise, class_labels)


def downsample(y: Tensor, factor: int) -> Tensor:
    """The super-resolution input: each ``factor x factor`` patch replaced by its mean."""
    t = PatchTransform(factor)
    return t.inverse(t.forward(y) * (1 - t.mask(y)))


def stroke(
    consistency_fn: ConsistencyFn,
    strokes: Tensor,
    sigmas: Sequence[float] | Tensor,
    sigma_min: float,
    noise: NoiseFn | None = None,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Stroke-guided generation (SDEdit-style, App. D): A = I, Omega = 1 everywhere, starting
    from ``strokes + t_1 z`` (t_1 = 5.38, t_2 = 2.24 in the paper). With Omega = 1 the first
    line of Alg. 4 would erase the guide, so the strokes themselves are the starting point."""
    ones = torch.ones_like(strokes[:1, :1])
    return edit(
        consistency_fn,
        strokes,
        IdentityTransform(),
        ones,
        sigmas,
        sigma_min,
        noise,
        class_labels,
        start=strokes,
    )


def coarse_strokes(y: Tensor, factor: int = 4, levels: int = 4) -> Tensor:
    """A stroke-painting stand-in made from real images: ``factor``-patch means quantised to
    ``levels`` intensities per channel (flat colour blobs, like the paper's stroke inputs)."""
    coarse = downsample(y, factor)
    q = (levels - 1) / 2
    return ((coarse.clamp(-1, 1) + 1) * q).round() / q - 1


@torch.no_grad()
def denoise(
    consistency_fn: ConsistencyFn,
    x_noisy: Tensor,
    sigma: float,
    class_labels: Tensor | None = None,
    clip_denoised: bool = True,
) -> Tensor:
    """One step ``f(x + sigma z, sigma)`` for an image with Gaussian noise of std sigma."""
    out = consistency_fn(x_noisy, float(sigma), class_labels)
    return out.clamp(-1, 1) if clip_denoised else out


def slerp(z1: Tensor, z2: Tensor, alpha: float | Tensor) -> Tensor:
    """Spherical interpolation of flattened latents (App. D):
    ``sin((1-a) psi)/sin psi z1 + sin(a psi)/sin psi z2``, ``psi = arccos(<z1,z2>/|z1||z2|)``.

    ``z1, z2``: ``[B,...]``; ``alpha`` scalar or ``[B]``. Falls back to linear
    interpolation for (anti)parallel latents."""
    a = torch.as_tensor(alpha, dtype=z1.dtype, device=z1.device).reshape(
        -1, *([1] * (z1.ndim - 1))
    )
    f1, f2 = z1.flatten(1), z2.flatten(1)
    cos = (f1 * f2).sum(1) / (f1.norm(dim=1) * f2.norm(dim=1))
    psi = torch.arccos(cos.clamp(-1, 1)).reshape(-1, *([1] * (z1.ndim - 1)))
    sin = torch.sin(psi)
    small = sin.abs() < 1e-6
    w1 = torch.where(small, 1 - a, torch.sin((1 - a) * psi) / torch.where(small, 1, sin))
    w2 = torch.where(small, a, torch.sin(a * psi) / torch.where(small, 1, sin))
    return w1 * z1 + w2 * z2


@torch.no_grad()
def interpolate(
    consistency_fn: ConsistencyFn,
    z1: Tensor,
    z2: Tensor,
    num: int,
    sigma_max: float,
    class_labels: Tensor | None = None,
) -> Tensor:
    """One-step samples along the slerp between two latents. ``z1, z2``: ``[C,H,W]`` standard
    normal; returns ``[num,C,H,W]`` (endpoints included)."""
    if num < 2:
        raise ValueError(f"num must be >= 2 (the two endpoints), got {num}")
    alphas = torch.linspace(0, 1, num, dtype=z1.dtype)
    z = slerp(z1.expand(num, *z1.shape), z2.expand(num, *z2.shape), alphas)
    return consistency_fn(sigma_max * z, sigma_max, class_labels).clamp(-1, 1)
