"""Test-side NVlabs/edm network pickles and an independent reference forward pass.

:func:`edm_network` builds module trees with EDM's module names, parameter names and shapes
(from EDM's published architecture: ``training/networks.py`` of NVlabs/edm, described in
Karras et al. 2022, App. F), filled with random values; :func:`write_edm_pickle` pickles a
snapshot the way ``torch_utils.persistence`` does: every EDM module is a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = dict(type='class',
version=6, module_src=..., class_name=..., state=module.__dict__)`` and the snapshot is the dict
``{ema, loss_fn, augment_pipe, dataset_kwargs}``. :func:`reference_forward` evaluates
preconditioner + network from the flat EDM-named weights, written from the architecture
description, without any cmexp code.
"""

from __future__ import annotations

import math
import pickle
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODULE_SRC = "# training/networks.py of NVlabs/edm would be here; a loader must never execute it\nraise SystemExit\n"


class EDMModule(nn.Module):
    """A module that pickles as an EDM persistence record named ``class_name``."""

    def __init__(self, class_name: str, **init_kwargs: Any) -> None:
        super().__init__()
        self._edm_class = class_name
        self._init_args = ()
        self._init_kwargs = dict(init_kwargs)


def _param(*shape: int, gen: torch.Generator, scale: float = 1.0) -> nn.Parameter:
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return nn.Parameter(
        torch.randn(*shape, generator=gen) * scale / math.sqrt(max(fan_in, 1)), requires_grad=False
    )


def linear(i: int, o: int, gen: torch.Generator, bias: bool = True) -> EDMModule:
    m = EDMModule("Linear", in_features=i, out_features=o, bias=bias)
    m.in_features, m.out_features = i, o
    m.weight = _param(o, i, gen=gen)
    m.bias = (
        nn.Parameter(torch.randn(o, generator=gen) * 0.1, requires_grad=False) if bias else None
    )
    return m


def conv(
    i: int,
    o: int,
    k: int,
    gen: torch.Generator,
    up: bool = False,
    down: bool = False,
    resample_filter: Sequence[int] = (1, 1),
    fused_resample: bool = False,
) -> EDMModule:
    m = EDMModule(
        "Conv2d",
        in_channels=i,
        out_channels=o,
        kernel=k,
        up=up,
        down=down,
        resample_filter=list(resample_filter),
        fused_resample=fused_resample,
    )
    m.in_channels, m.out_channels, m.up, m.down, m.fused_resample = i, o, up, down, fused_resample
    m.weight = _param(o, i, k, k, gen=gen) if k else None
    m.bias = nn.Parameter(torch.randn(o, generator=gen) * 0.1, requires_grad=False) if k else None
    f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
    f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
    m.register_buffer("resample_filter", f if up or down else None)
    return m


def group_norm(c: int, gen: torch.Generator, eps: float = 1e-5) -> EDMModule:
    m = EDMModule("GroupNorm", num_channels=c, eps=eps)
    m.num_groups, m.eps = min(32, c // 4), eps
    m.weight = nn.Parameter(1 + 0.1 * torch.randn(c, generator=gen), requires_grad=False)
    m.bias = nn.Parameter(0.1 * torch.randn(c, generator=gen), requires_grad=False)
    return m


def unet_block(
    i: int,
    o: int,
    emb: int,
    gen: torch.Generator,
    up: bool = False,
    down: bool = False,
    attention: bool = False,
    channels_per_head: int = 64,
    num_heads: int | None = None,
    eps: float = 1e-5,
    skip_scale: float = 1.0,
    resample_filter: Sequence[int] = (1, 1),
    resample_proj: bool = False,
    adaptive_scale: bool = True,
) -> EDMModule:
    m = EDMModule(
        "UNetBlock",
        in_channels=i,
        out_channels=o,
        emb_channels=emb,
        up=up,
        down=down,
        attention=attention,
    )
    m.in_channels, m.out_channels, m.emb_channels = i, o, emb
    m.num_heads = (
        0 if not attention else num_heads if num_heads is not None else o // channels_per_head
    )
    m.dropout = 0.0
    m.skip_scale = np.float64(skip_scale)  # EDM stores np.sqrt(0.5): a numpy scalar in the pickle
    m.adaptive_scale = adaptive_scale
    m.norm0 = group_norm(i, gen, eps)
    m.conv0 = conv(i, o, 3, gen, up=up, down=down, resample_filter=resample_filter)
    m.affine = linear(emb, o * (2 if adaptive_scale else 1), gen)
    m.norm1 = group_norm(o, gen, eps)
    m.conv1 = conv(o, o, 3, gen)
    m.skip = None
    if o != i or up or down:
        kernel = 1 if resample_proj or o != i else 0
        m.skip = conv(i, o, kernel, gen, up=up, down=down, resample_filter=resample_filter)
    if m.num_heads:
        m.norm2 = group_norm(o, gen, eps)
        m.qkv = conv(o, 3 * o, 1, gen)
        m.proj = conv(o, o, 1, gen)
    return m


def song_unet(
    res: int,
    ch: int,
    gen: torch.Generator,
    label_dim: int = 0,
    augment_dim: int = 0,
    model_channels: int = 128,
    channel_mult: Sequence[int] = (2, 2, 2),
    num_blocks: int = 4,
    attn_resolutions: Sequence[int] = (16,),
    embedding_type: str = "positional",
    channel_mult_noise: int = 1,
    encoder_type: str = "standard",
    resample_filter: Sequence[int] = (1, 1),
    record_kwargs: bool = True,
) -> EDMModule:
    """EDM's SongUNet (DDPM++ / NCSN++) with its module names and shapes."""
    kwargs = {
        "img_resolution": res,
        "in_channels": ch,
        "out_channels": ch,
        "label_dim": label_dim,
        "augment_dim": augment_dim,
        "model_channels": model_channels,
        "channel_mult": list(channel_mult),
        "channel_mult_emb": 4,
        "num_blocks": num_blocks,
        "attn_resolutions": list(attn_resolutions),
        "dropout": 0.13,
        "embedding_type": embedding_type,
        "channel_mult_noise": channel_mult_noise,
        "encoder_type": encoder_type,
        "decoder_type": "standard",
        "resample_filter": list(resample_filter),
    }
    m = EDMModule("SongUNet", **(kwargs if record_kwargs else {}))
    emb_ch, noise_ch = model_channels * 4, model_channels * channel_mult_noise
    blk = {
        "emb": emb_ch,
        "gen": gen,
        "num_heads": 1,
        "skip_scale": math.sqrt(0.5),
        "eps": 1e-6,
        "resample_filter": resample_filter,
        "resample_proj": True,
        "adaptive_scale": False,
    }
    if embedding_type == "positional":
        m.map_noise = EDMModule("PositionalEmbedding", num_channels=noise_ch, endpoint=True)
    else:
        pe = EDMModule("FourierEmbedding", num_channels=noise_ch)
        pe.register_buffer("freqs", torch.randn(noise_ch // 2, generator=gen) * 16)
        m.map_noise = pe
    m.map_label = linear(label_dim, noise_ch, gen) if label_dim else None
    m.map_augment = linear(augment_dim, noise_ch, gen, bias=False) if augment_dim else None
    m.map_layer0 = linear(noise_ch, emb_ch, gen)
    m.map_layer1 = linear(emb_ch, emb_ch, gen)
    m.enc = nn.ModuleDict()
    cout = caux = ch
    for level, mult in enumerate(channel_mult):
        r = res >> level
        if level == 0:
            cin, cout = cout, model_channels
            m.enc[f"{r}x{r}_conv"] = conv(cin, cout, 3, gen)
        else:
            m.enc[f"{r}x{r}_down"] = unet_block(cout, cout, down=True, **blk)
            if encoder_type == "residual":
                m.enc[f"{r}x{r}_aux_residual"] = conv(
                    caux,
                    cout,
                    3,
                    gen,
                    down=True,
                    resample_filter=resample_filter,
                    fused_resample=True,
                )
                caux = cout
        for idx in range(num_blocks):
            cin, cout = cout, model_channels * mult
            m.enc[f"{r}x{r}_block{idx}"] = unet_block(
                cin, cout, attention=r in attn_resolutions, **blk
            )
    skips = [b.out_channels for n, b in m.enc.items() if "aux" not in n]
    m.dec = nn.ModuleDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
        r = res >> level
        if level == len(channel_mult) - 1:
            m.dec[f"{r}x{r}_in0"] = unet_block(cout, cout, attention=True, **blk)
            m.dec[f"{r}x{r}_in1"] = unet_block(cout, cout, **blk)
        else:
            m.dec[f"{r}x{r}_up"] = unet_block(cout, cout, up=True, **blk)
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            m.dec[f"{r}x{r}_block{idx}"] = unet_block(
                cin, cout, attention=idx == num_blocks and r in attn_resolutions, **blk
            )
        if level == 0:
            m.dec[f"{r}x{r}_aux_norm"] = group_norm(cout, gen, 1e-6)
            m.dec[f"{r}x{r}_aux_conv"] = conv(cout, ch, 3, gen)
    return m


def dhariwal_unet(
    res: int,
    ch: int,
    gen: torch.Generator,
    label_dim: int = 0,
    model_channels: int = 192,
    channel_mult: Sequence[int] = (1, 2, 3, 4),
    num_blocks: int = 3,
    attn_resolutions: Sequence[int] = (32, 16, 8),
) -> EDMModule:
    """EDM's DhariwalUNet (ADM) with its module names and shapes."""
    m = EDMModule(
        "DhariwalUNet",
        img_resolution=res,
        in_channels=ch,
        out_channels=ch,
        label_dim=label_dim,
        model_channels=model_channels,
        channel_mult=list(channel_mult),
        num_blocks=num_blocks,
        attn_resolutions=list(attn_resolutions),
        dropout=0.1,
    )
    emb_ch = model_channels * 4
    blk = {"emb": emb_ch, "gen": gen, "channels_per_head": 64}
    m.map_noise = EDMModule("PositionalEmbedding", num_channels=model_channels)
    m.map_augment = None
    m.map_layer0 = linear(model_channels, emb_ch, gen)
    m.map_layer1 = linear(emb_ch, emb_ch, gen)
    m.map_label = linear(label_dim, emb_ch, gen, bias=False) if label_dim else None
    m.enc = nn.ModuleDict()
    cout = ch
    for level, mult in enumerate(channel_mult):
        r = res >> level
        if level == 0:
            cin, cout = cout, model_channels * mult
            m.enc[f"{r}x{r}_conv"] = conv(cin, cout, 3, gen)
        else:
            m.enc[f"{r}x{r}_down"] = unet_block(cout, cout, down=True, **blk)
        for idx in range(num_blocks):
            cin, cout = cout, model_channels * mult
            m.enc[f"{r}x{r}_block{idx}"] = unet_block(
                cin, cout, attention=r in attn_resolutions, **blk
            )
    skips = [b.out_channels for b in m.enc.values()]
    m.dec = nn.ModuleDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
        r = res >> level
        if level == len(channel_mult) - 1:
            m.dec[f"{r}x{r}_in0"] = unet_block(cout, cout, attention=True, **blk)
            m.dec[f"{r}x{r}_in1"] = unet_block(cout, cout, **blk)
        else:
            m.dec[f"{r}x{r}_up"] = unet_block(cout, cout, up=True, **blk)
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            m.dec[f"{r}x{r}_block{idx}"] = unet_block(
                cin, cout, attention=r in attn_resolutions, **blk
            )
    m.out_norm = group_norm(cout, gen)
    m.out_conv = conv(cout, ch, 3, gen)
    return m


def precond(kind: str, net: EDMModule, res: int, ch: int, label_dim: int = 0) -> EDMModule:
    """EDMPrecond / VPPrecond / VEPrecond (or any other class name) around ``net``."""
    m = EDMModule(
        kind,
        img_resolution=res,
        img_channels=ch,
        label_dim=label_dim,
        use_fp16=False,
        model_type=net._edm_class,
    )
    m.img_resolution, m.img_channels, m.label_dim, m.use_fp16 = res, ch, label_dim, False
    if kind == "EDMPrecond":
        m.sigma_min, m.sigma_max, m.sigma_data = 0, float("inf"), 0.5
    elif kind == "VPPrecond":
        m.beta_d, m.beta_min, m.M, m.epsilon_t = 19.9, 0.1, 1000, 1e-5
        m.sigma_min = float(vp_sigma(torch.tensor(1e-5)))
        m.sigma_max = float(vp_sigma(torch.tensor(1.0)))
    elif kind == "VEPrecond":
        m.sigma_min, m.sigma_max = 0.02, 100
    m.model = net
    return m


def vp_sigma(t: Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    return ((0.5 * beta_d * t**2 + beta_min * t).exp() - 1).sqrt()


# ------------------------------------------------------------------------------------ writing
def _reconstruct_persistent_obj(meta: dict) -> None:  # pragma: no cover - never called by cmexp
    raise AssertionError("a cmexp loader called the pickled reconstruct function")


class _PersistencePickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, EDMModule):
            state = {k: v for k, v in obj.__dict__.items() if k != "_edm_class"}
            meta = {
                "type": "class",
                "version": 6,
                "module_src": MODULE_SRC,
                "class_name": obj._edm_class,
                "state": state,
            }
            return (_reconstruct_persistent_obj, (meta,))
        return NotImplemented


def fake_persistence_module() -> dict[str, types.ModuleType]:
    """``sys.modules`` entries under which the reconstruct function pickles by reference as
    ``torch_utils.persistence._reconstruct_persistent_obj`` (install with monkeypatch)."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    return {"torch_utils": pkg, "torch_utils.persistence": mod}


def write_edm_pickle(
    path: Path, ema: Any, monkeypatch: Any, dataset: str = "datasets/cifar10-32x32.zip"
) -> Path:
    """Write ``{ema, loss_fn, augment_pipe, dataset_kwargs}`` as NVlabs/edm's training loop does."""
    for name, module in fake_persistence_module().items():
        monkeypatch.setitem(sys.modules, name, module)
    loss = EDMModule("EDMLoss", P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    loss.P_mean, loss.P_std, loss.sigma_data = -1.2, 1.2, 0.5
    data = {
        "ema": ema,
        "loss_fn": loss,
        "augment_pipe": None,
        "dataset_kwargs": {
            "class_name": "training.dataset.ImageFolderDataset",
            "path": dataset,
            "use_labels": False,
        },
    }
    with open(path, "wb") as fh:
        _PersistencePickler(fh, protocol=pickle.DEFAULT_PROTOCOL).dump(data)
    return path


def edm_state(module: nn.Module) -> dict[str, Tensor]:
    """Flat EDM-named weights (``model.`` prefix dropped) of a test-side preconditioner."""
    return {
        k[len("model.") :]: v for k, v in module.state_dict().items() if k.startswith("model.")
    }


# ------------------------------------------------------------------------------ reference forward
def _conv(
    w: dict[str, Tensor],
    name: str,
    x: Tensor,
    up: bool = False,
    down: bool = False,
    taps: Sequence[int] = (1, 1),
    fused: bool = False,
) -> Tensor:
    """EDM's Conv2d: optional FIR resampling (filter outer(f,f)/sum^2; up uses 4f and a
    transposed conv), then the convolution; ``fused`` downsampling convolves first."""
    weight, bias = w.get(name + ".weight"), w.get(name + ".bias")
    f = torch.as_tensor(list(taps), dtype=x.dtype)
    f = (f.ger(f) / f.sum() ** 2)[None, None]
    fpad = (f.shape[-1] - 1) // 2
    wpad = weight.shape[-1] // 2 if weight is not None else 0
    if fused and down and weight is not None:
        x = F.conv2d(x, weight, padding=wpad + fpad)
        x = F.conv2d(x, f.tile([weight.shape[0], 1, 1, 1]), groups=weight.shape[0], stride=2)
    else:
        c = x.shape[1]
        if up:
            x = F.conv_transpose2d(x, (4 * f).tile([c, 1, 1, 1]), groups=c, stride=2, padding=fpad)
        if down:
            x = F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=fpad)
        if weight is not None:
            x = F.conv2d(x, weight, padding=wpad)
    return x + bias.reshape(1, -1, 1, 1) if bias is not None else x


def _norm(w: dict[str, Tensor], name: str, x: Tensor, eps: float) -> Tensor:
    c = x.shape[1]
    return F.group_norm(x, min(32, c // 4), w[name + ".weight"], w[name + ".bias"], eps)


def _block(
    w: dict[str, Tensor],
    name: str,
    x: Tensor,
    emb: Tensor,
    *,
    adaptive: bool,
    skip_scale: float,
    eps: float,
    taps: Sequence[int],
    up: bool = False,
    down: bool = False,
    head_channels: int | None = None,
) -> Tensor:
    orig = x
    x = _conv(w, name + ".conv0", F.silu(_norm(w, name + ".norm0", x, eps)), up, down, taps)
    params = F.linear(emb, w[name + ".affine.weight"], w[name + ".affine.bias"])[:, :, None, None]
    if adaptive:
        scale, shift = params.chunk(2, dim=1)
        x = F.silu(shift + _norm(w, name + ".norm1", x, eps) * (scale + 1))
    else:
        x = F.silu(_norm(w, name + ".norm1", x + params, eps))
    x = _conv(w, name + ".conv1", x)
    if name + ".skip.weight" in w or up or down:
        orig = _conv(w, name + ".skip", orig, up, down, taps)
    x = (x + orig) * skip_scale
    if name + ".qkv.weight" in w:
        b, c, h, wd = x.shape
        heads = 1 if head_channels is None else c // head_channels
        qkv = _conv(w, name + ".qkv", _norm(w, name + ".norm2", x, eps))
        q, k, v = qkv.reshape(b * heads, c // heads, 3, h * wd).unbind(2)
        att = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)
        a = torch.einsum("nqk,nck->ncq", att, v).reshape(b, c, h, wd)
        x = (_conv(w, name + ".proj", a) + x) * skip_scale
    return x


def song_forward(
    w: dict[str, Tensor], kw: dict[str, Any], x: Tensor, noise: Tensor, onehot: Tensor | None
) -> Tensor:
    """EDM's SongUNet forward on EDM-named weights ``w`` (a fresh implementation)."""
    res, nb, taps = kw["img_resolution"], kw["num_blocks"], kw["resample_filter"]
    blk = {"adaptive": False, "skip_scale": math.sqrt(0.5), "eps": 1e-6, "taps": taps}
    if kw["embedding_type"] == "positional":
        n = w["map_layer0.weight"].shape[1]
        freqs = (1 / 10000) ** (torch.arange(n // 2, dtype=torch.float32) / (n // 2 - 1))
        arg = noise.float()[:, None] * freqs[None]
        emb = torch.cat([arg.sin(), arg.cos()], dim=1)
    else:
        arg = noise.float()[:, None] * (2 * math.pi * w["map_noise.freqs"])[None]
        emb = torch.cat([arg.sin(), arg.cos()], dim=1)
    if onehot is not None:
        emb = emb + F.linear(
            onehot * math.sqrt(onehot.shape[1]), w["map_label.weight"], w["map_label.bias"]
        )
    emb = F.silu(F.linear(emb, w["map_layer0.weight"], w["map_layer0.bias"]))
    emb = F.silu(F.linear(emb, w["map_layer1.weight"], w["map_layer1.bias"]))
    skips, aux, h = [], x, x
    levels = len(kw["channel_mult"])
    for level in range(levels):
        r = res >> level
        if level == 0:
            h = _conv(w, f"enc.{r}x{r}_conv", h)
            skips.append(h)
        else:
            h = _block(w, f"enc.{r}x{r}_down", h, emb, down=True, **blk)
            skips.append(h)
            if kw["encoder_type"] == "residual":
                h = skips[-1] = aux = (
                    h
                    + _conv(w, f"enc.{r}x{r}_aux_residual", aux, down=True, taps=taps, fused=True)
                ) / math.sqrt(2)
        for i in range(nb):
            h = _block(w, f"enc.{r}x{r}_block{i}", h, emb, **blk)
            skips.append(h)
    for level in reversed(range(levels)):
        r = res >> level
        if level == levels - 1:
            h = _block(w, f"dec.{r}x{r}_in0", h, emb, **blk)
            h = _block(w, f"dec.{r}x{r}_in1", h, emb, **blk)
        else:
            h = _block(w, f"dec.{r}x{r}_up", h, emb, up=True, **blk)
        for i in range(nb + 1):
            h = _block(w, f"dec.{r}x{r}_block{i}", torch.cat([h, skips.pop()], dim=1), emb, **blk)
    return _conv(
        w, f"dec.{res}x{res}_aux_conv", F.silu(_norm(w, f"dec.{res}x{res}_aux_norm", h, 1e-6))
    )


def dhariwal_forward(
    w: dict[str, Tensor], kw: dict[str, Any], x: Tensor, noise: Tensor, onehot: Tensor | None
) -> Tensor:
    """EDM's DhariwalUNet (ADM) forward on EDM-named weights ``w`` (a fresh implementation)."""
    res, nb = kw["img_resolution"], kw["num_blocks"]
    blk = {"adaptive": True, "skip_scale": 1.0, "eps": 1e-5, "taps": (1, 1), "head_channels": 64}
    n = kw["model_channels"]
    freqs = (1 / 10000) ** (torch.arange(n // 2, dtype=torch.float32) / (n // 2))
    arg = noise.float()[:, None] * freqs[None]
    emb = torch.cat([arg.cos(), arg.sin()], dim=1)
    emb = F.silu(F.linear(emb, w["map_layer0.weight"], w["map_layer0.bias"]))
    emb = F.linear(emb, w["map_layer1.weight"], w["map_layer1.bias"])
    if onehot is not None:
        emb = emb + F.linear(onehot, w["map_label.weight"])
    emb = F.silu(emb)
    skips, h = [], x
    levels = len(kw["channel_mult"])
    for level in range(levels):
        r = res >> level
        h = (
            _conv(w, f"enc.{r}x{r}_conv", h)
            if level == 0
            else _block(w, f"enc.{r}x{r}_down", h, emb, down=True, **blk)
        )
        skips.append(h)
        for i in range(nb):
            h = _block(w, f"enc.{r}x{r}_block{i}", h, emb, **blk)
            skips.append(h)
    for level in reversed(range(levels)):
        r = res >> level
        if level == levels - 1:
            h = _block(w, f"dec.{r}x{r}_in0", h, emb, **blk)
            h = _block(w, f"dec.{r}x{r}_in1", h, emb, **blk)
        else:
            h = _block(w, f"dec.{r}x{r}_up", h, emb, up=True, **blk)
        for i in range(nb + 1):
            h = _block(w, f"dec.{r}x{r}_block{i}", torch.cat([h, skips.pop()], dim=1), emb, **blk)
    return _conv(w, "out_conv", F.silu(_norm(w, "out_norm", h, 1e-5)))


def reference_forward(
    kind: str,
    arch: str,
    w: dict[str, Tensor],
    kw: dict[str, Any],
    x: Tensor,
    sigma: Tensor,
    labels: Tensor | None = None,
    label_dim: int = 0,
) -> Tensor:
    """EDM's preconditioned denoiser D(x, sigma) (EDM Table 1) on EDM-named weights."""
    s = sigma.reshape(-1, 1, 1, 1)
    if kind == "EDMPrecond":
        sd = 0.5
        c_skip, c_out, c_in = (
            sd**2 / (s**2 + sd**2),
            s * sd / (s**2 + sd**2).sqrt(),
            1 / (sd**2 + s**2).sqrt(),
        )
        c_noise = sigma.log() / 4
    elif kind == "VPPrecond":
        c_skip, c_out, c_in = 1, -s, 1 / (s**2 + 1).sqrt()
        t = ((0.1**2 + 2 * 19.9 * (1 + sigma**2).log()).sqrt() - 0.1) / 19.9
        c_noise = 999 * t
    else:
        c_skip, c_out, c_in = 1, s, 1
        c_noise = (0.5 * sigma).log()
    onehot = None
    if label_dim:
        onehot = (
            torch.zeros(x.shape[0], label_dim)
            if labels is None
            else F.one_hot(labels, label_dim).float()
        )
    fwd = song_forward if arch == "SongUNet" else dhariwal_forward
    return c_skip * x + c_out * fwd(w, kw, c_in * x, c_noise, onehot)
