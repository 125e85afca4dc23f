"""Reading the files that hold a trained model: one reader for every kind of checkpoint.

A cmexp checkpoint (full Lightning ``.ckpt``, or the slim copy of :func:`export_weights`) is
self-describing: ``checkpoint["cmexp"]`` holds the kind of the method that wrote it ("edm", "pd", "cd",
"ct", "ect", "sct", "scd", "classifier", ...: ``cmexp.registry``), the settings needed to use the model (preconditioning constants and the wrapper,
``rho``, grid ``num_scales``, default ``taus``, resolution, channels, labels) and the resolved run
config, whose ``net`` entry rebuilds the raw network. ``zoo:NAME`` sources name files shipped in ``cmexp/zoo``.
NVlabs/edm pickles and openai/consistency_models ``.pt`` files are converted in memory into
the same layout (:mod:`cmexp.interop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cmexp import registry


def resolve_source(source: str | Path, key: str = "ckpt") -> Path:
    """The file behind a checkpoint source: ``zoo:NAME`` (a shipped, hash-checked file) or a
    path. Raises FileNotFoundError naming ``key`` when the file does not exist."""
    text = str(source)
    if text.startswith("zoo:"):
        from cmexp import zoo

        return zoo.resolve(text, key=key)
    file = Path(text).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{key}={source}: no such checkpoint file")
    return file


@dataclass
class CheckpointFile:
    """A checkpoint read from disk: ``meta`` = ``checkpoint["cmexp"]``, ``state_dict`` with
    the module's key prefixes (``model.``, ``ema.``, ``target.``, ``net.``)."""

    path: Path
    source: str
    key: str
    meta: dict[str, Any]
    state_dict: dict[str, Tensor]
    global_step: int | None = None

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind"))

    @property
    def config(self) -> dict[str, Any]:
        """The resolved run config (``{}`` when the checkpoint records none)."""
        record = self.meta.get("config") or {}
        config = record.get("config", record) if isinstance(record, dict) else {}
        return config if isinstance(config, dict) else {}

    def weights(self, prefix: str) -> dict[str, Tensor]:
        """The entries of ``state_dict`` under ``prefix`` (e.g. "ema."), prefix removed;
        ValueError naming the file when there are none."""
        out = {k[len(prefix) :]: v for k, v in self.state_dict.items() if k.startswith(prefix)}
        if not out:
            raise ValueError(f"{self.key}={self.source} holds no '{prefix}*' weights")
        return out

    def net_config(self) -> dict[str, Any]:
        net = self.config.get("net")
        if not isinstance(net, dict) or "_target_" not in net:
            raise ValueError(
                f"{self.key}={self.source} does not record its net config (checkpoint['cmexp']['config']['net'])"
            )
        return net


def read_checkpoint(
    source: str | Path, key: str = "ckpt", kinds: tuple[str, ...] | None = None
) -> CheckpointFile:
    """Read a cmexp checkpoint (``torch.load(weights_only=True)``: no code runs) and check its
    kind. Every failure is one error naming ``key``, the file, what it is and what was expected.

    Args:
        source: a path or ``zoo:NAME``.
        key: the config key that named it (``ckpt``, ``model.teacher_path``, ``features.ckpt``).
        kinds: the kinds accepted here (None: every kind of a registered method that is
            sampled, ``cmexp.registry.kinds(sampled=True)``).
    """
    # NVlabs/edm pickles and OpenAI CM .pt files are converted in memory
    from cmexp.interop import adapt_foreign, read_foreign

    file = resolve_source(source, key)
    ckpt = read_foreign(file, key, str(source))
    if ckpt is None:
        try:
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is a user error here
            raise ValueError(
                f"{key}={source} is not a readable PyTorch checkpoint ({type(err).__name__})"
            ) from None
        ckpt = adapt_foreign(file, ckpt, key, str(source))
    meta = ckpt.get("cmexp") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise ValueError(
            f"{key}={source} is not a checkpoint written by cmexp.train (no 'cmexp' entry with a kind)"
        )
    try:  # a plug-in method's kind: its checkpoints name the package that registers it
        registry.method(str(meta["kind"]), meta.get("method_package"))
    except ValueError:
        pass  # an unknown kind: refused below, naming the kinds expected
    kinds = registry.kinds(sampled=True) if kinds is None else kinds
    if meta["kind"] not in kinds:
        raise ValueError(
            f"{key}={source} holds a '{meta['kind']}' model; expected {' or '.join(repr(k) for k in kinds)} here"
        )
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{key}={source} has no state_dict")  # noqa: TRY004 - a user error (exit 2)
    return CheckpointFile(file, str(source), key, dict(meta), state, ckpt.get("global_step"))


def export_weights(src: str | Path, dst: str | Path, use_ema: bool = True) -> Path:
    """Write a slim copy of a cmexp checkpoint holding only the sampling-EMA (or online)
    weights and the ``cmexp`` metadata: what sampling, editing and evaluation need (a
    fraction of the size of a full checkpoint with target net, optimizer and RNG states).
    Refuses to overwrite an existing file."""
    dst = Path(dst).expanduser()
    if dst.exists():
        raise FileExistsError(f"{dst} exists; refusing to overwrite it")
    ckpt = read_checkpoint(src, key="src")
    state = {
        "ema." + k: v.clone() for k, v in ckpt.weights("ema." if use_ema else "model.").items()
    }
    state.update(
        {k: v.clone() for k, v in ckpt.state_dict.items() if k.startswith("latent.")}
    )  # latent mode's codec
    meta = {k: v for k, v in ckpt.meta.items() if k != "rng"}
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "cmexp": meta, "global_step": ckpt.global_step}, dst)
    return dst
