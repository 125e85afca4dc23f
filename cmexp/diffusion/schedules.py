"""Discretisation curricula N(k) and target-EMA rates mu(k) for consistency training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

Variant = Literal["code", "paper"]


def adaptive_schedule(
    step: int,
    total_steps: int,
    s0: int = 2,
    s1: int = 150,
    mu0: float = 0.9,
    variant: Variant = "code",
) -> tuple[int, float]:
    """The CM paper's adaptive N(k) and mu(k) (App. C, Alg. 3; CIFAR-10 CT: s0 = 2,
    s1 = 150, mu0 = 0.9, K = 800k).

    ``N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1``;
    ``variant="paper"``: ``mu(k) = exp(s0 ln(mu0) / N(k))``;
    ``variant="code"`` (official code, which produced the released numbers):
    ``mu(k) = exp(s0 ln(mu0) / (N(k) - 1))``, e.g. mu(0) = mu0^2 = 0.81.

    Args:
        step: k >= 0, optimizer steps done. total_steps: K > 0; the curriculum stretches with
            K, so a shortened run also changes N(k) and mu(k).

    Returns:
        ``(num_scales, mu)``: N(k) grid points (N(0) = s0 ... N(K) = s1 + 1) and the target rate.
    """
    _check_schedule_args(s0, s1, mu0)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    k = min(step, total_steps)
    inner = math.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1
    scales = max(math.ceil(inner - 1e-9), 1)
    num_scales = scales + 1
    if variant == "code":
        mu = math.exp(s0 * math.log(mu0) / scales)
    elif variant == "paper":
        mu = math.exp(s0 * math.log(mu0) / num_scales)
    else:
        raise ValueError(f"variant must be 'code' or 'paper', got {variant!r}")
    return num_scales, mu


def _check_schedule_args(s0: int, s1: int, mu0: float) -> None:
    if s0 < 1:
        raise ValueError(f"s0 must be >= 1, got {s0!r}")
    if s1 < s0:
        raise ValueError(f"s1 must be >= s0, got s1={s1!r} < s0={s0!r}")
    if not 0 <= mu0 < 1:
        raise ValueError(f"mu0 must be in [0, 1), got {mu0!r}")


def check_mu(mu: float) -> None:
    """Raise a ValueError naming ``mu`` unless 0 <= mu < 1."""
    if not 0 <= mu < 1:
        raise ValueError(f"mu (target EMA rate) must be in [0, 1), got {mu!r}")


class Schedule(Protocol):
    """``schedule(step) -> (num_scales, mu)``."""

    def __call__(self, step: int) -> tuple[int, float]: ...


@dataclass(frozen=True)
class FixedSchedule:
    """Fixed N and mu (CIFAR-10 CD: N = 18, mu = 0; fixed CT: e.g. N = 120, mu = 0.99)."""

    num_scales: int = 18
    mu: float = 0.0

    def __post_init__(self) -> None:
        if int(self.num_scales) != self.num_scales or self.num_scales < 2:
            raise ValueError(f"num_scales must be an integer >= 2, got {self.num_scales!r}")
        check_mu(self.mu)

    def __call__(self, step: int) -> tuple[int, float]:
        return int(self.num_scales), float(self.mu)


@dataclass(frozen=True)
class AdaptiveSchedule:
    """The adaptive curriculum of :func:`adaptive_schedule` bound to its hyperparameters."""

    total_steps: int
    s0: int = 2
    s1: int = 150
    mu0: float = 0.9
    variant: Variant = "code"

    def __post_init__(self) -> None:
        _check_schedule_args(self.s0, self.s1, self.mu0)
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {self.total_steps!r}")
        if self.variant not in ("code", "paper"):
            raise ValueError(f"variant must be 'code' or 'paper', got {self.variant!r}")

    def __call__(self, step: int) -> tuple[int, float]:
        return adaptive_schedule(step, self.total_steps, self.s0, self.s1, self.mu0, self.variant)


@dataclass(frozen=True)
class ImprovedSchedule:
    """iCT's exponential curriculum (Song & Dhariwal 2023): ``N(k) = min(s0 2^floor(k/K'), s1)
    + 1`` with ``K' = floor(K / (log2 floor(s1/s0) + 1))``; s0 = 10, s1 = 1280; mu = 0."""

    total_steps: int
    s0: int = 10
    s1: int = 1280
    mu: float = 0.0

    def __post_init__(self) -> None:
        _check_schedule_args(self.s0, self.s1, 0.0)
        check_mu(self.mu)
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {self.total_steps!r}")

    def __call__(self, step: int) -> tuple[int, float]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step!r}")
        # log2 of the floored ratio is not itself floored (iCT; e.g. s1/s0 = 100 -> 7.64 stages).
        k_prime = max(math.floor(self.total_steps / (math.log2(self.s1 // self.s0) + 1)), 1)
        return min(self.s0 * 2 ** (step // k_prime), self.s1) + 1, float(self.mu)


def describe_curriculum(schedule: Schedule) -> str:
    """One line on what ``schedule`` does over a run: N(k) and mu(k) at k = 0, K/4, K/2, 3K/4, K.

    Curricula that stretch over ``total_steps`` (adaptive, iCT) say so: the paper's values
    (CIFAR-10 CT: s1 = 150 over K = 800k) change when a run is shortened or lengthened.
    """
    K = int(getattr(schedule, "total_steps", 0) or 0)
    if not K:
        n, mu = schedule(0)
        return f"fixed N = {n}, mu = {mu:g} at every step"
    ks = sorted({0, K // 4, K // 2, 3 * K // 4, K})
    points = [schedule(k) for k in ks]
    if all(p == points[0] for p in points):
        return f"fixed N = {points[0][0]}, mu = {points[0][1]:g} at every step"
    ns = ", ".join(str(n) for n, _ in points)
    mus = ", ".join(f"{mu:.4g}" for _, mu in points)
    return (
        f"{type(schedule).__name__} at k = {', '.join(map(str, ks))}: N = {ns}; mu = {mus}; the curriculum "
        f"stretches over K = trainer.max_steps = {K}, so a shorter or longer run changes N(k) and mu(k)"
    )
