"""Types shared by the consistency-style objectives of several methods (CD/CT, ECT, ...)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

#: A consistency function f(x, sigma, class_labels) -> ``[B,C,H,W]``.
ConsistencyFn = Callable[..., Tensor]


@dataclass
class ConsistencyLossOutput:
    """Per-sample loss ``[B]``, the noise levels it used (``[B]`` each) and, for guided CD,
    the guidance scales ``[B]``."""

    loss: Tensor
    sigma: Tensor
    sigma_next: Tensor
    guidance: Tensor | None = None
