"""Loss weightings lambda(sigma_n) of the consistency objectives (CM paper Eq. 7)."""

from __future__ import annotations

from torch import Tensor


class UniformWeighting:
    """lambda = 1 for every noise level: all CM paper results (Sec. 4, "performs well across
    all tasks and datasets")."""

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        """sigma (higher), sigma_next (lower): ``[B]``. Returns ``[B]`` ones."""
        return sigma.new_ones(sigma.shape)


class ICTWeighting:
    """iCT (Song & Dhariwal 2023): ``lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i)``, the
    inverse gap between the two adjacent noise levels."""

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return 1.0 / (sigma - sigma_next)


class TruncatedSNRWeighting:
    """Progressive distillation's "truncated SNR" weighting (Salimans & Ho 2022, Sec. 4):
    ``max(SNR, 1)`` on the x-prediction error, ``SNR = alpha_bar / (1 - alpha_bar) =
    1/sigma^2`` (official code: ``snr_trunc = max(x_mse, eps_mse)``; the CM paper's PD
    baseline: ``max(1/t^2, 1)``)."""

    def __call__(self, sigma: Tensor) -> Tensor:
        """sigma ``[B]`` (the student's level) -> ``[B]``."""
        return (1.0 / sigma**2).clamp(min=1.0)


class SNRPlusOneWeighting:
    """``SNR + 1 = 1 + 1/sigma^2`` on the x-prediction error: exactly the v-target loss of the
    PD paper (``||v_hat - v||^2 = (1 + SNR) ||x_hat - x||^2`` for a fixed z_t, Sec. 4 /
    official ``v_mse``)."""

    def __call__(self, sigma: Tensor) -> Tensor:
        return 1.0 + 1.0 / sigma**2
