"""Preconditioning wrappers: a raw network becomes an EDM denoiser D(x, sigma) or a
consistency function f(x, sigma) with the boundary condition f(x, sigma_min) = x.

The raw network contract (``cmexp.nets``): ``net(x_in [B,C,H,W], noise_labels [B],
class_labels [B] | None) -> [B,C,H,W]``; it knows nothing about sigma (EDM's split).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from cmexp.diffusion.karras import append_dims, as_sigma_batch, check_sigma_range

#: Wrappers by the name their ``describe()`` records in checkpoints (``meta["precond"]``); the
#: loader rebuilds each with its ``from_meta(net, meta)``. A method adds its own with
#: :func:`register_precond`.
PRECONDS: dict[str, type[nn.Module]] = {}


def register_precond(name: str) -> Callable[[type], type]:
    """Class decorator: the wrapper recorded as ``{"name": name}`` in checkpoints."""

    def add(cls: type) -> type:
        PRECONDS[name] = cls
        return cls

    return add


def precond_args(meta: dict[str, Any]) -> tuple[float, float, float, float]:
    """``(sigma_min, sigma_max, sigma_data, c_noise_scale)`` of a checkpoint's metadata."""
    return (meta["sigma_min"], meta["sigma_max"], meta["sigma_data"], meta["c_noise_scale"])


def edm_scalings(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """EDM denoiser scalings (Karras et al. 2022, Table 1), used by the teacher.

    ``c_skip = sd^2/(sigma^2+sd^2)``, ``c_out = sigma sd/sqrt(sigma^2+sd^2)``,
    ``c_in = 1/sqrt(sigma^2+sd^2)``; ``sd = sigma_data = 0.5``.

    Args:
        sigma: any shape; the result has the same shape.
    """
    var = sigma**2 + sigma_data**2
    return sigma_data**2 / var, sigma * sigma_data / var.sqrt(), 1 / var.sqrt()


def boundary_scalings(
    sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002
) -> tuple[Tensor, Tensor, Tensor]:
    """Consistency-model scalings (CM paper App. C, Eq. for c_skip/c_out).

    ``c_skip = sd^2/((sigma-eps)^2+sd^2)``, ``c_out = sd (sigma-eps)/sqrt(sd^2+sigma^2)``,
    ``c_in = 1/sqrt(sigma^2+sd^2)`` (c_in uses sigma, not sigma - eps, as both official code
    bases do). At ``sigma = eps``: ``c_skip = 1``, ``c_out = 0``, so f(x, eps) = x exactly.

    Args:
        sigma: any shape; the result has the same shape.
        sigma_data: sd = 0.5 in the paper.
        sigma_min: eps = 0.002 in the paper.
    """
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma_data**2 + sigma**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


class WrapsNet:
    """What every preconditioning wrapper shares (mixed in before ``nn.Module``): the sizes
    samplers read, taken from its raw ``net``, and its rebuilding from checkpoint metadata
    (``from_meta``: ``cls(net, sigma_min, sigma_max, sigma_data, c_noise_scale)``; a wrapper
    with other constants overrides it)."""

    net: nn.Module

    @classmethod
    def from_meta(cls, net: nn.Module, meta: dict[str, Any]) -> nn.Module:
        """The wrapper around ``net`` that a checkpoint's metadata describes."""
        return cls(net, *precond_args(meta))

    @property
    def img_resolution(self) -> int:
        return int(self.net.img_resolution)

    @property
    def img_channels(self) -> int:
        return int(self.net.img_channels)

    @property
    def label_dim(self) -> int:
        return int(getattr(self.net, "label_dim", 0))


class _Precond(WrapsNet, nn.Module):
    """Shared wrapper logic; subclasses choose the scalings."""

    def __init__(
        self,
        net: nn.Module,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        c_noise_scale: float = 0.25,
    ) -> None:
        super().__init__()
        check_sigma_range(sigma_min, sigma_max)
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data!r}")
        self.net = net
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.c_noise_scale = float(c_noise_scale)

    def c_noise(self, sigma: Tensor) -> Tensor:
        """Noise-level input of the raw net: ``c_noise_scale * ln(sigma)``.

        0.25 gives ln(sigma)/4 (JAX CIFAR-10 code, EDM, ECT); 250 gives the official PyTorch
        code's 1000 * ln(sigma + 1e-44)/4.
        """
        return self.c_noise_scale * torch.log(sigma + 1e-44)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:
        """Args: x ``[B,C,H,W]``; sigma scalar or ``[B]``; class_labels ``[B]`` or None;
        guidance: the guidance scale w (scalar or ``[B]``) of a w-conditioned student (guided
        CD), handed to the net only when given (``cmexp.nets.guidance``).
        Returns ``[B,C,H,W]`` in x's dtype; scalings are computed in float32 (float64 when
        x or sigma is float64)."""
        sigma = as_sigma_batch(sigma, x)  # float32 or wider
        if x.dtype == torch.float64:
            sigma = sigma.double()
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        extra = {} if guidance is None else {"guidance": guidance}
        out = self.net((c_in * x).to(x.dtype), self.c_noise(sigma), class_labels, **extra)
        return (c_skip * x + c_out * out.to(c_out.dtype)).to(x.dtype)


@register_precond("edm")
class EDMPrecond(_Precond):
    """EDM denoiser ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with EDM scalings."""

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return edm_scalings(sigma, self.sigma_data)

    def describe(self) -> dict[str, str]:
        """What a checkpoint records to rebuild the wrapper (``cmexp.inference.loader``)."""
        return {"name": "edm"}


class CMPrecond(_Precond):
    """Consistency function ``f(x, sigma)`` with the boundary scalings (CM paper Eq. 5,
    App. C): ``f(x, sigma_min) = x`` exactly for any network."""

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return boundary_scalings(sigma, self.sigma_data, self.sigma_min)


class ECTPrecond(CMPrecond):
    """ECT's consistency function (Geng et al. 2025, ``ECMPrecond``): the boundary scalings of
    :class:`CMPrecond` in eval mode (sampling; ECT: sigma_min = 0.003), EDM's denoiser scalings
    in training mode when ``edm_scalings_in_training`` (ECT's choice: the tuned model starts as
    exactly the pretrained EDM denoiser, and levels r < sigma_min stay valid targets)."""

    def __init__(
        self, *args: object, edm_scalings_in_training: bool = True, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)
        self.edm_scalings_in_training = bool(edm_scalings_in_training)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.training and self.edm_scalings_in_training:
            return edm_scalings(sigma, self.sigma_data)
        return super().scalings(sigma)


@register_precond("ve_sde")
class VESDEPrecond(_Precond):
    """Song et al. (2021)'s variance-exploding parameterisation as an EDM denoiser (EDM
    Table 1, "VE" column; NVlabs/edm ``VEPrecond``): ``D(x, sigma) = x + sigma F(x, ln(sigma/2))``,
    i.e. c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(0.5 sigma). ``sigma_data`` and
    ``c_noise_scale`` are not used; EDM's VE networks support sigma in [0.02, 100]."""

    def c_noise(self, sigma: Tensor) -> Tensor:
        return torch.log(0.5 * sigma)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        one = torch.ones_like(sigma)
        return one, sigma, one

    def describe(self) -> dict[str, str]:
        """What a checkpoint records to rebuild the wrapper."""
        return {"name": "ve_sde"}


@register_precond("vp_sde")
class VPSDEPrecond(_Precond):
    """Song et al. (2021)'s variance-preserving parameterisation as an EDM denoiser (EDM
    Table 1, "VP" column; NVlabs/edm ``VPPrecond``): the net predicts the noise,
    ``D(x, sigma) = x - sigma F(x / sqrt(sigma^2 + 1), (M - 1) t(sigma))`` with the linear-beta
    schedule ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` and its inverse ``t(sigma)``.

    Args:
        beta_d, beta_min, M: the schedule (19.9, 0.1, 1000 in EDM and score_sde).
        sigma_min, sigma_max: the sampling range (EDM's networks: sigma(1e-5) to sigma(1)).
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        c_noise_scale: float = 1.0,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,  # the paper's name
    ) -> None:
        super().__init__(net, sigma_min, sigma_max, sigma_data, c_noise_scale)
        if not beta_d > 0 or not beta_min >= 0 or int(M) < 2:
            raise ValueError(
                f"VP schedule needs beta_d > 0, beta_min >= 0, M >= 2; got {beta_d}, {beta_min}, {M}"
            )
        self.beta_d, self.beta_min, self.M = float(beta_d), float(beta_min), int(M)

    @classmethod
    def from_meta(cls, net: nn.Module, meta: dict[str, Any]) -> nn.Module:
        p = meta["precond"]
        return cls(net, *precond_args(meta), beta_d=p["beta_d"], beta_min=p["beta_min"], M=p["M"])

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        """``t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d``."""
        return (
            (self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)).sqrt() - self.beta_min
        ) / self.beta_d

    def c_noise(self, sigma: Tensor) -> Tensor:
        return (self.M - 1) * self.t_of_sigma(sigma)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt()

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild the wrapper."""
        return {"name": "vp_sde", "beta_d": self.beta_d, "beta_min": self.beta_min, "M": self.M}


def gaussian_denoiser(sigma_data: float = 0.5):
    """Exact denoiser for data ~ N(0, sd^2 I): ``D(x, sigma) = sd^2/(sd^2+sigma^2) x``.

    Returns a callable with the denoiser signature ``(x, sigma, class_labels=None)``.
    """

    def denoise(x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        s = append_dims(as_sigma_batch(sigma, x), x.ndim)
        return (sigma_data**2 / (sigma_data**2 + s**2)) * x

    return denoise


def gaussian_consistency_fn(sigma_data: float = 0.5, sigma_min: float = 0.002):
    """Exact consistency function for data ~ N(0, sd^2 I): the PF-ODE maps x at sigma to
    ``x sqrt((sd^2+eps^2)/(sd^2+sigma^2))`` at eps. Same signature as a CMPrecond."""

    def f(x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        s = append_dims(as_sigma_batch(sigma, x), x.ndim)
        return x * torch.sqrt((sigma_data**2 + sigma_min**2) / (sigma_data**2 + s**2))

    return f


def gaussian_mixture_denoiser(means: Tensor, weights: Tensor, std: float = 0.0):
    """Exact denoiser of an isotropic Gaussian mixture ``sum_k w_k N(m_k, std^2 I)`` in R^d.

    ``E[x0 | x] = sum_k r_k(x) (m_k + std^2/(std^2+sigma^2) (x - m_k))`` with responsibilities
    ``r_k`` of ``N(m_k, (std^2+sigma^2) I)``. Inputs x are ``[B, d]`` (or ``[B, ...]`` with
    prod(...) = d). ``means``: ``[K, d]``; ``weights``: ``[K]`` summing to 1.
    """
    log_w = torch.log(weights)

    def denoise(x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        s = as_sigma_batch(sigma, x).to(x.dtype)
        flat = x.reshape(x.shape[0], -1)
        m = means.to(flat)
        var = std**2 + s**2  # [B]
        sq = ((flat[:, None, :] - m[None]) ** 2).sum(-1)  # [B,K]
        logits = log_w.to(flat)[None] - 0.5 * sq / var[:, None]
        resp = torch.softmax(logits, dim=1)  # [B,K]
        shrink = (std**2 / var)[:, None, None]
        post_means = m[None] + shrink * (flat[:, None, :] - m[None])  # [B,K,d]
        return (resp[..., None] * post_means).sum(1).reshape(x.shape)

    return denoise


class ConditionalMixtureDenoiser:
    """Exact class-conditional denoiser of a labelled isotropic Gaussian mixture (for tests of
    classifier-free guidance): class k is ``N(m_k, std^2 I)`` with prior ``w_k``, so
    ``D(x, sigma, k) = m_k + std^2/(std^2+sigma^2) (x - m_k)`` and the null label
    ``K = label_dim`` gives the marginal's :func:`gaussian_mixture_denoiser`.

    ``means``: ``[K, d]``; ``weights``: ``[K]``; x: ``[B, ...]`` with prod(...) = d;
    class_labels int ``[B]`` in ``[0, K]`` (None = all null).
    """

    def __init__(self, means: Tensor, weights: Tensor, std: float = 0.0) -> None:
        self.means, self.std = means, float(std)
        self.label_dim = int(means.shape[0])
        self.marginal = gaussian_mixture_denoiser(means, weights, std)

    def __call__(
        self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None
    ) -> Tensor:
        out = self.marginal(x, sigma)
        if class_labels is None:
            return out
        s = as_sigma_batch(sigma, x).to(x.dtype)
        flat = x.reshape(x.shape[0], -1)
        known = class_labels < self.label_dim
        m = self.means.to(flat)[class_labels.clamp(max=self.label_dim - 1)]  # [B, d]
        shrink = (self.std**2 / (self.std**2 + s**2))[:, None]
        cond = (m + shrink * (flat - m)).reshape(x.shape)
        return torch.where(append_dims(known, x.ndim), cond, out)
