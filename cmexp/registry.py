"""The one place where training methods and samplers are registered and looked up.

A training method is a package (the built-in ones are the folders of ``cmexp/methods/``; a
plug-in may live anywhere on ``sys.path``) whose ``__init__.py`` calls :func:`register_method`
with a :class:`Method` record, and, when it brings its own way of sampling, :func:`register_sampler`.
The records are plain data and strings (``"module:attribute"`` references resolved on use), so
this module and every method's ``__init__`` are torch-free: the command-line precheck looks a
config's method up in well under a second.

Lookups find a method by the checkpoint kind it writes (:func:`method`) or by its
LightningModule's ``_target_`` (:func:`method_for_target`). Built-in methods are discovered by
importing every package under ``cmexp/methods``; a plug-in is found when its package is imported:
through its ``_target_`` (a training run), the ``method_package`` that its checkpoints record
(inference), the ``cmexp.methods`` entry-point group of an installed distribution, or the
``CMEXP_METHODS`` environment variable (comma-separated package names).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The sampling families: what a model computes, and so which samplers fit it.
#: "consistency": a consistency function f(x, sigma) (CM paper Alg. 1 jumps);
#: "denoiser": a denoiser D(x, sigma) integrated by an ODE/SDE solver.
#: A method may register samplers of a family of its own (e.g. a flow map u(x, r, t)).
SOLVER_FAMILIES = ("denoiser",)

#: The ``clip_denoised`` sampling option's default per family, when neither the checkpoint
#: nor the method's record says (:attr:`Method.clip_denoised`): Alg. 1 clamps each
#: intermediate output to [-1, 1] (the CM paper's code); the diffusion solvers do not clamp
#: the denoiser (EDM's ``generate.py``). A family not listed: its sampler's own behaviour.
CLIP_DENOISED = {"consistency": True, "denoiser": False}


@dataclass(frozen=True)
class Method:
    """A training method as the rest of the suite sees it.

    Attributes:
        kind: the checkpoint kind its LightningModule writes (``checkpoint["cmexp"]["kind"]``);
            unique across methods.
        module: the ``_target_`` of its LightningModule (``package.module.Class``).
        family: the sampling family of its checkpoints (see :data:`SOLVER_FAMILIES`), None for
            models that are not sampled (feature classifier, autoencoder).
        wrapper: ``"module:Class"`` of the preconditioning wrapper its checkpoints are rebuilt
            with when they record none (``meta["precond"]``); a class with ``from_meta(net, meta)``.
        sampler: the default sampler of its checkpoints (``"consistency"``, ``"heun"``, ``"ddim"``).
        final_zero: a solver plan ends with a step into sigma = 0 (EDM); False: at sigma_min.
        clip_denoised: the ``clip_denoised`` sampling default of its checkpoints (None: the
            family's, :data:`CLIP_DENOISED`); a checkpoint's ``meta["clip_denoised"]`` wins.
        teacher: what needs ``model.teacher_path`` ("consistency distillation"), None: no teacher.
        schema: value rules of its own config keys (``cmexp.utils.checks.Rule`` by key).
        rules: its checks between keys, ``rules(cfg)`` raising ``ConfigError`` (torch-free).
        doc: its documentation page.
        package: set by :func:`register_method`: the package that registered it.
    """

    kind: str
    module: str
    family: str | None = None
    wrapper: str | None = None
    sampler: str | None = None
    final_zero: bool = True
    clip_denoised: bool | None = None
    teacher: str | None = None
    schema: Mapping[str, Any] = field(default_factory=dict)
    rules: Callable[[Any], None] | None = None
    doc: str = ""
    package: str = ""


@dataclass(frozen=True)
class Sampler:
    """A sampler as the shared generate path calls it.

    Attributes:
        name: the ``sampler=`` value.
        family: the models it samples (:attr:`Method.family`).
        run: ``"module:function"``, called as ``run(model, z, sigmas, *, sigma_min,
            class_labels, noise, clip, [clip_denoised], **options)`` (``clip_denoised`` only
            when the function takes it) with unit noise ``z`` ``[B,C,H,W]`` and the
            descending plan ``sigmas``; returns ``[B,C,H,W]``.
        nfe: network evaluations of a plan ``sigmas`` (a list of floats).
        options: the command-line options it takes (DDIM ``eta``, ...).
        finite_start: cannot start at sigma_max = inf (zero terminal SNR).
    """

    name: str
    family: str
    run: str
    nfe: Callable[[Sequence[float]], int]
    options: tuple[str, ...] = ()
    finite_start: bool = False
    doc: str = ""


_METHODS: dict[str, Method] = {}
_SAMPLERS: dict[str, Sampler] = {}
_discovered = False


def register_method(record: Method, package: str | None = None) -> Method:
    """Register ``record`` (call it from the method package's ``__init__``). Registering the
    same kind twice from the same package is a no-op; from another package, a ValueError."""
    from dataclasses import replace

    pkg = package or record.module.rsplit(".", 2)[0]
    record = replace(record, package=pkg)
    old = _METHODS.get(record.kind)
    if old is not None and old.package != record.package:
        raise ValueError(
            f"method kind '{record.kind}' is registered twice: by {old.package} and {record.package}"
        )
    _METHODS[record.kind] = record
    return record


def register_sampler(record: Sampler) -> Sampler:
    """Register a sampler; a name may be registered once (the same record again is a no-op)."""
    old = _SAMPLERS.get(record.name)
    if old is not None and old.run != record.run:
        raise ValueError(
            f"sampler '{record.name}' is registered twice: {old.run} and {record.run}"
        )
    _SAMPLERS[record.name] = record
    return record


def discover() -> None:
    """Import the built-in method packages, installed plug-ins (entry-point group
    ``cmexp.methods``) and the packages named in ``$CMEXP_METHODS``; once per process."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    builtin = importlib.import_module("cmexp.methods")  # by name: the one way up, on purpose
    found = sorted(i.name for i in pkgutil.iter_modules(builtin.__path__) if i.ispkg)
    for name in sorted(found, key=lambda n: (builtin.ORDER + (n,)).index(n)):
        importlib.import_module(f"cmexp.methods.{name}")
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="cmexp.methods"):
            importlib.import_module(ep.value.split(":")[0])
    except Exception:  # noqa: BLE001 - a broken third-party distribution must not stop the suite
        pass
    for name in filter(None, (s.strip() for s in os.environ.get("CMEXP_METHODS", "").split(","))):
        importlib.import_module(name)


def _import_packages_of(target: str) -> None:
    """Import the packages above ``target``'s module (``a.b.module.Class``: ``a``, ``a.b``),
    whose ``__init__`` registers a plug-in method, without importing the module itself."""
    parts = target.split(".")
    for i in range(1, len(parts) - 1):
        try:
            importlib.import_module(".".join(parts[:i]))
        except ImportError:
            return


def methods() -> dict[str, Method]:
    """Every registered method by kind."""
    discover()
    return dict(_ordered())


def method(kind: str, package: str | None = None) -> Method:
    """The method whose checkpoints have ``kind``; ``package`` (a checkpoint's
    ``method_package``) is imported first when the kind is not known yet."""
    discover()
    if kind not in _METHODS and package:
        try:
            importlib.import_module(package)
        except ImportError as err:
            raise ValueError(
                f"checkpoint kind '{kind}' belongs to the method package {package}, which cannot "
                f"be imported here ({err})"
            ) from None
    if kind not in _METHODS:
        raise ValueError(
            f"unknown model kind '{kind}' (registered: {', '.join(sorted(_METHODS))})"
        )
    return _METHODS[kind]


def method_for_target(target: str) -> Method | None:
    """The method whose LightningModule is ``target`` (a ``model._target_``), or None."""
    discover()
    found = [m for m in _METHODS.values() if m.module == target]
    if not found and target:
        _import_packages_of(target)
        found = [m for m in _METHODS.values() if m.module == target]
    return found[0] if found else None


def kinds(family: str | None = None, sampled: bool = False) -> tuple[str, ...]:
    """Registered kinds, in registration order: all, those of ``family``, or (``sampled``)
    those that have a sampling family."""
    discover()
    return tuple(
        k
        for k, m in _ordered()
        if (family is None or m.family == family) and (not sampled or m.family is not None)
    )


def _ordered() -> list[tuple[str, Method]]:
    """The methods in a fixed order, whatever imported them first: the built-in packages in
    ``cmexp.methods.ORDER``, then the others as registered."""
    order = importlib.import_module("cmexp.methods").ORDER
    items = list(_METHODS.items())

    def rank(item: tuple[int, tuple[str, Method]]) -> tuple[int, int]:
        i, (_, m) = item
        short = m.package.removeprefix("cmexp.methods.")
        return (order.index(short) if short in order else len(order), i)

    return [kv for _, kv in sorted(enumerate(items), key=rank)]


def sampler(name: str) -> Sampler:
    """The sampler registered as ``name``; a ValueError naming ``sampler`` otherwise."""
    discover()
    if name not in _SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(_SAMPLERS)}, got {name!r}")
    return _SAMPLERS[name]


def samplers(family: str | None = None) -> tuple[str, ...]:
    """Names of the registered samplers (of ``family``)."""
    discover()
    return tuple(n for n, s in _SAMPLERS.items() if family is None or s.family == family)


def load(ref: str) -> Any:
    """The object a ``"module:attribute"`` reference names."""
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for name in attr.split(".") if attr else ():
        obj = getattr(obj, name)
    return obj


# ------------------------------------------------------------------ the shared samplers
def _nfe_jumps(sigmas: Sequence[float]) -> int:
    return len(sigmas)


def _nfe_one_per_step(sigmas: Sequence[float]) -> int:
    return len(sigmas) - 1


def _nfe_two_per_step(sigmas: Sequence[float]) -> int:
    return 2 * (len(sigmas) - 1) - (1 if float(sigmas[-1]) == 0 else 0)


_RUN = "cmexp.inference.samplers:"
for _s in (
    Sampler("consistency", "consistency", _RUN + "run_consistency", _nfe_jumps,
            doc="CM paper Alg. 1: f(T z, T), then re-noise to each tau and apply f"),
    Sampler("heun", "denoiser", _RUN + "run_heun", _nfe_two_per_step,
            finite_start=True, doc="EDM Alg. 1 (2nd-order Heun; Euler into 0)"),
    Sampler("euler", "denoiser", _RUN + "run_euler", _nfe_one_per_step, doc="PF-ODE Euler"),
    Sampler("ddim", "denoiser", _RUN + "run_ddim", _nfe_one_per_step, ("eta",),
            doc="DDIM (eta = 0: deterministic; equals Euler in sigma)"),
    Sampler("ddpm", "denoiser", _RUN + "run_ddpm", _nfe_one_per_step,
            doc="DDPM ancestral sampling"),
    Sampler("edm_sde", "denoiser", _RUN + "run_edm_sde", _nfe_two_per_step,
            ("s_churn", "s_tmin", "s_tmax", "s_noise"), finite_start=True,
            doc="EDM Alg. 2 (stochastic)"),
):  # fmt: skip
    register_sampler(_s)
