"""Test-made files in the format of openai/consistency_models_cifar10's released checkpoints
(JAX/Flax), written without JAX, and a direct computation of their NCSN++.

* :func:`ncsnpp_params`: a Flax NCSN++ parameter tree with the release's module names, leaf
  names and shape rules (``jcm/models/ncsnpp.py``, ``layerspp.py``, ``layers.py``,
  ``up_or_down_sampling.py`` with ``configs/cifar10_k_ve.py``), at a width of the caller's choice.
* :func:`write_state`: the release's train state (``State`` / ``StateWithTarget`` of
  ``jcm/models/utils.py``) serialised as ``flax.serialization.to_bytes`` does: msgpack, arrays
  as extension type 1 holding msgpack ``(shape, dtype name, bytes)``, numpy scalars as type 3.
* :func:`ncsnpp_forward`: the NCSN++ forward pass computed straight from the Flax tree, NHWC,
  following the control flow of ``NCSNpp.__call__`` (its own creation-order counters, its own
  FIR up/down sampling as upfirdn2d, GroupNorm with Flax's eps 1e-6), independent of
  :class:`cmexp.nets.SongUNet` and of the converter's name table.
* :func:`denoiser`, :func:`distiller`: ``get_denoiser_fn`` / ``get_distiller_fn``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


# ------------------------------------------------------------------------------ writing
class _Tree:
    def __init__(self, rng: np.random.Generator, scale: float = 0.2) -> None:
        self.rng, self.scale = rng, scale

    def arr(self, *shape: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * self.scale).astype(np.float32)


def _conv(t: _Tree, cin: int, cout: int, k: int = 3) -> dict[str, np.ndarray]:
    return {"kernel": t.arr(k, k, cin, cout) / math.sqrt(k * k * cin) * 3, "bias": t.arr(cout)}


def _dense(t: _Tree, cin: int, cout: int) -> dict[str, np.ndarray]:
    return {"kernel": t.arr(cin, cout) / math.sqrt(cin) * 3, "bias": t.arr(cout)}


def _norm(t: _Tree, c: int) -> dict[str, np.ndarray]:
    return {"scale": 1 + t.arr(c), "bias": t.arr(c)}


def _resblock(t: _Tree, cin: int, cout: int, emb: int, resample: bool) -> dict[str, Any]:
    out = {
        "GroupNorm_0": _norm(t, cin),
        "Conv_0": _conv(t, cin, cout),
        "Dense_0": _dense(t, emb, cout),
        "GroupNorm_1": _norm(t, cout),
        "Conv_1": _conv(t, cout, cout),
    }
    if cin != cout or resample:
        out["Conv_2"] = _conv(t, cin, cout, 1)
    return out


def _attn(t: _Tree, c: int) -> dict[str, Any]:
    out: dict[str, Any] = {"GroupNorm_0": _norm(t, c)}
    for i in range(4):
        out[f"NIN_{i}"] = {"W": t.arr(c, c) / math.sqrt(c) * 3, "b": t.arr(c)}
    return out


def ncsnpp_params(
    nf: int = 8,
    ch_mult: tuple[int, ...] = (1, 2),
    num_res_blocks: int = 1,
    attn_resolutions: tuple[int, ...] = (16,),
    resolution: int = 32,
    channels: int = 3,
    seed: int = 0,
    fourier_scale: float = 16.0,
) -> dict[str, Any]:
    """A Flax NCSN++ tree (biggan blocks, FIR, residual input pyramid, Fourier embedding,
    no output pyramid) as ``model.init`` would name it, with random values."""
    t = _Tree(np.random.default_rng(seed))
    p: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def add(cls: str, value: Any) -> None:
        n = counts.get(cls, 0)
        counts[cls] = n + 1
        p[f"{cls}_{n}"] = value

    emb = 4 * nf
    add(
        "GaussianFourierProjection",
        {"W": (t.rng.standard_normal(nf) * fourier_scale).astype(np.float32)},
    )
    add("Dense", _dense(t, 2 * nf, emb))
    add("Dense", _dense(t, emb, emb))
    add("Conv", _conv(t, channels, nf))
    hs_c, c, size, pyr_c = [nf], nf, resolution, channels
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            add("ResnetBlockBigGANpp", _resblock(t, c, nf * mult, emb, False))
            c = nf * mult
            if size in attn_resolutions:
                add("AttnBlockpp", _attn(t, c))
            hs_c.append(c)
        if level != len(ch_mult) - 1:
            add("ResnetBlockBigGANpp", _resblock(t, c, c, emb, True))
            add(
                "Downsample",
                {"Conv2d_0": {"weight": _conv(t, pyr_c, c)["kernel"], "bias": t.arr(c)}},
            )
            pyr_c = c
            size //= 2
            hs_c.append(c)
    add("ResnetBlockBigGANpp", _resblock(t, c, c, emb, False))
    add("AttnBlockpp", _attn(t, c))
    add("ResnetBlockBigGANpp", _resblock(t, c, c, emb, False))
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            cin = c + hs_c.pop()
            add("ResnetBlockBigGANpp", _resblock(t, cin, nf * ch_mult[level], emb, False))
            c = nf * ch_mult[level]
        if size in attn_resolutions:
            add("AttnBlockpp", _attn(t, c))
        if level != 0:
            add("ResnetBlockBigGANpp", _resblock(t, c, c, emb, True))
            size *= 2
    add("GroupNorm", _norm(t, c))
    add("Conv", _conv(t, c, channels))
    return p


def _pack_ext(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        payload = msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(1, payload)
    if isinstance(x, np.generic):
        arr = np.asarray(x)
        payload = msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(3, payload)
    raise TypeError(f"cannot serialise {type(x)}")


def state_bytes(state: dict[str, Any]) -> bytes:
    """``flax.serialization.to_bytes`` of a state dict (``msgpack_serialize``)."""
    return msgpack.packb(state, default=_pack_ext, strict_types=True)


def train_state(
    params: dict[str, Any], params_ema: dict[str, Any] | None = None, target: bool = False
) -> dict[str, Any]:
    """The release's ``State`` (``StateWithTarget`` with ``target``) as ``to_state_dict``
    gives it: optax's RAdam state as nested dicts, haiku's rng state an array."""
    import copy

    ema = params_ema if params_ema is not None else copy.deepcopy(params)
    zeros = _map(params, np.zeros_like)
    state: dict[str, Any] = {
        "step": np.int32(800000 if not target else 740000),
        "lr": np.float32(4e-4),
        "ema_rate": np.float32(0.9999),
        "params": params,
    }
    if target:
        state["target_params"] = copy.deepcopy(params)
    state.update(
        {
            "params_ema": ema,
            "model_state": {},
            "opt_state": {"0": {"count": np.int32(3), "mu": zeros, "nu": zeros}, "1": {}},
            "rng_state": np.array([0, 42], dtype=np.uint32),
        }
    )
    return state


def _map(tree: Any, fn: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(tree)


def perturbed(params: dict[str, Any], seed: int, scale: float = 0.05) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return _map(params, lambda a: (a + scale * rng.standard_normal(a.shape)).astype(a.dtype))


def write_state(path: Path, state: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(state_bytes(state))
    return path


# ------------------------------------------------------------------------------ forward pass
def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def _gn(p: dict[str, Any], x: Tensor) -> Tensor:  # x NHWC; flax GroupNorm, eps 1e-6
    b, h, w, c = x.shape
    g = min(c // 4, 32)
    xg = x.reshape(b, h, w, g, c // g).double()
    mean = xg.mean(dim=(1, 2, 4), keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=(1, 2, 4), keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + 1e-6)).reshape(b, h, w, c).float()
    return y * _t(p["scale"]) + _t(p["bias"])


def _conv_same(p: dict[str, Any], x: Tensor, wkey: str = "kernel", bkey: str = "bias") -> Tensor:
    k = _t(p[wkey])  # HWIO
    pad = k.shape[0] // 2
    y = F.conv2d(x.permute(0, 3, 1, 2), k.permute(3, 2, 0, 1), padding=pad)
    return y.permute(0, 2, 3, 1) + _t(p[bkey])


def _upfirdn(x: Tensor, k: Tensor, up: int, down: int, pad0: int, pad1: int) -> Tensor:
    """StyleGAN2's upfirdn_2d on NHWC: insert zeros after each pixel, pad, convolve with the
    (flipped) kernel, keep every ``down``-th pixel."""
    b, h, w, c = x.shape
    y = x.permute(0, 3, 1, 2).reshape(b * c, 1, h, w)
    if up > 1:
        z = torch.zeros(b * c, 1, h * up, w * up)
        z[:, :, ::up, ::up] = y
        y = z
    y = F.pad(y, (pad0, pad1, pad0, pad1))
    y = F.conv2d(y, torch.flip(k, (0, 1))[None, None])
    y = y[:, :, ::down, ::down]
    return y.reshape(b, c, y.shape[2], y.shape[3]).permute(0, 2, 3, 1)


def _fir(taps: tuple[float, ...] = (1, 3, 3, 1)) -> Tensor:
    k = torch.tensor(taps, dtype=torch.float32)
    k = torch.outer(k, k)
    return k / k.sum()


def _upsample(x: Tensor) -> Tensor:
    k = _fir() * 4
    p = k.shape[0] - 2
    return _upfirdn(x, k, 2, 1, (p + 1) // 2 + 1, p // 2)


def _downsample(x: Tensor) -> Tensor:
    k = _fir()
    p = k.shape[0] - 2
    return _upfirdn(x, k, 1, 2, (p + 1) // 2, p // 2)


def _conv_downsample(p: dict[str, Any], x: Tensor) -> Tensor:
    w = _t(p["weight"])  # HWIO
    k = _fir()
    pad = (k.shape[0] - 2) + (w.shape[0] - 1)
    x = _upfirdn(x, k, 1, 1, (pad + 1) // 2, pad // 2)
    y = F.conv2d(x.permute(0, 3, 1, 2), w.permute(3, 2, 0, 1), stride=2)
    return y.permute(0, 2, 3, 1) + _t(p["bias"])


def _resblock_fwd(
    p: dict[str, Any], x: Tensor, temb: Tensor, out_ch: int | None, up: bool, down: bool
) -> Tensor:
    c = x.shape[-1]
    out_ch = out_ch or c
    h = F.silu(_gn(p["GroupNorm_0"], x))
    if up:
        h, x = _upsample(h), _upsample(x)
    elif down:
        h, x = _downsample(h), _downsample(x)
    h = _conv_same(p["Conv_0"], h)
    d = p["Dense_0"]
    h = h + (F.silu(temb) @ _t(d["kernel"]) + _t(d["bias"]))[:, None, None, :]
    h = F.silu(_gn(p["GroupNorm_1"], h))
    h = _conv_same(p["Conv_1"], h)
    if c != out_ch or up or down:
        x = _conv_same(p["Conv_2"], x)
    return (x + h) / math.sqrt(2.0)


def _nin(p: dict[str, Any], x: Tensor) -> Tensor:
    return torch.einsum("bhwc,cd->bhwd", x, _t(p["W"])) + _t(p["b"])


def _attn_fwd(p: dict[str, Any], x: Tensor) -> Tensor:
    b, hh, ww, c = x.shape
    h = _gn(p["GroupNorm_0"], x)
    q, k, v = (_nin(p[f"NIN_{i}"], h) for i in range(3))
    w = torch.einsum("bhwc,bHWc->bhwHW", q, k) * (c**-0.5)
    w = torch.softmax(w.reshape(b, hh, ww, hh * ww), dim=-1).reshape(b, hh, ww, hh, ww)
    h = torch.einsum("bhwHW,bHWc->bhwc", w, v)
    h = _nin(p["NIN_3"], h)
    return (x + h) / math.sqrt(2.0)


def ncsnpp_forward(
    p: dict[str, Any],
    x: Tensor,
    time_cond: Tensor,
    ch_mult: tuple[int, ...],
    num_res_blocks: int,
    attn_resolutions: tuple[int, ...] = (16,),
) -> Tensor:
    """``NCSNpp.__call__(x NHWC, time_cond)`` of the released config, ``train=False``."""
    counters: dict[str, int] = {}

    def nxt(cls: str) -> dict[str, Any]:
        n = counters.get(cls, 0)
        counters[cls] = n + 1
        return p[f"{cls}_{n}"]

    wf = _t(nxt("GaussianFourierProjection")["W"])
    proj = time_cond[:, None] * wf[None, :] * 2 * math.pi
    temb = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
    d0, d1 = nxt("Dense"), nxt("Dense")
    temb = temb @ _t(d0["kernel"]) + _t(d0["bias"])
    temb = F.silu(temb) @ _t(d1["kernel"]) + _t(d1["bias"])
    nf = p["Conv_0"]["kernel"].shape[-1]
    levels = len(ch_mult)
    input_pyramid = x
    hs = [_conv_same(nxt("Conv"), x)]
    for i_level in range(levels):
        for _ in range(num_res_blocks):
            h = _resblock_fwd(
                nxt("ResnetBlockBigGANpp"), hs[-1], temb, nf * ch_mult[i_level], False, False
            )
            if h.shape[1] in attn_resolutions:
                h = _attn_fwd(nxt("AttnBlockpp"), h)
            hs.append(h)
        if i_level != levels - 1:
            h = _resblock_fwd(nxt("ResnetBlockBigGANpp"), hs[-1], temb, None, False, True)
            input_pyramid = _conv_downsample(nxt("Downsample")["Conv2d_0"], input_pyramid)
            input_pyramid = (input_pyramid + h) / math.sqrt(2.0)
            h = input_pyramid
            hs.append(h)
    h = hs[-1]
    h = _resblock_fwd(nxt("ResnetBlockBigGANpp"), h, temb, None, False, False)
    h = _attn_fwd(nxt("AttnBlockpp"), h)
    h = _resblock_fwd(nxt("ResnetBlockBigGANpp"), h, temb, None, False, False)
    for i_level in reversed(range(levels)):
        for _ in range(num_res_blocks + 1):
            h = _resblock_fwd(
                nxt("ResnetBlockBigGANpp"),
                torch.cat([h, hs.pop()], dim=-1),
                temb,
                nf * ch_mult[i_level],
                False,
                False,
            )
        if h.shape[1] in attn_resolutions:
            h = _attn_fwd(nxt("AttnBlockpp"), h)
        if i_level != 0:
            h = _resblock_fwd(nxt("ResnetBlockBigGANpp"), h, temb, None, True, False)
    assert not hs
    h = F.silu(_gn(nxt("GroupNorm"), h))
    return _conv_same(nxt("Conv"), h)


def denoiser(p: dict[str, Any], x: Tensor, t: Tensor, **arch: Any) -> Tensor:
    """``get_denoiser_fn`` (EDM scalings, ``cond_t = 0.25 ln t``) on NCHW ``x``."""
    sd = 0.5
    tt = t[:, None, None, None]
    out = ncsnpp_forward(
        p, (x / torch.sqrt(tt**2 + sd**2)).permute(0, 2, 3, 1), 0.25 * torch.log(t), **arch
    )
    out = out.permute(0, 3, 1, 2)
    return x * sd**2 / (tt**2 + sd**2) + out * tt * sd / torch.sqrt(tt**2 + sd**2)


def distiller(
    p: dict[str, Any], x: Tensor, t: Tensor, t_min: float = 0.002, **arch: Any
) -> Tensor:
    """``get_distiller_fn`` (the consistency function) on NCHW ``x``."""
    sd = 0.5
    tt = t[:, None, None, None]
    out = ncsnpp_forward(
        p, (x / torch.sqrt(tt**2 + sd**2)).permute(0, 2, 3, 1), 0.25 * torch.log(t), **arch
    )
    out = out.permute(0, 3, 1, 2)
    return x * sd**2 / ((tt - t_min) ** 2 + sd**2) + out * (tt - t_min) * sd / torch.sqrt(
        tt**2 + sd**2
    )
