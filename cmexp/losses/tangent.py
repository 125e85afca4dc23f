"""Directional derivatives of a network for the continuous-time objectives (sCT/sCD's dF/dt,
MeanFlow's du/dt): one forward-mode product (``torch.func.jvp``) or a central finite difference
(two forward passes with the same dropout masks), selected with the ``tangent`` config group
(``tangent=jvp | finite_difference``), and the check that names a layer without forward-mode AD.

Both objects compute ``d/ds fn(p_1 + s v_1, p_2 + s v_2, ...)`` at ``s = 0`` for primals ``p``
and tangents ``v`` (:meth:`JVP.derivative`); a method turns that into its own quantity (sCM's
``cos(t) sin(t) dF/dt``: ``cmexp.methods.scm.loss``; MeanFlow's ``du/dt`` along
``(v, 1)``: ``cmexp.methods.meanflow.loss``). :meth:`JVP.check_probe` runs one derivative
through the model before training and turns an AD failure into one error naming the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from cmexp.diffusion.rng import replay_rng

#: ``fn(*primals) -> [B,C,H,W]``: the network as a function of the inputs that move.
DerivFn = Callable[..., Tensor]


class DirectionalDerivative:
    """What the ``tangent`` group builds: ``derivative(fn, primals, tangents)`` and
    ``check_probe(model, forward, derivative)`` (:class:`JVP`, :class:`FiniteDifference`)."""

    key = "tangent"

    def derivative(
        self, fn: DerivFn, primals: Sequence[Tensor], tangents: Sequence[Tensor]
    ) -> Tensor:
        raise NotImplementedError

    def check_probe(
        self, model: nn.Module, forward: Callable[[], Any], derivative: Callable[[], Any]
    ) -> None:
        raise NotImplementedError


class JVP(DirectionalDerivative):
    """The directional derivative by forward-mode AD (``torch.func.jvp``, one pass at about the
    cost of a forward and a half). Every layer of the network must support forward-mode AD:
    :meth:`check_probe` finds the one that does not."""

    key = "tangent=jvp"

    def derivative(
        self, fn: DerivFn, primals: Sequence[Tensor], tangents: Sequence[Tensor]
    ) -> Tensor:
        """``d/ds fn(primals + s tangents)`` at s = 0 (each tangent shaped as its primal)."""
        # Outside autocast: forward-mode AD through autocast's casts fails (a dual bf16 weight
        # meets an fp32 tangent), and the tangent carries no gradient. A no-op in fp32 runs.
        with torch.autocast(device_type=primals[0].device.type, enabled=False):
            return torch.func.jvp(fn, tuple(primals), tuple(tangents))[1]

    def check_probe(
        self, model: nn.Module, forward: Callable[[], Any], derivative: Callable[[], Any]
    ) -> None:
        """Run ``forward()`` (a plain pass through ``model``: its errors are not about AD),
        then ``derivative()`` (one :meth:`derivative` through it, on a small batch); an AD
        failure raises a ValueError naming the innermost layer that was running. No gradients,
        and the global RNG is left as it was."""
        with torch.random.fork_rng(devices=[]), torch.no_grad(), layer_stack(model) as stack:
            forward()
            try:
                derivative()
            except (RuntimeError, NotImplementedError, TypeError) as err:
                name, layer = stack[-1] if stack else ("net", type(model).__name__)
                first = (
                    str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                )
                raise ValueError(
                    f"{self.key}: layer '{name}' ({layer}) of the network does not support "
                    f"forward-mode AD ({first}); use tangent=finite_difference or a network "
                    "whose layers define a forward-mode derivative"
                ) from None


class FiniteDifference(DirectionalDerivative):
    """The directional derivative as a central difference with step ``eps``, two forward passes
    with the same dropout masks (``replay_rng``): for networks without forward-mode AD
    (FastGen's ``use_jvp_finite_diff``). Its error is O(eps^2).

    Args:
        eps: the step along the tangents (``tangent.eps``, (0, 0.1]).
    """

    key = "tangent=finite_difference"

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0 < eps <= 0.1:
            raise ValueError(f"tangent.eps must be in (0, 0.1], got {eps!r}")
        self.eps = float(eps)

    def derivative(
        self, fn: DerivFn, primals: Sequence[Tensor], tangents: Sequence[Tensor]
    ) -> Tensor:
        h = self.eps
        with replay_rng(primals[0].device) as replay:
            with replay():
                plus = fn(*(p + h * v for p, v in zip(primals, tangents, strict=True)))
            with replay():
                minus = fn(*(p - h * v for p, v in zip(primals, tangents, strict=True)))
        return (plus - minus) / (2 * h)

    def check_probe(
        self, model: nn.Module, forward: Callable[[], Any], derivative: Callable[[], Any]
    ) -> None:
        """Nothing to check: any network runs forward."""


@contextmanager
def layer_stack(model: nn.Module) -> Iterator[list[tuple[str, str]]]:
    """The stack of ``(name, class)`` of the modules being executed (innermost last), kept by
    forward hooks; left as it was when an exception unwinds a forward."""
    stack: list[tuple[str, str]] = []
    handles = []
    for name, mod in model.named_modules():
        if mod is model:
            continue

        def pre(m: nn.Module, args: Any, _name: str = name) -> None:
            stack.append((_name, type(m).__name__))

        def post(m: nn.Module, args: Any, out: Any) -> None:
            stack.pop()

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()
