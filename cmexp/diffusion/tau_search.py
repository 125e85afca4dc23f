"""Greedy search of the multistep sampling noise levels (CM paper Sec. 3 / App. C).

The taus of Alg. 1 are chosen one at a time among the indices of a training grid (index 0 =
T, index N-1 = eps): each new index is found by ternary search between the previously fixed
index and N-1, assuming the metric (FID) is unimodal in it. The official implementations
(PyTorch ``scripts/ternary_search.py``, the JAX notebook) return the previous probe in their
width-1 branch; here widths 0-2 are resolved by comparing every remaining index.
"""

from __future__ import annotations

from collections.abc import Callable

Score = Callable[[tuple[int, ...]], float]


def ternary_search(
    score: Callable[[int], float], left: int, right: int, cache: dict[int, float] | None = None
) -> int:
    """The integer in ``[left, right]`` minimising a unimodal ``score`` (each index is
    evaluated at most once; ``cache`` collects the evaluations)."""
    if left > right:
        raise ValueError(f"empty search interval [{left}, {right}]")
    cache = {} if cache is None else cache

    def f(i: int) -> float:
        if i not in cache:
            cache[i] = float(score(i))
        return cache[i]

    while right - left >= 3:
        width = right - left
        m1, m2 = left + width // 3, right - width // 3  # left < m1 < m2 < right
        if f(m1) < f(m2):
            right = m2 - 1
        elif f(m1) > f(m2):
            left = m1 + 1
        else:
            left, right = m1, m2
    return min(range(left, right + 1), key=f)


def greedy_tau_search(
    score: Score, num_scales: int, num_taus: int
) -> tuple[list[int], dict[tuple[int, ...], float]]:
    """Choose ``num_taus`` grid indices greedily (CM paper: "pick tau one at a time").

    Args:
        score: metric of a schedule of grid indices ``(0, j_1, ..., j_k)`` (lower is better),
            e.g. FID of samples drawn with taus ``grid[j_1], ..., grid[j_k]``.
        num_scales: N of the grid (CIFAR-10 CD: 18; the 2-step optimum is index 11).
        num_taus: intermediate noise levels (steps - 1).
    Returns:
        (indices, every evaluated schedule with its score).
    """
    if num_scales < 3:
        raise ValueError(f"num_scales must be >= 3, got {num_scales}")
    if not 1 <= num_taus <= num_scales - 2:
        raise ValueError(f"num_taus must be in [1, {num_scales - 2}], got {num_taus}")
    chosen: list[int] = []
    evaluated: dict[tuple[int, ...], float] = {}
    for k in range(num_taus):
        prev = chosen[-1] if chosen else 0
        # leave room for the taus still to come after this one
        hi = num_scales - 2 - (num_taus - 1 - k)
        if prev + 1 > hi:
            raise ValueError(
                f"no room left for tau {k + 1} after index {prev} (num_scales={num_scales})"
            )

        def one(j: int, base: tuple[int, ...] = tuple(chosen)) -> float:
            key = (0, *base, j)
            if key not in evaluated:
                evaluated[key] = float(score(key))
            return evaluated[key]

        chosen.append(ternary_search(one, prev + 1, hi))
    return chosen, evaluated
