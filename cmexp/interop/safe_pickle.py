"""Reading pickles of other code bases without running their code.

NVlabs/edm stores its networks with ``torch_utils.persistence``: each network object is
pickled as a call ``_reconstruct_persistent_obj(meta)`` whose ``meta`` holds the *source code*
of the module that defined the class (``module_src``), the class name and the object's state
(``nn.Module.__dict__``: ``_parameters``, ``_buffers``, ``_modules``, ``_init_kwargs``, plain
attributes). Loading such a pickle the usual way executes that source.

:class:`SafeUnpickler` never does: its ``find_class`` answers only a fixed list of globals,
each replaced by a function here that builds plain data (tensors from storages, dicts,
numbers); a persistence record becomes a :class:`PersistentRecord` (class name + state + init
kwargs) and its ``module_src`` is kept as text, never executed. Any other global (``os.system``,
``builtins.eval``, a class of another package) is refused with :class:`UnsafePickleError`
naming it, before anything is called.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


class UnsafePickleError(ValueError):
    """The pickle needs a global this reader does not rebuild (it would run code)."""


class UnsupportedPickleError(ValueError):
    """The pickle is safe to read but holds something this suite cannot use."""


@dataclass
class PersistentRecord:
    """One ``torch_utils.persistence`` object as plain data (nothing of it was executed).

    Attributes:
        class_name: the class name in the pickled module source ("EDMPrecond", "SongUNet").
        state: the object's ``__dict__`` (an ``nn.Module``'s ``_parameters``, ``_buffers``,
            ``_modules`` and attributes).
        version: the persistence format version (6 in NVlabs/edm).
        module_src: the pickled source code, kept as text only.
    """

    class_name: str
    state: dict[str, Any]
    version: int
    module_src: str = field(default="", repr=False)

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The keyword arguments the object was constructed with (``{}`` when not recorded)."""
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def init_args(self) -> tuple[Any, ...]:
        return tuple(self.state.get("_init_args") or ())


class ContainerRecord:
    """A ``torch.nn`` container (``ModuleDict``, ``ModuleList``, ``Sequential``) as plain data:
    its pickled ``__dict__`` is kept in ``state``."""

    class_name = "Container"

    def __init__(self, *args: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = dict(state) if isinstance(state, dict) else {}


def _container(name: str) -> type[ContainerRecord]:
    return type(name + "Record", (ContainerRecord,), {"class_name": name})


class PlainDict(dict):
    """``dnnlib.util.EasyDict`` read as a plain dict."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state)


def _persistent_record(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or "class_name" not in meta:
        raise UnsupportedPickleError(
            "a torch_utils.persistence record that is not a class instance "
            f"(type {meta.get('type') if isinstance(meta, dict) else type(meta).__name__!r})"
        )
    state = meta.get("state")
    return PersistentRecord(
        class_name=str(meta["class_name"]),
        state=dict(state) if isinstance(state, dict) else {},
        version=int(meta.get("version", -1)),
        module_src=str(meta.get("module_src", "")),
    )


def _load_storage(data: bytes) -> Any:
    """A storage pickled by ``torch.storage.TypedStorage.__reduce__`` (a legacy ``torch.save``
    of the storage alone), read with ``weights_only=True``."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsupportedPickleError("a tensor storage that is not stored as bytes")
    return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, *_: Any) -> Tensor:
    """``torch._utils._rebuild_tensor_v2`` without its hooks: requires_grad, backward hooks and
    metadata are dropped (a read-only weight)."""
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Tensor, *_: Any) -> Tensor:
    """A ``Parameter`` read as its plain tensor."""
    if not isinstance(data, Tensor):
        raise UnsupportedPickleError("a Parameter whose data is not a tensor")
    return data.detach()


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    """A numpy scalar (EDM stores e.g. ``skip_scale = np.sqrt(0.5)``) as a Python number."""
    if (
        not isinstance(dtype, np.dtype)
        or dtype.hasobject
        or not isinstance(data, (bytes, bytearray))
    ):
        raise UnsupportedPickleError("a numpy scalar that is not a plain number")
    return np.frombuffer(bytes(data), dtype=dtype)[0].item()


def _numpy_dtype(name: Any, *_: Any) -> np.dtype:
    dtype = np.dtype(str(name))
    if dtype.hasobject:
        raise UnsupportedPickleError(f"a numpy dtype holding Python objects ({name!r})")
    return dtype


#: Every global a pickle may name, and what is built instead. Nothing else is resolved.
ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): PlainDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch.nn.modules.container", "ModuleDict"): _container("ModuleDict"),
    ("torch.nn.modules.container", "ModuleList"): _container("ModuleList"),
    ("torch.nn.modules.container", "Sequential"): _container("Sequential"),
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED` globals (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"it needs {module}.{name}, which is not a tensor, a storage, plain data or an "
                "EDM persistence record: loading it would run code from the file"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsupportedPickleError(
            "it uses persistent ids (a torch.save archive, not a plain pickle)"
        )


#: The pickled magic number that starts a legacy (non-zip) ``torch.save`` file.
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def is_plain_pickle(path: Path) -> bool:
    """A pickle that is neither a zip archive (``torch.save``) nor a legacy ``torch.save``
    file: the format of NVlabs/edm's ``*.pkl`` snapshots."""
    with open(path, "rb") as fh:
        head = fh.read(len(TORCH_LEGACY_MAGIC))
    return head[:1] == b"\x80" and not head.startswith(TORCH_LEGACY_MAGIC)


def safe_load(path: Path) -> Any:
    """Read ``path`` with :class:`SafeUnpickler`. Raises :class:`UnsafePickleError` or
    :class:`UnsupportedPickleError`; other read failures become ``UnsupportedPickleError``."""
    with open(path, "rb") as fh:
        try:
            return SafeUnpickler(fh).load()
        except (UnsafePickleError, UnsupportedPickleError):
            raise
        except Exception as err:  # noqa: BLE001 - a damaged or foreign pickle is a user error
            raise UnsupportedPickleError(
                f"it is not a readable pickle ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from None


def module_state(record: Any, prefix: str = "") -> dict[str, Tensor]:
    """The ``state_dict()`` of a pickled module tree (persistence records and containers):
    parameters, then persistent buffers, then children, named like ``nn.Module.state_dict``.
    ``None`` parameters and buffers are skipped, as PyTorch does."""
    state = getattr(record, "state", None)
    if not isinstance(state, dict):
        raise UnsupportedPickleError(
            f"{prefix.rstrip('.') or 'the network'} is not a module record"
        )
    out: dict[str, Tensor] = {}
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state(child, f"{prefix}{name}."))
    for name, value in out.items():
        if not isinstance(value, Tensor):
            raise UnsupportedPickleError(f"{name} is not a tensor ({type(value).__name__})")
    return out


def child(record: Any, name: str) -> Any:
    """The submodule ``name`` of a pickled module record (None when absent)."""
    state = getattr(record, "state", None) or {}
    return (state.get("_modules") or {}).get(name)
