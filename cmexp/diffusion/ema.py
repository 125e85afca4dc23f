"""Exponential moving averages of parameters: the target network theta^- (rate mu) and the
sampling EMA (rate ema_decay) are two distinct copies updated with this same rule."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, rate: float) -> None:
    """In place: ``p_t <- rate p_t + (1 - rate) p_s`` for parameters; buffers are copied.

    ``rate = 0`` makes target a copy of source (CIFAR-10 CD: theta^- = stopgrad(theta)).
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"EMA rate must be in [0, 1], got {rate!r}")
    t_params = list(target.parameters())
    s_params = list(source.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("target and source have different parameter lists")
    if rate == 0:
        torch._foreach_copy_(t_params, [p.detach() for p in s_params])
    else:
        torch._foreach_lerp_(t_params, [p.detach() for p in s_params], 1 - rate)
    for bt, bs in zip(target.buffers(), source.buffers()):
        bt.copy_(bs)
