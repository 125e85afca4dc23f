"""Config rules of progressive distillation (torch-free: the command-line precheck runs them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cmexp.utils.checks import ConfigError, Int, Rule, is_int, sel


def check_rounds(
    teacher_steps: int, num_rounds: int | None, steps_per_round: int | Sequence[int]
) -> tuple[int, int, list[int]]:
    """``(teacher_steps, num_rounds, round_lengths)`` of a PD run, or a ValueError naming the
    ``model.*`` key. ``num_rounds = None``: as many halvings as ``teacher_steps`` allows (to 1
    step for a power of two)."""
    if int(teacher_steps) != teacher_steps or teacher_steps < 2:
        raise ValueError(f"model.teacher_steps must be an integer >= 2, got {teacher_steps!r}")
    teacher_steps = int(teacher_steps)
    max_rounds = int(math.log2(teacher_steps))
    if num_rounds is None:
        num_rounds = 0
        while teacher_steps % 2 ** (num_rounds + 1) == 0:
            num_rounds += 1
    if int(num_rounds) != num_rounds or num_rounds < 1:
        raise ValueError(f"model.num_rounds must be an integer >= 1, got {num_rounds!r}")
    num_rounds = int(num_rounds)
    if num_rounds > max_rounds:
        raise ValueError(
            f"model.num_rounds={num_rounds} exceeds log2(model.teacher_steps={teacher_steps}) = "
            f"{math.log2(teacher_steps):g}: each round halves the step count, so at most {max_rounds} rounds fit"
        )
    if teacher_steps % 2**num_rounds:
        raise ValueError(
            f"model.teacher_steps={teacher_steps} is not divisible by 2^model.num_rounds = {2**num_rounds}: "
            "every round must halve a whole number of steps"
        )
    if isinstance(steps_per_round, int | float):
        lengths = [steps_per_round] * num_rounds
    else:
        lengths = list(steps_per_round)
    if len(lengths) != num_rounds:
        raise ValueError(
            f"model.steps_per_round must be one integer or one per round ({num_rounds}), got {len(lengths)} values"
        )
    if any(int(n) != n or n < 1 for n in lengths):
        raise ValueError(f"model.steps_per_round entries must be integers >= 1, got {lengths}")
    return teacher_steps, num_rounds, [int(n) for n in lengths]


SCHEMA: dict[str, Rule] = {
    "model.num_rounds": Int(1, null=True),  # null: down to 1 step
    "model.steps_per_round": Rule(
        "an integer >= 1 or a list of them (one per round) such as [200, 400]",
        lambda v: (
            (is_int(v) and v >= 1)
            or (isinstance(v, (list, tuple)) and bool(v) and all(is_int(k) and k >= 1 for k in v))
        ),
        bad=("abc", 0, [], [0]),
    ),
    "model.teacher_steps": Int(2),
    "model.anneal_lr": Rule("true or false", lambda v: isinstance(v, bool), bad=("maybe", 1)),
}


def rules(cfg: Any) -> None:
    """The rounds of progressive distillation fit their teacher and the run's length."""
    try:
        _, _, lengths = check_rounds(
            sel(cfg, "model.teacher_steps"),
            sel(cfg, "model.num_rounds"),
            sel(cfg, "model.steps_per_round"),
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    max_steps = sel(cfg, "trainer.max_steps")
    if max_steps is not None and max_steps != -1 and max_steps > sum(lengths):
        raise ConfigError(
            f"trainer.max_steps={max_steps} exceeds the rounds' total sum(model.steps_per_round) "
            f"= {sum(lengths)}; lengthen the rounds or shorten the run"
        )
