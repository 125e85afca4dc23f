"""Config rules of IMM (torch-free): its loss keys, a particle group that never straddles two
batches or devices, and a net that takes the second time."""

from __future__ import annotations

from typing import Any

from cmexp.utils.checks import POSITIVE, ConfigError, Int, Num, Rule, is_int, sel

SCHEMA: dict[str, Rule] = {
    "model.loss.group_size": Int(1),  # M particles per (s, r, t) group (IMM: 4)
    "model.loss.decrement_k": Num(0),  # r(s, t): sigma_t - (sigma_max - sigma_min) / 2^k
    "model.loss.alpha_power": Num(0),  # a of w(s, t) = ... alpha_t^a / (alpha_t^2 + sigma_t^2)
    "model.loss.logsnr_shift": Num(),  # b of w(s, t) = 1/2 sigmoid(b - lambda_t) ...
    "model.loss.kernel_eps": POSITIVE,  # the Laplace kernel's max(||x - y||, eps)
    "model.num_scales": Int(2),
}


def rules(cfg: Any) -> None:
    """The group size divides the per-device batch, and the net has a second time input."""
    m, batch = sel(cfg, "model.loss.group_size"), sel(cfg, "dataset.batch_size")
    if is_int(m) and is_int(batch) and batch % m:
        raise ConfigError(
            f"model.loss.group_size={m} must divide dataset.batch_size={batch} (the per-device "
            "batch is split into particle groups of this size; a group never straddles batches "
            "or devices)"
        )
    if sel(cfg, "net.guidance_embed") is not True:
        raise ConfigError(
            "model=imm needs net.guidance_embed=true: the second time s of f(x_t, s, t) enters "
            "the net through its zero-initialised second embedding (cmexp.nets.guidance)"
        )
