"""openai/consistency_models_cifar10 checkpoints (JAX/Flax) as cmexp models, read without JAX.

The release (its README) holds ``edm_cifar10_ema`` (the EDM teacher) and, each in a folder
``<run>/checkpoints/checkpoint_<k>``, the consistency models ``cd-l1``, ``cd-l2``, ``cd-lpips``,
``ct-lpips`` and the continuous-time ``cifar10-continuous-cd-l2``,
``cifar10-continuous-cd-l2-stopgrad``, ``cifar10-continuous-cd-lpips-stopgrad``,
``continuous-ct-l2``, ``continuous-ct-lpips``. Facts this reader relies on, and where the
release states them:

* File format (``jcm/checkpoints.py``): ``flax.serialization.to_bytes`` of the train state, i.e.
  one msgpack map; arrays are msgpack extension objects (code 1: ndarray, 3: numpy scalar, 2:
  complex) whose payload is itself msgpack ``(shape, dtype name, C-order bytes)``; arrays over
  flax's chunk limit become ``{"__msgpack_chunked_array__": true, "shape", "chunks"}``. Read
  with ``msgpack`` and an extension hook that builds numpy arrays from bytes: nothing in the
  file is ever executed.
* Train state (``jcm/models/utils.py``: ``State``, ``StateWithTarget``): ``step``, ``lr``,
  ``ema_rate``, ``params`` (online), ``params_ema`` (EMA, what the release samples),
  ``model_state`` (empty for NCSN++), ``opt_state``, ``rng_state`` and, for CT with an EMA
  target, ``target_params``.
* Network (``configs/cifar10_k_ve.py`` and every ``configs/cifar10_ve_*.py``, model
  ``jcm/models/ncsnpp.py``): NCSN++ with nf 128, ch_mult (2, 2, 2), 4 res-blocks, attention at
  16x16, BigGAN blocks with FIR [1, 3, 3, 1], skip_rescale, residual input pyramid, no output
  pyramid, Gaussian Fourier features (scale 16) of the noise input; Flax names its submodules
  ``<Class>_<n>`` in creation order (``GaussianFourierProjection_0``, ``Dense_0/1``,
  ``Conv_0``, ``ResnetBlockBigGANpp_<n>``, ``AttnBlockpp_<n>``, ``Downsample_<n>``,
  ``GroupNorm_0``, ``Conv_1``), kernels are ``[kh, kw, in, out]`` / ``[in, out]``.
* Preconditioning (``jcm/models/utils.py``): the teacher is ``get_denoiser_fn`` = EDM's
  scalings; the consistency models are ``get_distiller_fn`` = c_skip ``sd^2/((t - t_min)^2 +
  sd^2)``, c_out ``(t - t_min) sd / sqrt(t^2 + sd^2)``, c_in ``1/sqrt(t^2 + sd^2)``; both feed
  the network ``0.25 ln t`` (``c_noise_scale = 0.25``); sd 0.5, t in [0.002, 80], rho 7
  (``configs/default_cifar10_configs.py``, ``jcm/sde_lib.py`` KVESDE).
* Grids: EDM Heun with N = 18 (``cifar10_k_ve.py``); CD N = 18 and the 2-step levels
  ``ts = [0, 11, 17]`` of ``editing_multistep_sampling.ipynb`` (tau = grid[11] ~ 0.586); CT's
  N(k) of ``jcm/losses.py`` ``get_ema_scales_fn`` (s0 2, s1 150, K 800k) at the file's step.
* What a file is (EDM, CD, CT): not in the file. Read from the released names in its path
  (the file name or its run folder, e.g. ``cd-lpips/checkpoints/checkpoint_80``); keep them.

:class:`cmexp.nets.SongUNet` computes the same function as this NCSN++ (checked by
``tests/unit/test_interop_flax.py`` against a direct NHWC computation on the Flax tree).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cmexp.interop.edm import Converted
from cmexp.interop.safe_pickle import UnsupportedPickleError

SUPPORTED = (
    "openai/consistency_models_cifar10 Flax checkpoints kept under their released names "
    "(edm_cifar10_ema, cd-lpips/checkpoints/checkpoint_80, ct-lpips/checkpoints/checkpoint_74, ...)"
)

SOURCE_FORMAT = "openai-consistency-models-cifar10-flax"

#: Top-level entries of the release's train states (jcm/models/utils.py State, StateWithTarget).
STATE_KEYS = (
    "step",
    "lr",
    "ema_rate",
    "params",
    "target_params",
    "params_ema",
    "model_state",
    "opt_state",
    "rng_state",
)

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, RHO = 0.002, 80.0, 0.5, 7.0


@dataclass(frozen=True)
class Release:
    """One released CIFAR-10 model: its kind, the config that trained it and its 2-step level."""

    kind: str  # edm, cd, ct
    config: str  # configs/*.py (+ launch.sh overrides)
    variant: str  # discrete / continuous-time
    tau_index: int | None = None  # 2-step level on the N = 18 grid (notebook ts = [0, 11, 17])


#: The README's download list, by run (folder) name.
RELEASES: dict[str, Release] = {
    "edm_cifar10_ema": Release("edm", "configs/cifar10_k_ve.py", "edm"),
    "cd-l1": Release("cd", "configs/cifar10_ve_cd.py, loss_norm l1", "discrete", 11),
    "cd-l2": Release("cd", "configs/cifar10_ve_cd.py, loss_norm l2", "discrete", 11),
    "cd-lpips": Release("cd", "configs/cifar10_ve_cd.py, loss_norm lpips", "discrete", 11),
    "ct-lpips": Release("ct", "configs/cifar10_ve_ct_adaptive.py, loss_norm lpips", "discrete"),
    "cifar10-continuous-cd-l2": Release(
        "cd", "configs/cifar10_ve_continuous.py, loss_norm l2", "continuous-time"
    ),
    "cifar10-continuous-cd-l2-stopgrad": Release(
        "cd", "configs/cifar10_ve_continuous.py, loss_norm l2, stopgrad", "continuous-time"
    ),
    "cifar10-continuous-cd-lpips-stopgrad": Release(
        "cd", "configs/cifar10_ve_continuous.py, loss_norm lpips, stopgrad", "continuous-time"
    ),
    "continuous-ct-l2": Release(
        "ct", "configs/cifar10_ve_continuous.py, loss_norm l2, dsm_target", "continuous-time"
    ),
    "continuous-ct-lpips": Release(
        "ct", "configs/cifar10_ve_continuous.py, loss_norm lpips, dsm_target", "continuous-time"
    ),
}

#: The msgpack lead bytes of a map (fixmap with 1..15 entries, map16, map32): every Flax
#: state file starts with one. (0x80, an empty fixmap, is also the pickle PROTO opcode.)
_MAP_LEADS = frozenset(range(0x81, 0x90)) | {0xDE, 0xDF}

_DTYPES = {
    "float16",
    "float32",
    "float64",
    "bfloat16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
}


class FlaxFormatError(UnsupportedPickleError):
    """A file that is not (or not wholly) a Flax msgpack train state of the release."""


# ------------------------------------------------------------------------------ recognition
def looks_like_flax(file: Path) -> bool:
    """True when ``file`` starts like a msgpack map (a Flax ``to_bytes`` state) and has no
    other known signature (zip = ``torch.save``, pickle ``0x80 <proto>``)."""
    with open(file, "rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and head[0] in _MAP_LEADS


def release_for(path: Path) -> tuple[str, Release] | None:
    """The released run a path names: the longest released name that its file name or one of
    its two parent folders is, or starts with (followed by ``-``, ``_`` or ``.``)."""
    best: tuple[str, Release] | None = None
    for part in (path.name, path.parent.name, path.parent.parent.name):
        part = part.lower()
        for name, rel in RELEASES.items():
            if (part == name or re.match(re.escape(name) + r"[-_.]", part)) and (
                best is None or len(name) > len(best[0])
            ):
                best = (name, rel)
        if best is not None:
            return best
    return None


# ------------------------------------------------------------------------------ msgpack
def _array(payload: bytes) -> np.ndarray:
    import msgpack

    shape, dtype, buf = msgpack.unpackb(payload, raw=True)
    dtype = dtype.decode() if isinstance(dtype, bytes) else str(dtype)
    if dtype not in _DTYPES or not isinstance(buf, bytes):
        raise FlaxFormatError(f"an array of dtype {dtype!r}, which a Flax state does not hold")
    shape = tuple(int(s) for s in shape)
    if dtype == "bfloat16":  # numpy has no bfloat16: the upper half of a float32
        raw = np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)


def _ext_hook(code: int, payload: bytes) -> Any:
    import msgpack

    if code in (1, 3):  # ndarray, numpy scalar (flax.serialization._MsgpackExtType)
        return _array(payload)
    if code == 2:  # native complex
        re_, im = msgpack.unpackb(payload)
        return complex(re_, im)
    raise FlaxFormatError(f"a msgpack extension object of type {code}, which Flax never writes")


def _unchunk(tree: Any) -> Any:
    if isinstance(tree, dict):
        if tree.get("__msgpack_chunked_array__") is True:
            chunks = tree["chunks"]
            parts = [np.asarray(chunks[str(i)]).reshape(-1) for i in range(len(chunks))]
            return np.concatenate(parts).reshape(tuple(int(s) for s in tree["shape"]))
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_msgpack_state(file: Path) -> dict[str, Any]:
    """The Flax state dict of ``file`` (nested dicts of numpy arrays / scalars)."""
    import msgpack

    data = file.read_bytes()
    try:
        state = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True)
    except FlaxFormatError:
        raise
    except Exception as err:  # noqa: BLE001 - msgpack's errors: truncated, extra or bad bytes
        what = (
            "it ends early (truncated?)"
            if "incomplete" in str(err).lower() or isinstance(err, EOFError)
            else f"{type(err).__name__}"
        )
        raise FlaxFormatError(f"it is not a complete Flax msgpack state: {what}") from None
    if not isinstance(state, dict):
        raise FlaxFormatError(f"it holds a msgpack {type(state).__name__}, not a Flax state map")
    return _unchunk(state)


# ------------------------------------------------------------------------------ layout
def _leaf(tree: dict[str, Any], path: str, where: str = "params") -> np.ndarray:
    node: Any = tree
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise FlaxFormatError(f"{where}/{path} is missing, which the released NCSN++ has")
        node = node[part]
    if not isinstance(node, np.ndarray):
        raise FlaxFormatError(f"{where}/{path} is a {type(node).__name__}, not an array")
    return node


def _count(params: dict[str, Any], prefix: str) -> int:
    n = 0
    while f"{prefix}_{n}" in params:
        n += 1
    return n


def infer_ncsnpp(params: dict[str, Any], where: str = "params") -> dict[str, Any]:
    """The :class:`cmexp.nets.SongUNet` config of a released-layout NCSN++ parameter tree.
    What the weights cannot tell (the image size, where attention sits, the FIR taps) is the
    release's: 32x32, attention at 16x16, [1, 3, 3, 1]."""
    for name in params:
        if not re.fullmatch(
            r"(GaussianFourierProjection|Dense|Conv|ResnetBlockBigGANpp|AttnBlockpp|Downsample|GroupNorm)_\d+",
            name,
        ):
            raise FlaxFormatError(
                f"{where}/{name} is not a module of the released NCSN++ (jcm/models/ncsnpp.py with "
                "configs/cifar10_*.py)"
            )
    if "GaussianFourierProjection_0" not in params:
        raise FlaxFormatError(
            f"{where} has no GaussianFourierProjection_0: not the released NCSN++ (the DDPM++ layout "
            "of configs/cifar10_k_vp.py was not released and is not read)"
        )
    conv_in = _leaf(params, "Conv_0/kernel", where)
    if conv_in.ndim != 4:
        raise FlaxFormatError(
            f"{where}/Conv_0/kernel has shape {conv_in.shape}, not [3, 3, C, nf]"
        )
    channels, nf = int(conv_in.shape[2]), int(conv_in.shape[3])
    downs, blocks, attns = (
        _count(params, "Downsample"),
        _count(params, "ResnetBlockBigGANpp"),
        _count(params, "AttnBlockpp"),
    )
    if downs == 0:
        raise FlaxFormatError(
            f"{where} has no Downsample_0: the released NCSN++ has a residual input pyramid"
        )
    levels = downs + 1
    nb2 = blocks / levels - 3  # blocks = levels (2 nb + 3)
    if nb2 < 2 or nb2 % 2:
        raise FlaxFormatError(
            f"{where} holds {blocks} ResnetBlockBigGANpp modules, which no NCSN++ with {levels} "
            "levels has"
        )
    nb = int(nb2 // 2)
    mults = []
    for level in range(levels):
        width = _leaf(
            params, f"ResnetBlockBigGANpp_{level * (nb + 1)}/Conv_0/kernel", where
        ).shape[-1]
        if width % nf:
            raise FlaxFormatError(
                f"{where}/ResnetBlockBigGANpp_{level * (nb + 1)} is {width} wide, not a multiple of nf={nf}"
            )
        mults.append(int(width // nf))
    if attns != nb + 2:
        raise FlaxFormatError(
            f"{where} holds {attns} AttnBlockpp modules; the released layout (attention at 16x16 "
            f"only) has {nb + 2}, and where other ones sit cannot be read from the weights"
        )
    if levels < 2:
        raise FlaxFormatError("the released NCSN++ has attention at 16x16, i.e. >= 2 levels")
    return {
        "_target_": "cmexp.nets.SongUNet",
        "img_resolution": 32,
        "img_channels": channels,
        "label_dim": 0,
        "model_channels": nf,
        "channel_mult": mults,
        "num_blocks": nb,
        "attn_resolutions": [16],
        "dropout": 0.0,
        "embedding_type": "fourier",
        "fourier_scale": 16.0,
        "noise_channels_mult": int(
            _leaf(params, "GaussianFourierProjection_0/W", where).shape[0] * 2
        )
        // nf,
        "emb_channels_mult": int(_leaf(params, "Dense_0/kernel", where).shape[-1]) // nf,
        "resample_filter": [1.0, 3.0, 3.0, 1.0],
        "progressive_input": "residual",
        "skip_rescale": True,
        "init_scale": 0.0,
        "num_heads": 1,
        "positional_endpoint": False,
        "guidance_embed": False,
    }


def module_map(cfg: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(flax module, cmexp prefix, type)`` for every module of the NCSN++ of ``cfg``, in the
    order ``jcm/models/ncsnpp.py`` creates them (which is how Flax numbers them)."""
    levels, nb = len(cfg["channel_mult"]), int(cfg["num_blocks"])
    attn_res = {int(r) for r in cfg["attn_resolutions"]}
    out = [
        ("GaussianFourierProjection_0", "noise_embed", "fourier"),
        ("Dense_0", "map0", "dense"),
        ("Dense_1", "map1", "dense"),
        ("Conv_0", "conv_in", "conv"),
    ]
    r, a, d = 0, 0, 0  # ResnetBlockBigGANpp_r, AttnBlockpp_a, Downsample_d

    def res(prefix: str) -> None:
        nonlocal r
        out.append((f"ResnetBlockBigGANpp_{r}", prefix, "res"))
        r += 1

    def attn(prefix: str) -> None:
        nonlocal a
        out.append((f"AttnBlockpp_{a}", prefix, "attn"))
        a += 1

    size = int(cfg["img_resolution"])
    for level in range(levels):
        for i in range(nb):
            res(f"enc_blocks.{level}.{i}")
            if size in attn_res:
                attn(f"enc_attn.{level}.{i}")
        if level < levels - 1:
            res(f"enc_down.{level}")
            out.append((f"Downsample_{d}", f"enc_aux.{level}.conv", "conv2d"))
            d += 1
            size //= 2
    res("mid0")
    attn("mid_attn")
    res("mid1")
    for j, level in enumerate(reversed(range(levels))):
        for i in range(nb + 1):
            res(f"dec_blocks.{j}.{i}")
        if size in attn_res:
            attn(f"dec_attn.{j}")
        if level > 0:
            res(f"dec_up.{j}")
            size *= 2
    out += [("GroupNorm_0", "norm_out", "norm"), ("Conv_1", "conv_out", "conv")]
    return out


def _conv_w(k: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))  # HWIO -> OIHW


def _dense_w(k: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(k.T))


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def convert_params(
    params: dict[str, Any], cfg: dict[str, Any], where: str = "params"
) -> dict[str, Tensor]:
    """The Flax NCSN++ tree ``params`` as a :class:`cmexp.nets.SongUNet` state dict of
    ``cfg``; every leaf is used once (an extra or missing leaf or a wrong shape is an error
    naming ``where/<module>/<leaf>``)."""
    from cmexp.nets.unet import SongUNet

    with torch.device("meta"):
        ref = SongUNet(**{k: v for k, v in cfg.items() if k != "_target_"}).state_dict()
    used: set[str] = set()

    def leaf(path: str) -> np.ndarray:
        node: Any = params
        for part in path.split("/"):
            if not isinstance(node, dict) or part not in node:
                raise FlaxFormatError(f"{where}/{path} is missing, which the released NCSN++ has")
            node = node[part]
        if not isinstance(node, np.ndarray):
            raise FlaxFormatError(f"{where}/{path} is a {type(node).__name__}, not an array")
        used.add(path)
        shapes[path] = tuple(node.shape)
        return node.astype(np.float32, copy=False)

    out: dict[str, Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    def put(key: str, value: Tensor, path: str) -> None:
        want = tuple(ref[key].shape)
        if tuple(value.shape) != want:
            raise FlaxFormatError(
                f"{where}/{path} has shape {shapes[path]}, which does not fit the released layout "
                f"(SongUNet's {key} needs {want})"
            )
        out[key] = value.float().contiguous()

    def conv(mod: str, prefix: str) -> None:
        put(f"{prefix}.weight", _conv_w(leaf(f"{mod}/kernel")), f"{mod}/kernel")
        put(f"{prefix}.bias", _t(leaf(f"{mod}/bias")), f"{mod}/bias")

    def dense(mod: str, prefix: str) -> None:
        put(f"{prefix}.weight", _dense_w(leaf(f"{mod}/kernel")), f"{mod}/kernel")
        put(f"{prefix}.bias", _t(leaf(f"{mod}/bias")), f"{mod}/bias")

    def norm(mod: str, prefix: str) -> None:
        put(f"{prefix}.weight", _t(leaf(f"{mod}/scale")), f"{mod}/scale")
        put(f"{prefix}.bias", _t(leaf(f"{mod}/bias")), f"{mod}/bias")

    for mod, prefix, kind in module_map(cfg):
        if kind == "fourier":
            put(f"{prefix}.freqs", _t(leaf(f"{mod}/W")), f"{mod}/W")
        elif kind == "dense":
            dense(mod, prefix)
        elif kind == "conv":
            conv(mod, prefix)
        elif kind == "norm":
            norm(mod, prefix)
        elif kind == "conv2d":  # up_or_down_sampling.Conv2d: "weight" HWIO, "bias"
            put(
                f"{prefix}.weight",
                _conv_w(leaf(f"{mod}/Conv2d_0/weight")),
                f"{mod}/Conv2d_0/weight",
            )
            put(f"{prefix}.bias", _t(leaf(f"{mod}/Conv2d_0/bias")), f"{mod}/Conv2d_0/bias")
        elif kind == "res":
            norm(f"{mod}/GroupNorm_0", f"{prefix}.norm0")
            conv(f"{mod}/Conv_0", f"{prefix}.conv0")
            dense(f"{mod}/Dense_0", f"{prefix}.emb")
            norm(f"{mod}/GroupNorm_1", f"{prefix}.norm1")
            conv(f"{mod}/Conv_1", f"{prefix}.conv1")
            if f"{prefix}.skip.weight" in ref:
                conv(f"{mod}/Conv_2", f"{prefix}.skip")
        else:  # attn: NIN_0..2 = q, k, v ([C, C] "W", "b"), NIN_3 = output projection
            norm(f"{mod}/GroupNorm_0", f"{prefix}.norm")
            c = int(ref[f"{prefix}.proj.bias"].shape[0])
            ws = [leaf(f"{mod}/NIN_{i}/W") for i in range(3)]
            bs = [leaf(f"{mod}/NIN_{i}/b") for i in range(3)]
            for i, (w, b) in enumerate(zip(ws, bs)):
                if w.shape != (c, c) or b.shape != (c,):
                    bad, got = ("W", w.shape) if w.shape != (c, c) else ("b", b.shape)
                    raise FlaxFormatError(
                        f"{where}/{mod}/NIN_{i}/{bad} has shape {got}, which does not fit the "
                        f"released layout (a {c}-channel attention block)"
                    )
            qkv = torch.cat([_dense_w(w) for w in ws])[:, :, None, None]
            put(f"{prefix}.qkv.weight", qkv, f"{mod}/NIN_0/W")
            put(f"{prefix}.qkv.bias", torch.cat([_t(b) for b in bs]), f"{mod}/NIN_0/b")
            put(
                f"{prefix}.proj.weight",
                _dense_w(leaf(f"{mod}/NIN_3/W"))[:, :, None, None],
                f"{mod}/NIN_3/W",
            )
            put(f"{prefix}.proj.bias", _t(leaf(f"{mod}/NIN_3/b")), f"{mod}/NIN_3/b")

    extra = sorted(p for p in _leaf_paths(params) if p not in used)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise FlaxFormatError(
            f"{where}/{extra[0]}{more} is not part of the released NCSN++ layout"
        )
    missing = sorted(set(ref) - set(out))
    if missing:  # pragma: no cover - module_map covers every SongUNet key
        raise FlaxFormatError(f"no Flax parameter maps to {missing[0]}")
    return out


def _leaf_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _leaf_paths(v, path + "/")
        else:
            out.append(path)
    return out


# ------------------------------------------------------------------------------ conversion
def ct_num_scales(step: int, s0: int = 2, s1: int = 150, total: int = 800_000) -> int:
    """CT's N(k) at training step ``step`` (``jcm/losses.py`` get_ema_scales_fn, "progressive"
    scale mode with the cifar10_ve_ct_adaptive.py constants)."""
    n = math.ceil(math.sqrt(step / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)
    return max(n, 1) + 1


def _scalar(state: dict[str, Any], key: str) -> float | None:
    value = state.get(key)
    if isinstance(value, np.ndarray) and value.size == 1:
        return float(value.reshape(()))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def convert_flax_cifar10(path: Path) -> tuple[Converted, dict[str, Tensor]]:
    """A released CIFAR-10 Flax checkpoint as cmexp ``meta``/``config``/weights (the EMA
    parameters ``params_ema``, which the release samples) and the online ``params``."""
    found = release_for(path)
    state = read_msgpack_state(path)
    if "params_ema" not in state and "params" not in state:
        keys = ", ".join(sorted(map(str, state))[:6])
        raise FlaxFormatError(
            f"it is a msgpack map without params/params_ema (keys: {keys}): not a train state of "
            "the release (jcm/models/utils.py State)"
        )
    unknown = sorted(str(k) for k in state if k not in STATE_KEYS)
    if unknown:
        raise FlaxFormatError(
            f"its train state has an entry {unknown[0]!r} that the release's State does not have "
            f"(expected {', '.join(STATE_KEYS)})"
        )
    model_state = state.get("model_state")
    if isinstance(model_state, dict) and model_state:
        raise FlaxFormatError(
            f"model_state/{sorted(model_state)[0]} is set; the released NCSN++ keeps no mutable state"
        )
    if found is None:
        raise FlaxFormatError(
            "it is an openai/consistency_models_cifar10 Flax train state, but neither its name "
            "nor its folders name a released model, and the file does not record what it is "
            f"(EDM teacher or CD/CT): keep the released names ({', '.join(RELEASES)}), e.g. "
            "cd-lpips/checkpoints/checkpoint_80"
        )
    name, rel = found
    ema_key = "params_ema" if "params_ema" in state else "params"
    params = state[ema_key]
    if not isinstance(params, dict):
        raise FlaxFormatError(f"{ema_key} is a {type(params).__name__}, not a parameter tree")
    net_cfg = infer_ncsnpp(params, ema_key)
    weights = convert_params(params, net_cfg, ema_key)
    online = (
        convert_params(state["params"], net_cfg, "params")
        if isinstance(state.get("params"), dict) and ema_key != "params"
        else weights
    )
    step = _scalar(state, "step")
    num_scales, taus = 18, []
    if rel.kind == "ct" and rel.variant == "discrete":
        num_scales = ct_num_scales(int(step)) if step is not None else 151
    if rel.tau_index is not None:
        from cmexp.diffusion.karras import karras_sigmas

        grid = karras_sigmas(18, SIGMA_MIN, SIGMA_MAX, RHO, dtype=torch.float64)
        taus = [float(grid[rel.tau_index])]
    meta: dict[str, Any] = {
        "kind": rel.kind,
        "sigma_min": SIGMA_MIN,
        "sigma_max": SIGMA_MAX,
        "sigma_data": SIGMA_DATA,
        "c_noise_scale": 0.25,
        "rho": RHO,
        "num_scales": num_scales,
        "taus": taus,
        "sampler": "heun",
        "img_resolution": net_cfg["img_resolution"],
        "img_channels": net_cfg["img_channels"],
        "label_dim": 0,
        "source_format": SOURCE_FORMAT,
        "source_release": name,
        "source_config": rel.config,
        "source_variant": rel.variant,
        "source_step": int(step) if step is not None else None,
        "source_ema_rate": _scalar(state, "ema_rate"),
        "source_weights": {"ema": ema_key, "online": "params" if "params" in state else ema_key},
    }
    if rel.kind == "edm":
        meta["precond"] = {"name": "edm"}
    notes = []
    if "target_params" in state:
        notes.append("target_params (CT's EMA target, a training-only copy) not loaded")
    return Converted(meta, {"net": net_cfg}, weights, notes), online


__all__ = [
    "RELEASES",
    "SOURCE_FORMAT",
    "SUPPORTED",
    "FlaxFormatError",
    "convert_flax_cifar10",
    "convert_params",
    "ct_num_scales",
    "infer_ncsnpp",
    "looks_like_flax",
    "module_map",
    "read_msgpack_state",
    "release_for",
]
