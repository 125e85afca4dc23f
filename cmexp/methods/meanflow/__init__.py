"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling"):
the average velocity u(z_t, r, t) of the linear path, trained with the MeanFlow identity, and
its own sampling family ``flow_map`` (sampler ``meanflow``: one-step ``x = e - u(e, 0, 1)`` and
flow-map jumps). docs/modes.md."""

from collections.abc import Sequence

from cmexp.methods.meanflow.rules import SCHEMA, rules
from cmexp.registry import Method, Sampler, register_method, register_sampler


def _nfe_jumps(sigmas: Sequence[float]) -> int:
    """One network evaluation per jump: one per level of the plan ``[T, tau_1, ...]``."""
    return len(sigmas)


register_method(
    Method(
        kind="meanflow",
        module="cmexp.methods.meanflow.module.MeanFlowLitModule",
        family="flow_map",
        wrapper="cmexp.methods.meanflow.precond:MeanFlowPrecond",
        sampler="meanflow",
        schema=SCHEMA,
        rules=rules,
        doc="docs/modes.md",
    )
)
register_sampler(
    Sampler(
        "meanflow",
        "flow_map",
        "cmexp.methods.meanflow.sampler:run",
        _nfe_jumps,
        doc="MeanFlow: z_r = z_t - (t - r) u(z_t, r, t) on the plan's times t = sigma / (1 + sigma), "
        "ending at r = 0 (1 step: x = e - u(e, 0, 1))",
    )
)
