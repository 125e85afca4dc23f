"""The model zoo: small model files shipped inside the package, named ``zoo:NAME`` in configs.

``zoo.json`` (next to this file) maps each name to ``{file, sha256, kind, description,
provenance}``; ``provenance`` names a JSON file with the command, commit, seed, compute and
scores that made the model (``docs/zoo.md``). :func:`resolve` turns ``"zoo:NAME"`` into the
shipped file after checking its SHA-256 (once per process) and passes any other string
through as a path. Plain ``hashlib``/``json``: importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["PREFIX", "ZOO_DIR", "info", "is_zoo", "names", "resolve", "sha256"]

PREFIX = "zoo:"
ZOO_DIR = Path(__file__).resolve().parent  # tests point this at a copy
REGISTRY = "zoo.json"

_hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 hex


def sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the file at ``path``, computed once per process for each
    (path, size, modification time)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def _restore_hint(file: str) -> str:
    return f"restore it with `git checkout -- cmexp/zoo/{file}` (or reinstall cmexp)"


def _registry() -> dict[str, dict[str, Any]]:
    path = ZOO_DIR / REGISTRY
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the model zoo registry {path} is missing; {_restore_hint(REGISTRY)}"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"the model zoo registry {path} is not valid JSON ({err}); {_restore_hint(REGISTRY)}"
        ) from None
    return data["models"]


def names() -> list[str]:
    """Names of the shipped models, sorted (``zoo:<name>`` selects one)."""
    return sorted(_registry())


def is_zoo(source: object) -> bool:
    """True for a ``"zoo:NAME"`` string."""
    return isinstance(source, str) and source.startswith(PREFIX)


def _entry(name: str, key: str, source: str) -> dict[str, Any]:
    reg = _registry()
    if name not in reg:
        have = ", ".join(f"{PREFIX}{n}" for n in sorted(reg)) or "none"
        raise ValueError(f"{key}={source}: unknown zoo model {name!r}; the zoo has: {have}")
    return reg[name]


def info(name: str) -> dict[str, Any]:
    """The registry entry of ``name`` (``file``, ``sha256``, ``kind``, ``description``) plus
    ``name``, ``path`` and the parsed ``provenance`` record (``{}`` when it has none). The
    file's hash is not checked here (:func:`resolve` does)."""
    name = name[len(PREFIX) :] if is_zoo(name) else name
    entry = dict(_entry(name, "name", name))
    prov = entry.pop("provenance", None)
    record: dict[str, Any] = {}
    if prov:
        ppath = ZOO_DIR / prov
        if not ppath.is_file():
            raise FileNotFoundError(
                f"zoo model {name!r}: provenance file {ppath} is missing; {_restore_hint(prov)}"
            )
        record = json.loads(ppath.read_text())
    return {
        "name": name,
        **entry,
        "path": str(ZOO_DIR / entry["file"]),
        "provenance_file": prov,
        "provenance": record,
    }


def resolve(source: str | os.PathLike[str], key: str = "ckpt") -> Path:
    """``"zoo:NAME"`` -> the shipped file of NAME, after checking its SHA-256 against the
    registry; any other string -> that path, ``~`` expanded (existence is the caller's check).

    ``key`` is the config key the value came from (``features.ckpt``), named in the errors:
    ValueError for an unknown name (listing the names) or a file whose hash does not match
    (corrupt or truncated), FileNotFoundError for a missing shipped file; both say how to
    restore the file.
    """
    if not is_zoo(source):
        return Path(os.fspath(source)).expanduser()
    src = str(source)
    name = src[len(PREFIX) :].strip()
    entry = _entry(name, key, src)
    file = ZOO_DIR / entry["file"]
    if not file.is_file():
        raise FileNotFoundError(
            f"{key}={src}: the shipped file {file} is missing; {_restore_hint(entry['file'])}"
        )
    actual, expected = sha256(file), str(entry["sha256"]).lower()
    if actual != expected:
        raise ValueError(
            f"{key}={src}: {file} is corrupt or truncated (sha256 {actual[:12]}..., expected "
            f"{expected[:12]}...); {_restore_hint(entry['file'])}"
        )
    return file
