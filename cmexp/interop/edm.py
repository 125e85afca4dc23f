"""NVlabs/edm network pickles (``edm-*.pkl``, ``baseline-*-{vp,ve}.pkl``) as cmexp models.

A snapshot is a pickled dict whose ``"ema"`` entry is a preconditioner (``EDMPrecond``,
``VPPrecond``, ``VEPrecond``) holding the raw network in ``model`` (``SongUNet`` for DDPM++ /
NCSN++, ``DhariwalUNet`` for ADM). It is read with :mod:`cmexp.interop.safe_pickle` (no code
from the file runs), its state dict is mapped onto :class:`cmexp.nets.SongUNet` /
:class:`cmexp.nets.ADMUNet` key by key (every key of the pickle is used or named), and the
preconditioner becomes the matching wrapper of :mod:`cmexp.diffusion.precond`:

=============  =======================================  ================================
EDM class      c_noise                                  cmexp wrapper
=============  =======================================  ================================
EDMPrecond     ln(sigma) / 4                            EDMPrecond, c_noise_scale 0.25
VPPrecond      (M - 1) t(sigma)  (linear-beta VP SDE)   VPSDEPrecond(beta_d, beta_min, M)
VEPrecond      ln(sigma / 2)                            VESDEPrecond
=============  =======================================  ================================

Layout differences handled here (the forward passes are otherwise the same; see
``tests/unit/test_interop_edm.py`` for the check against an independent reference):

* DDPM++'s positional embedding spaces its frequencies with ``endpoint=True``
  (``SongUNet(positional_endpoint=True)``); both nets put sin before cos.
* EDM's attention ``qkv`` channels are ordered (head, channel, q|k|v); cmexp's (q|k|v, head,
  channel): the weights are permuted.
* EDM's class embedding is a Linear on one-hot labels (SongUNet scales them by
  sqrt(label_dim)); cmexp's is an ``nn.Embedding`` with a null row: row i = the Linear's
  output for label i, the null row = its output for the zero vector (EDM's "no label").
* ``map_augment`` (the augmentation-label input, unused when sampling) is dropped; the
  ``resample_filter`` buffers are checked against the net's filter and dropped.

Not supported (named in the error): ``iDDPMPrecond`` (``baseline-imagenet-64x64-cond-adm.pkl``,
a 1000-step discrete schedule), SongUNet with ``encoder_type='skip'`` or ``decoder_type='skip'``,
and DhariwalUNet with ``channel_mult_emb != 4``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cmexp.interop.safe_pickle import (
    PersistentRecord,
    UnsupportedPickleError,
    child,
    module_state,
    safe_load,
)

SUPPORTED = (
    "NVlabs/edm network pickles: EDMPrecond, VPPrecond or VEPrecond around SongUNet (DDPM++, "
    "NCSN++) or DhariwalUNet (ADM), e.g. edm-cifar10-32x32-uncond-vp.pkl, "
    "edm-imagenet-64x64-cond-adm.pkl, baseline-cifar10-32x32-uncond-ve.pkl"
)

#: NVlabs/edm constructor defaults (training/networks.py), used where a pickle's recorded
#: init kwargs leave a value out.
SONGUNET_DEFAULTS: dict[str, Any] = {
    "label_dim": 0,
    "augment_dim": 0,
    "model_channels": 128,
    "channel_mult": [1, 2, 2, 2],
    "channel_mult_emb": 4,
    "num_blocks": 4,
    "attn_resolutions": [16],
    "dropout": 0.10,
    "embedding_type": "positional",
    "channel_mult_noise": 1,
    "encoder_type": "standard",
    "decoder_type": "standard",
    "resample_filter": [1, 1],
}
DHARIWAL_DEFAULTS: dict[str, Any] = {
    "label_dim": 0,
    "augment_dim": 0,
    "model_channels": 192,
    "channel_mult": [1, 2, 3, 4],
    "channel_mult_emb": 4,
    "num_blocks": 3,
    "attn_resolutions": [32, 16, 8],
    "dropout": 0.10,
}
PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond")

#: EDM's sampler range (generate.py): sigma in [max(0.002, net.sigma_min), min(80, net.sigma_max)].
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0


@dataclass
class Converted:
    """A foreign model converted to cmexp's terms: ``meta`` (as ``checkpoint["cmexp"]``),
    the run-config-like ``config`` (``net``, maybe ``dataset``) and the raw net's weights."""

    meta: dict[str, Any]
    config: dict[str, Any]
    weights: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)


def _number(state: dict[str, Any], name: str, default: float | None = None) -> float:
    value = state.get(name, default)
    if isinstance(value, Tensor):
        value = value.item()
    if value is None:
        raise UnsupportedPickleError(f"the preconditioner records no {name}")
    return float(value)


def read_edm_pickle(path: Path) -> Converted:
    """Read an NVlabs/edm snapshot pickle (or a pickled preconditioner alone) safely and
    convert it. Raises ``UnsafePickleError`` / ``UnsupportedPickleError`` naming what it found."""
    data = safe_load(path)
    record = data.get("ema") if isinstance(data, dict) else data
    if not isinstance(record, PersistentRecord):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise UnsupportedPickleError(
            f"no network found (a pickle holding {found}; expected an EDM snapshot with 'ema')"
        )
    if record.class_name not in PRECONDS:
        hint = (
            " (iDDPM's discrete 1000-step schedule)" if record.class_name == "iDDPMPrecond" else ""
        )
        raise UnsupportedPickleError(
            f"its network is a {record.class_name}{hint}; supported: {', '.join(PRECONDS)}"
        )
    inner = child(record, "model")
    if not isinstance(inner, PersistentRecord) or inner.class_name not in (
        "SongUNet",
        "DhariwalUNet",
    ):
        name = getattr(inner, "class_name", type(inner).__name__)
        raise UnsupportedPickleError(
            f"its {record.class_name} wraps a {name}; supported networks: SongUNet (DDPM++, NCSN++), DhariwalUNet (ADM)"
        )
    state = record.state
    res, channels = int(_number(state, "img_resolution")), int(_number(state, "img_channels"))
    label_dim = int(_number(state, "label_dim", 0))
    edm_weights = module_state(inner)
    kwargs = {
        **(SONGUNET_DEFAULTS if inner.class_name == "SongUNet" else DHARIWAL_DEFAULTS),
        **inner.init_kwargs,
    }
    if inner.class_name == "SongUNet":
        net_cfg, weights, notes = convert_songunet(edm_weights, kwargs, res, channels, label_dim)
    else:
        net_cfg, weights, notes = convert_dhariwal(edm_weights, kwargs, res, channels, label_dim)

    if record.class_name == "EDMPrecond":
        sigma_data = _number(state, "sigma_data", 0.5)
        lo, hi = _number(state, "sigma_min", 0.0), _number(state, "sigma_max", math.inf)
        precond: dict[str, Any] = {"name": "edm"}
        c_noise_scale = 0.25
    elif record.class_name == "VPPrecond":
        sigma_data, c_noise_scale = 0.5, 1.0
        lo, hi = _number(state, "sigma_min"), _number(state, "sigma_max")
        precond = {
            "name": "vp_sde",
            "beta_d": _number(state, "beta_d"),
            "beta_min": _number(state, "beta_min"),
            "M": int(_number(state, "M")),
        }
    else:
        sigma_data, c_noise_scale = 0.5, 1.0
        lo, hi = _number(state, "sigma_min"), _number(state, "sigma_max")
        precond = {"name": "ve_sde"}
    meta = {
        "kind": "edm",
        "sigma_min": max(EDM_SIGMA_MIN, lo),
        "sigma_max": min(EDM_SIGMA_MAX, hi),
        "sigma_data": sigma_data,
        "c_noise_scale": c_noise_scale,
        "rho": 7.0,
        "num_scales": 18
        if res <= 32
        else 40,  # EDM's deterministic sampler: 18 (CIFAR-10), 40 (64x64)
        "taus": [],
        "sampler": "heun",
        "img_resolution": res,
        "img_channels": channels,
        "label_dim": label_dim,
        "precond": precond,
        "source_format": "nvlabs-edm-pickle",
        "source_network": f"{record.class_name}({inner.class_name})",
        "source_sigma_range": [lo, hi],
    }
    return Converted(meta, {"net": net_cfg}, weights, notes)


# ---------------------------------------------------------------------------------- mapping
class _Take:
    """Hands out the pickle's tensors by name and remembers which were used."""

    def __init__(self, weights: dict[str, Tensor]) -> None:
        self.weights, self.used = weights, set()

    def __call__(self, name: str) -> Tensor:
        if name not in self.weights:
            raise UnsupportedPickleError(
                f"the pickle lacks model.{name}, which this network needs"
            )
        self.used.add(name)
        return self.weights[name].float()

    def leftover(self, ignorable: tuple[str, ...]) -> list[str]:
        return sorted(k for k in self.weights if k not in self.used and not k.endswith(ignorable))


def _qkv_to_cmexp(t: Tensor, heads: int) -> Tensor:
    """EDM's (head, channel, q|k|v) output order -> cmexp's (q|k|v, head, channel)."""
    c3 = t.shape[0]
    d = c3 // (3 * heads)
    rest = t.shape[1:]
    return (
        t.reshape(heads, d, 3, *rest).permute(2, 0, 1, *range(3, 3 + len(rest))).reshape(c3, *rest)
    )


def _filter_2d(taps: list[float]) -> Tensor:
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def _check_filters(weights: dict[str, Tensor], taps: list[float]) -> None:
    want = _filter_2d(taps)
    for name, value in weights.items():
        if name.endswith(".resample_filter") and not torch.allclose(
            value.float().reshape(want.shape), want
        ):
            raise UnsupportedPickleError(
                f"model.{name} is not the filter {taps} its network records"
            )


def _fit(name: str, value: Tensor, ref: Tensor) -> Tensor:
    if value.shape != ref.shape:
        if value.numel() == ref.numel() and value.squeeze().shape == ref.squeeze().shape:
            return value.reshape(ref.shape)
        raise UnsupportedPickleError(
            f"model.{name} has shape {tuple(value.shape)} but its recorded architecture needs {tuple(ref.shape)}"
        )
    return value


def _finish(take: _Take, ignorable: tuple[str, ...], notes: list[str]) -> None:
    extra = take.leftover(ignorable)
    if extra:
        raise UnsupportedPickleError(
            f"the pickle has model.{extra[0]}{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}, which its "
            "recorded architecture does not have"
        )
    if any(k.startswith("map_augment.") for k in take.weights):
        notes.append("map_augment (augmentation labels, unused when sampling) dropped")


_RES_PARTS = {
    "norm0": "norm0",
    "conv0": "conv0",
    "emb": "affine",
    "norm1": "norm1",
    "conv1": "conv1",
    "skip": "skip",
}
_ATTN_PARTS = {"norm": "norm2", "qkv": "qkv", "proj": "proj"}


def songunet_edm_name(key: str, resolution: int, levels: int, num_blocks: int) -> str:
    """The NVlabs/edm ``SongUNet`` name of a :class:`cmexp.nets.SongUNet` state-dict key."""
    parts = key.split(".")
    tail = ".".join(parts[1:])

    def rr(level: int) -> str:
        r = resolution >> level
        return f"{r}x{r}"

    def res_part(rest: list[str]) -> str:
        return ".".join([_RES_PARTS[rest[0]], *rest[1:]])

    def attn_part(rest: list[str]) -> str:
        return ".".join([_ATTN_PARTS[rest[0]], *rest[1:]])

    head = parts[0]
    if head == "noise_embed":
        return "map_noise." + tail
    if head in ("map0", "map1"):
        return f"map_layer{head[-1]}." + tail
    if head == "conv_in":
        return f"enc.{rr(0)}_conv." + tail
    if head == "enc_blocks":
        return f"enc.{rr(int(parts[1]))}_block{parts[2]}." + res_part(parts[3:])
    if head == "enc_attn":
        return f"enc.{rr(int(parts[1]))}_block{parts[2]}." + attn_part(parts[3:])
    if head == "enc_down":
        return f"enc.{rr(int(parts[1]) + 1)}_down." + res_part(parts[2:])
    if head == "enc_aux":  # enc_aux.L.conv.weight
        return f"enc.{rr(int(parts[1]) + 1)}_aux_residual." + ".".join(parts[3:])
    if head in ("mid0", "mid1"):
        return f"dec.{rr(levels - 1)}_in{head[-1]}." + res_part(parts[1:])
    if head == "mid_attn":
        return f"dec.{rr(levels - 1)}_in0." + attn_part(parts[1:])
    if head == "dec_blocks":
        return f"dec.{rr(levels - 1 - int(parts[1]))}_block{parts[2]}." + res_part(parts[3:])
    if head == "dec_attn":
        return f"dec.{rr(levels - 1 - int(parts[1]))}_block{num_blocks}." + attn_part(parts[2:])
    if head == "dec_up":
        return f"dec.{rr(levels - 2 - int(parts[1]))}_up." + res_part(parts[2:])
    if head == "norm_out":
        return f"dec.{rr(0)}_aux_norm." + tail
    if head == "conv_out":
        return f"dec.{rr(0)}_aux_conv." + tail
    raise UnsupportedPickleError(f"no EDM name for {key}")


def convert_songunet(
    edm: dict[str, Tensor], kw: dict[str, Any], res: int, channels: int, label_dim: int
) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
    """EDM ``SongUNet`` weights -> (``net`` config of :class:`cmexp.nets.SongUNet`, its state
    dict, notes)."""
    from cmexp.nets.unet import SongUNet

    if kw["encoder_type"] not in ("standard", "residual") or kw["decoder_type"] != "standard":
        raise UnsupportedPickleError(
            f"its SongUNet uses encoder_type={kw['encoder_type']!r}, decoder_type={kw['decoder_type']!r}; supported: "
            "encoder_type 'standard' (DDPM++) or 'residual' (NCSN++) with decoder_type 'standard'"
        )
    if (
        int(kw.get("in_channels", channels)) != channels
        or int(kw.get("out_channels", channels)) != channels
    ):
        raise UnsupportedPickleError("its SongUNet has different input and output channel counts")
    net_cfg: dict[str, Any] = {
        "_target_": "cmexp.nets.SongUNet",
        "img_resolution": res,
        "img_channels": channels,
        "label_dim": label_dim,
        "model_channels": int(kw["model_channels"]),
        "channel_mult": [int(m) for m in kw["channel_mult"]],
        "num_blocks": int(kw["num_blocks"]),
        "attn_resolutions": [int(r) for r in kw["attn_resolutions"]],
        "dropout": float(kw["dropout"]),
        "embedding_type": str(kw["embedding_type"]),
        "fourier_scale": 16.0,
        "noise_channels_mult": int(kw["channel_mult_noise"]),
        "emb_channels_mult": int(kw["channel_mult_emb"]),
        "resample_filter": [float(f) for f in kw["resample_filter"]],
        "progressive_input": "residual" if kw["encoder_type"] == "residual" else "none",
        "skip_rescale": True,
        "init_scale": 0.0,
        "num_heads": 1,
        "positional_endpoint": kw["embedding_type"] == "positional",
    }
    with torch.device("meta"):
        ref = SongUNet(**{k: v for k, v in net_cfg.items() if k != "_target_"}).state_dict()
    take, out, notes = _Take(edm), {}, []
    levels, nb = len(net_cfg["channel_mult"]), net_cfg["num_blocks"]
    for key, target in ref.items():
        if key == "label_embed.weight":
            w, b = take("map_label.weight"), take("map_label.bias")  # [noise_ch, L], [noise_ch]
            if w.shape[1] != label_dim:
                raise UnsupportedPickleError(
                    f"model.map_label.weight has {w.shape[1]} classes, the network records {label_dim}"
                )
            rows = w.t() * math.sqrt(label_dim) + b  # EDM feeds one-hot labels x sqrt(label_dim)
            out[key] = _fit("map_label.weight", torch.cat([rows, b[None]]), target)
            continue
        name = songunet_edm_name(key, res, levels, nb)
        value = _fit(name, take(name), target)
        if name.split(".")[-2] == "qkv":
            value = _qkv_to_cmexp(value, 1)
        out[key] = value
    _check_filters(edm, net_cfg["resample_filter"])
    _finish(take, (".resample_filter", "map_augment.weight"), notes)
    return net_cfg, out, notes


def dhariwal_edm_names(kw: dict[str, Any], res: int) -> dict[str, str]:
    """``{ADMUNet module prefix: EDM DhariwalUNet prefix}`` for every block, following both
    constructions: residual blocks map to ``{prefix}`` (ResBlock parts), attention to
    ``{prefix}#attn`` (the attention parts of the same EDM block)."""
    mults, nb, attn = (
        [int(m) for m in kw["channel_mult"]],
        int(kw["num_blocks"]),
        set(kw["attn_resolutions"]),
    )
    names: dict[str, str] = {"input_blocks.0.0": f"enc.{res}x{res}_conv"}
    k, r = 1, res
    for level in range(len(mults)):
        if level > 0:
            r //= 2
            names[f"input_blocks.{k}.0"] = f"enc.{r}x{r}_down"
            k += 1
        for i in range(nb):
            names[f"input_blocks.{k}.0"] = f"enc.{r}x{r}_block{i}"
            if r in attn:
                names[f"input_blocks.{k}.1"] = f"enc.{r}x{r}_block{i}#attn"
            k += 1
    names["middle_block.0"] = f"dec.{r}x{r}_in0"
    names["middle_block.1"] = f"dec.{r}x{r}_in0#attn"
    names["middle_block.2"] = f"dec.{r}x{r}_in1"
    k = 0
    for level in reversed(range(len(mults))):
        for i in range(nb + 1):
            names[f"output_blocks.{k}.0"] = f"dec.{r}x{r}_block{i}"
            j = 1
            if r in attn:
                names[f"output_blocks.{k}.1"] = f"dec.{r}x{r}_block{i}#attn"
                j = 2
            if level and i == nb:
                names[f"output_blocks.{k}.{j}"] = f"dec.{2 * r}x{2 * r}_up"
            k += 1
        r *= 2
    return names


_ADM_RES = {
    "in_layers.0": "norm0",
    "in_layers.2": "conv0",
    "emb_layers.1": "affine",
    "out_layers.0": "norm1",
    "out_layers.3": "conv1",
    "skip_connection": "skip",
}
_ADM_ATTN = {"norm": "norm2", "qkv": "qkv", "proj_out": "proj"}


def convert_dhariwal(
    edm: dict[str, Tensor], kw: dict[str, Any], res: int, channels: int, label_dim: int
) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
    """EDM ``DhariwalUNet`` weights -> (``net`` config of :class:`cmexp.nets.ADMUNet`, its
    state dict, notes)."""
    from cmexp.nets.adm import ADMUNet

    if int(kw["channel_mult_emb"]) != 4:
        raise UnsupportedPickleError(
            f"its DhariwalUNet has channel_mult_emb={kw['channel_mult_emb']}; supported: 4 (ADM)"
        )
    net_cfg: dict[str, Any] = {
        "_target_": "cmexp.nets.ADMUNet",
        "img_resolution": res,
        "img_channels": channels,
        "label_dim": label_dim,
        "model_channels": int(kw["model_channels"]),
        "channel_mult": [int(m) for m in kw["channel_mult"]],
        "num_blocks": int(kw["num_blocks"]),
        "attn_resolutions": [int(r) for r in kw["attn_resolutions"]],
        "num_heads": 1,
        "num_head_channels": 64,
        "dropout": float(kw["dropout"]),
        "use_scale_shift_norm": True,
        "resblock_updown": True,
    }
    with torch.device("meta"):
        net = ADMUNet(**{k: v for k, v in net_cfg.items() if k != "_target_"})
    ref = net.state_dict()
    names = dhariwal_edm_names(kw, res)
    fixed = {
        "time_embed.0": "map_layer0",
        "time_embed.2": "map_layer1",
        "out.0": "out_norm",
        "out.2": "out_conv",
    }
    take, out, notes = _Take(edm), {}, []
    for key, target in ref.items():
        if key == "label_emb.weight":
            w = take("map_label.weight")  # [emb, L], no bias; one-hot labels
            out[key] = _fit("map_label.weight", w.t(), target)
            continue
        module, _, param = key.rpartition(".")
        if module in fixed:
            name = f"{fixed[module]}.{param}"
        else:
            depth = (
                2 if module.startswith("middle_block.") else 3
            )  # middle_block.J, input_blocks.K.J
            block = ".".join(module.split(".")[:depth])
            part = module[len(block) + 1 :]
            edm_block = names.get(block)
            if edm_block is None:
                raise UnsupportedPickleError(f"no EDM block for {key}")
            if block == "input_blocks.0.0":
                name = f"{edm_block}.{param}"
            elif edm_block.endswith("#attn"):
                name = f"{edm_block[:-5]}.{_ADM_ATTN[part]}.{param}"
            else:
                name = f"{edm_block}.{_ADM_RES[part]}.{param}"
        value = _fit(name, take(name), target)
        if module.endswith(".qkv"):
            heads = target.shape[0] // 3 // 64
            value = _qkv_to_cmexp(value, heads)
        out[key] = value
    _check_filters(edm, [1, 1])
    _finish(take, (".resample_filter", "map_augment.weight"), notes)
    return net_cfg, out, notes
