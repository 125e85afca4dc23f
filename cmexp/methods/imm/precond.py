"""IMM's flow map ``f(x_t, s, t)`` around a raw network, in the suite's sigma variables.

IMM's CIFAR-10 model (lumalabs/imm ``configs/cifar10_generate_images.yaml``: ``noise_schedule:
fm``, ``f_type: simple_edm``, ``temb_type: identity``, ``time_scale: 1000``, ``sigma_data`` 0.5)
lives on the OT flow-matching path ``x_t = (1 - t) x + t sd eps`` (IMM Sec. 2, Eq. 1 with
alpha_t = 1 - t, sigma_t = t; noise of std sd = sigma_data). Dividing by alpha_t gives the
suite's variance-exploding ``x_sigma = x + sigma eps`` with

    sigma = sd t / (1 - t),     t = sigma / (sd + sigma),     alpha_t = sd / (sd + sigma),

so IMM's ``eta_t = sigma_t / alpha_t = t / (1 - t)`` is ``sigma / sd``: the suite's one time
variable is IMM's eta times sd. The flow map ("simple-EDM" parameterisation, IMM App. C: the
DDIM step from t to s with an EDM-style preconditioned prediction):

    g = F_theta(c_in x_t, c_noise(t), c_noise(s))
    f(x_t, s, t) = c_skip(s, t) x_t + c_out(s, t) g
    c_skip = (alpha_t alpha_s + t s) / (alpha_t^2 + t^2)
    c_out  = -(alpha_s t - alpha_t s) sd / sqrt(alpha_t^2 + t^2)
    c_in   = 1 / (sd sqrt(alpha_t^2 + t^2)),   c_noise(t) = c_noise_scale t  (1000 t)

At ``s = t`` it is the identity (c_skip = 1, c_out = 0) for any network. The second time
enters the raw network through its zero-initialised second embedding (``net.guidance_embed``,
``cmexp.nets.guidance``): ``net(c_in x_t, 1000 t, labels, guidance=1000 s)``.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from cmexp.diffusion.karras import append_dims, as_sigma_batch, check_sigma_range
from cmexp.diffusion.precond import WrapsNet, register_precond


def fm_time(sigma: Tensor, sigma_data: float) -> Tensor:
    """IMM's flow-matching time ``t = sigma / (sd + sigma)`` in [0, 1). Any shape."""
    return sigma / (sigma_data + sigma)


def sigma_of_fm_time(t: Tensor, sigma_data: float) -> Tensor:
    """The suite's sigma of flow-matching time ``t``: ``sd t / (1 - t)``. Any shape."""
    return sigma_data * t / (1 - t)


def simple_edm_coefficients(
    t: Tensor, s: Tensor, sigma_data: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in)`` of the flow map from FM time t to s (module docstring).
    ``t``, ``s``: the same shape; the results have it."""
    a_t, a_s = 1 - t, 1 - s
    norm = a_t**2 + t**2
    c_skip = (a_t * a_s + t * s) / norm
    c_out = -(a_s * t - a_t * s) * sigma_data / norm.sqrt()
    c_in = 1 / (sigma_data * norm.sqrt())
    return c_skip, c_out, c_in


@register_precond("imm")
class IMMPrecond(WrapsNet, nn.Module):
    """A raw network as IMM's flow map, with the suite's sigma interface.

    Args:
        net: raw network ``net(x_in, noise_labels, class_labels, guidance=...)`` built with a
            second time input (``guidance_embed=True``).
        sigma_min, sigma_max: IMM's eps and T in sigma (0.006 and 0.994 in FM time:
            ``0.5 * 0.006 / 0.994`` and ``0.5 * 0.994 / 0.006``).
        sigma_data: sd, the std of the FM path's noise and the preconditioning's (0.5).
        c_noise_scale: c_noise(t) = c_noise_scale * t (IMM CIFAR-10: ``time_scale`` 1000).
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_min: float = 0.5 * 0.006 / 0.994,
        sigma_max: float = 0.5 * 0.994 / 0.006,
        sigma_data: float = 0.5,
        c_noise_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        check_sigma_range(sigma_min, sigma_max)
        if not sigma_data > 0:
            raise ValueError(f"model.precond.sigma_data must be > 0, got {sigma_data!r}")
        if not c_noise_scale > 0:
            raise ValueError(f"model.precond.c_noise_scale must be > 0, got {c_noise_scale!r}")
        if getattr(net, "guidance_embed", None) is None:
            raise ValueError(
                "model=imm needs net.guidance_embed=true: the second time s of f(x_t, s, t) "
                "enters the net through its second (zero-initialised) embedding"
            )
        self.net = net
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data, self.c_noise_scale = float(sigma_data), float(c_noise_scale)

    def describe(self) -> dict[str, str]:
        """What a checkpoint records to rebuild the wrapper (``cmexp.inference.loader``)."""
        return {"name": "imm"}

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | None = None,
        sigma_next: Tensor | float | None = None,
    ) -> Tensor:
        """``x_{sigma_next} = f(x_sigma, sigma_next, sigma)`` in the suite's VE variables.

        Args: x ``[B,C,H,W]`` at level ``sigma`` (scalar or ``[B]``); ``sigma_next`` the level
        to map to (scalar or ``[B]``, <= sigma; None: sigma_min, the data end, which makes the
        model a consistency-style x0 estimate). Returns ``[B,C,H,W]`` in x's dtype; the time
        path is float32 (float64 when x is float64).
        """
        sig_t = as_sigma_batch(sigma, x)
        sig_s = as_sigma_batch(self.sigma_min if sigma_next is None else sigma_next, x)
        if x.dtype == torch.float64:
            sig_t, sig_s = sig_t.double(), sig_s.double()
        sd = self.sigma_data
        t, s = fm_time(sig_t, sd), fm_time(sig_s, sd)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in simple_edm_coefficients(t, s, sd))
        a_t, a_s = append_dims(1 - t, x.ndim), append_dims(1 - s, x.ndim)
        x_fm = a_t * x  # IMM's x_t on the OT-FM path
        g = self.net(
            (c_in * x_fm).to(x.dtype),
            self.c_noise_scale * t,
            class_labels,
            guidance=self.c_noise_scale * s,
        )
        y_fm = c_skip * x_fm + c_out * g.to(c_out.dtype)
        return (y_fm / a_s).to(x.dtype)
