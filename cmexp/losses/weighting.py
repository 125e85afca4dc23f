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
