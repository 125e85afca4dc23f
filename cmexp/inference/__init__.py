"""Everything that uses a trained model: one loader for every checkpoint kind, the noise-level
plan, seeded generation, real images and restoration metrics, and the editing tasks. The
``cmexp.sample``/``eval``/``edit``/``tau_search`` entry points are thin layers over it."""

from cmexp.inference.checkpoint import (
    CheckpointFile,
    export_weights,
    read_checkpoint,
    resolve_source,
)
from cmexp.inference.generate import generate, sampler_options, save_samples
from cmexp.inference.loader import (
    LoadedModel,
    load_from_config,
    load_model,
    pick_device,
    sampling_spec,
)
from cmexp.inference.plan import (
    SamplingSpec,
    check_plan,
    check_sampler,
    nfe,
    sigma_plan,
    solver_plan,
)

__all__ = [
    "CheckpointFile",
    "LoadedModel",
    "SamplingSpec",
    "check_plan",
    "check_sampler",
    "export_weights",
    "generate",
    "load_from_config",
    "load_model",
    "nfe",
    "pick_device",
    "read_checkpoint",
    "resolve_source",
    "sampler_options",
    "sampling_spec",
    "save_samples",
    "sigma_plan",
    "solver_plan",
]
