"""Export a consistency model to a diffusers ``ConsistencyModelPipeline`` folder
(``python -m cmexp.export ckpt=... format=diffusers out=DIR``).

The folder holds a ``UNet2DModel`` (``unet/``) and a ``CMStochasticIterativeScheduler``
(``scheduler/``), as diffusers' own conversion of openai/consistency_models does; it loads with
``ConsistencyModelPipeline.from_pretrained(DIR)`` and needs nothing from cmexp.

What is exactly representable there, and therefore what exports:

* the wrapper: CM's boundary scalings (``CMPrecond``: kinds cd, ct, ect) with the time input
  ``c_noise = 250 ln(sigma + 1e-44)``, which is what the scheduler feeds the UNet
  (``1000 * 0.25 * log(sigma + 1e-44)``): ``c_noise_scale = 250``, the value of
  openai/consistency_models (``model.precond.c_noise_scale=250``). Other scales, EDM/PD denoisers and
  the TrigFlow models (sct, scd) do not export.
* the network: :class:`cmexp.nets.ADMUNet` (guided-diffusion's UNet), which ``UNet2DModel``
  mirrors block for block, when its GroupNorms share one group count, its attention heads one
  width, and the sinusoid width equals the first level's width (``channel_mult[0] = 1``).
  ``SongUNet`` (NCSN++/DDPM++) and ``TinyUNet`` have no exact counterpart (UNet2DModel has no
  1/sqrt(2) residual scaling, and its Fourier time input is a score model's).

diffusers is imported only here, when an export runs.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor, nn

#: The scheduler's time input: ``1000 * 0.25 * ln(sigma + 1e-44)`` (``sigma_to_t``).
DIFFUSERS_C_NOISE_SCALE = 250.0

EXPORTS = (
    "format=diffusers exports ADMUNet consistency models (kind cd, ct or ect) with c_noise_scale=250: "
    "net=adm_imagenet64 / adm_lsun256 runs with model.precond.c_noise_scale=250, openai/consistency_models cd_*/ct_* files"
)

_RES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _net_name(net: nn.Module) -> str:
    name = type(net).__name__
    if name == "SongUNet":
        fourier = type(getattr(net, "noise_embed", None)).__name__ == "GaussianFourierEmbedding"
        kind = "NCSN++" if fourier else "DDPM++"
        return f"SongUNet ({kind})"
    return name


def check_exportable(model: nn.Module, kind: str, source: str, key: str = "ckpt") -> None:
    """Raise a one-line ValueError naming ``key`` and what exports when ``model`` (a loaded
    preconditioned network of ``kind``) has no exact diffusers counterpart."""
    from cmexp.diffusion.precond import CMPrecond
    from cmexp.nets.adm import ADMAttention, ADMUNet

    where = f"format=diffusers: {key}={source}"
    if kind not in ("cd", "ct", "ect") or not isinstance(model, CMPrecond):
        why = {
            "sct": "a TrigFlow model (sCT), which CMStochasticIterativeScheduler's c_skip/c_out cannot express",
            "scd": "a TrigFlow model (sCD), which CMStochasticIterativeScheduler's c_skip/c_out cannot express",
        }.get(kind, f"a '{kind}' model, not a consistency model")
        raise ValueError(f"{where} is {why}; {EXPORTS}")
    net = model.net
    if not isinstance(net, ADMUNet):
        why = (
            " (no 1/sqrt(2) residual scaling, FIR resampling or NCSN++ Fourier input there)"
            if type(net).__name__ == "SongUNet"
            else ""
        )
        raise ValueError(  # noqa: TRY004 - a user error (exit 2)
            f"{where} uses {_net_name(net)}, which diffusers' UNet2DModel cannot represent exactly{why}; {EXPORTS}"
        )
    if model.c_noise_scale != DIFFUSERS_C_NOISE_SCALE:
        raise ValueError(
            f"{where} was trained with c_noise_scale={model.c_noise_scale:g}, but "
            f"CMStochasticIterativeScheduler feeds the UNet 250 ln(sigma) (c_noise_scale=250); {EXPORTS}"
        )
    if net.input_blocks[0][0].out_channels != net.model_channels:
        raise ValueError(
            f"{where}: UNet2DModel ties the time sinusoid width to the first level's width, so "
            "ADMUNet's channel_mult must start with 1"
        )
    groups = {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}
    if len(groups) != 1:
        raise ValueError(
            f"{where}: its GroupNorms use {sorted(groups)} groups, UNet2DModel one count for all; "
            "use widths divisible by 32 (net.model_channels x net.channel_mult)"
        )
    heads = {
        m.qkv.out_channels // 3 // m.num_heads
        for m in net.modules()
        if isinstance(m, ADMAttention)
    }
    if len(heads) != 1:
        raise ValueError(
            f"{where}: its attention heads are {sorted(heads)} channels wide, UNet2DModel's one width "
            "(use net.num_head_channels instead of net.num_heads)"
        )


def _levels(net: nn.Module) -> tuple[list[list[Any]], list[list[Any]]]:
    """ADMUNet's input/output blocks grouped by level: ``down[l]`` = the level's
    ``(resblock, attention | None)`` pairs then its downsampler (or None at the last level);
    ``up[u]`` likewise from the lowest resolution, with its upsampler."""
    from cmexp.nets.adm import ADMAttention

    def resample(m: nn.Module) -> str:
        mode = getattr(m, "mode", None) or getattr(getattr(m, "h_upd", None), "mode", "none")
        return str(mode)

    down: list[list[Any]] = [[]]
    for block in list(net.input_blocks)[1:]:
        if resample(block[0]) == "down":
            down[-1].append(block[0])
            down.append([])
        else:
            down[-1].append((block[0], block[1] if len(block) > 1 else None))
    down[-1].append(None)
    up: list[list[Any]] = [[]]
    for block in net.output_blocks:
        layers = list(block)
        sampler = layers.pop() if len(layers) > 1 and resample(layers[-1]) == "up" else None
        attn = layers[1] if len(layers) > 1 and isinstance(layers[1], ADMAttention) else None
        up[-1].append((layers[0], attn))
        if sampler is not None:
            up[-1].append(sampler)
            up.append([])
    up[-1].append(None)
    return down, up


def unet_config(net: nn.Module) -> dict[str, Any]:
    """``UNet2DModel`` keyword arguments for an exportable ADMUNet (see :func:`check_exportable`)."""
    from cmexp.nets.adm import ADMAttention, ADMResBlock

    down, _ = _levels(net)
    widths, types_down, types_up = [], [], []
    resnet_updown = True
    for level in down:
        pairs, sampler = level[:-1], level[-1]
        widths.append(pairs[-1][0].out_layers[3].out_channels)
        attn = pairs[-1][1] is not None
        if sampler is not None and not isinstance(sampler, ADMResBlock):
            resnet_updown = False
        types_down.append("AttnDownBlock2D" if attn else "ResnetDownsampleBlock2D")
        types_up.append("AttnUpBlock2D" if attn else "ResnetUpsampleBlock2D")
    if not resnet_updown:  # stride-2 / nearest+conv resampling: the conv blocks
        types_down = [t if t.startswith("Attn") else "DownBlock2D" for t in types_down]
        types_up = [t if t.startswith("Attn") else "UpBlock2D" for t in types_up]
    first_res = next(m for m in net.modules() if isinstance(m, ADMResBlock))
    attn = next(m for m in net.modules() if isinstance(m, ADMAttention))
    groups = next(m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm))
    return {
        "sample_size": net.img_resolution,
        "in_channels": net.img_channels,
        "out_channels": net.img_channels,
        "time_embedding_type": "positional",
        "time_embedding_dim": net.time_embed[0].out_features,
        "flip_sin_to_cos": True,  # ADM: [cos, sin]
        "freq_shift": 0,
        "block_out_channels": widths,
        "layers_per_block": len(down[0]) - 1,
        "down_block_types": types_down,
        "up_block_types": list(reversed(types_up)),
        "downsample_type": "resnet" if resnet_updown else "conv",
        "upsample_type": "resnet" if resnet_updown else "conv",
        "downsample_padding": 1,
        "dropout": float(first_res.out_layers[2].p),
        "attention_head_dim": attn.qkv.out_channels // 3 // attn.num_heads,
        "norm_num_groups": groups,
        "attn_norm_num_groups": groups,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if first_res.use_scale_shift_norm else "default",
        "num_class_embeds": net.label_dim or None,
        "mid_block_type": "UNetMidBlock2D",
        "add_attention": True,
        "center_input_sample": False,
    }


def _put(out: dict[str, Tensor], prefix: str, module: nn.Module) -> None:
    """``module``'s tensors under diffusers' names at ``prefix`` (resblock, attention, resampling
    conv or a plain layer)."""
    from cmexp.nets.adm import ADMAttention, ADMResBlock, ConvResample

    state = module.state_dict()
    if isinstance(module, ADMResBlock):
        for k, v in state.items():
            layer, _, leaf = k.rpartition(".")
            out[f"{prefix}.{_RES[layer]}.{leaf}"] = v
    elif isinstance(module, ADMAttention):
        c = module.qkv.in_channels
        for leaf in ("weight", "bias"):
            out[f"{prefix}.group_norm.{leaf}"] = state[f"norm.{leaf}"]
            q, k, v = state[f"qkv.{leaf}"].reshape(3, c, -1).unbind(0)  # (q|k|v, head, channel)
            for name, t in (("to_q", q), ("to_k", k), ("to_v", v)):
                out[f"{prefix}.{name}.{leaf}"] = (
                    t.reshape(c, c) if leaf == "weight" else t.reshape(c)
                )
            proj = state[f"proj_out.{leaf}"]
            out[f"{prefix}.to_out.0.{leaf}"] = proj.reshape(c, c) if leaf == "weight" else proj
    elif isinstance(module, ConvResample):
        for k, v in state.items():
            out[f"{prefix}.conv.{k.rpartition('.')[2]}"] = v
    else:
        for k, v in state.items():
            out[f"{prefix}.{k}"] = v


def unet_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """ADMUNet's weights under ``UNet2DModel``'s names (float32 copies)."""
    out: dict[str, Tensor] = {}
    _put(out, "time_embedding.linear_1", net.time_embed[0])
    _put(out, "time_embedding.linear_2", net.time_embed[2])
    if net.label_emb is not None:
        _put(out, "class_embedding", net.label_emb)
    _put(out, "conv_in", net.input_blocks[0][0])
    down, up = _levels(net)
    for blocks, name, samplers in (
        (down, "down_blocks", "downsamplers"),
        (up, "up_blocks", "upsamplers"),
    ):
        for i, level in enumerate(blocks):
            for j, (res, attn) in enumerate(level[:-1]):
                _put(out, f"{name}.{i}.resnets.{j}", res)
                if attn is not None:
                    _put(out, f"{name}.{i}.attentions.{j}", attn)
            if level[-1] is not None:
                _put(out, f"{name}.{i}.{samplers}.0", level[-1])
    mid = net.middle_block
    _put(out, "mid_block.resnets.0", mid[0])
    _put(out, "mid_block.attentions.0", mid[1])
    _put(out, "mid_block.resnets.1", mid[2])
    _put(out, "conv_norm_out", net.out[0])
    _put(out, "conv_out", net.out[2])
    return {k: v.detach().float().clone().contiguous() for k, v in out.items()}


def grid_timesteps(sigmas: list[float], grid: Tensor) -> tuple[list[int], bool]:
    """The ``timesteps=`` argument of ``ConsistencyModelPipeline`` for a cmexp plan
    ``[T, tau_1, ...]``: the levels' indices in the N-point Karras grid (index 0 = T), reversed
    (diffusers maps ``timesteps[::-1] / (N - 1)`` onto the grid). Returns the indices and whether
    every level is on the grid (else the nearest levels' indices: a different plan)."""
    levels = grid.tolist()
    idx = [min(range(len(levels)), key=lambda i: abs(levels[i] - s)) for s in sigmas]
    exact = all(math.isclose(levels[i], s, rel_tol=1e-6) for i, s in zip(idx, sigmas))
    return list(reversed(idx)), exact


def build_pipeline(loaded: Any, key: str = "ckpt") -> Any:
    """A ``ConsistencyModelPipeline`` holding ``loaded``'s network and constants (float32)."""
    check_exportable(loaded.model, loaded.kind, loaded.source, key)
    try:
        from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel
    except ImportError:
        raise ValueError(
            "format=diffusers needs the diffusers package: pip install diffusers (or pip install -e '.[dev]')"
        ) from None
    model, spec = loaded.model, loaded.spec
    if spec.sigma_min != model.sigma_min or spec.sigma_max != model.sigma_max:
        raise ValueError(
            f"format=diffusers: {key}={loaded.source} samples in [{spec.sigma_min}, {spec.sigma_max}] but its "
            f"consistency function is built for [{model.sigma_min}, {model.sigma_max}]; the scheduler has one range"
        )
    net = model.net
    unet = UNet2DModel(**unet_config(net))
    state = unet_state_dict(net)
    ref = unet.state_dict()
    missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
    wrong = [k for k in ref if k in state and ref[k].shape != state[k].shape]
    if missing or extra or wrong:  # a mapping bug, not a user error
        raise RuntimeError(
            f"ADMUNet -> UNet2DModel mapping: missing {missing[:3]}, extra {extra[:3]}, shape {wrong[:3]}"
        )
    unet.load_state_dict(state, strict=True)
    scheduler = CMStochasticIterativeScheduler(
        num_train_timesteps=int(spec.num_scales),
        sigma_min=float(model.sigma_min),
        sigma_max=float(model.sigma_max),
        sigma_data=float(model.sigma_data),
        s_noise=1.0,
        rho=float(spec.rho),
        clip_denoised=True,
    )
    return ConsistencyModelPipeline(unet=unet.eval(), scheduler=scheduler)


def export_diffusers(loaded: Any, out: str | Path, key: str = "ckpt") -> Path:
    """Write ``loaded`` (a :class:`cmexp.inference.LoadedModel`) as a diffusers pipeline folder
    at ``out`` (new, or an empty folder: anything else is refused), plus ``cmexp_export.json``
    (source, kind, constants, and the ``timesteps=`` of the model's default 2-step plan). The
    folder is written next to ``out`` under a temporary name and renamed when complete."""
    from cmexp.inference.plan import sigma_plan

    dst = Path(out).expanduser().absolute()
    if dst.is_file() or (dst.is_dir() and any(dst.iterdir())):
        raise ValueError(f"out={out} exists and is not an empty folder; refusing to overwrite it")
    pipe = build_pipeline(loaded, key)
    spec = loaded.spec
    plans = {}
    for steps in (1, 2):
        try:
            plan = sigma_plan(spec, steps)
        except ValueError:
            continue
        timesteps, exact = grid_timesteps(plan, spec.grid())
        plans[f"{steps}step"] = {"sigmas": plan, "timesteps": timesteps if exact else None}
        if not exact:
            plans[f"{steps}step"]["nearest_timesteps"] = timesteps  # the grid has no such level

    info = {
        "source": str(loaded.source),
        "kind": loaded.kind,
        "sigma_min": loaded.model.sigma_min,
        "sigma_max": loaded.model.sigma_max,
        "sigma_data": loaded.model.sigma_data,
        "rho": spec.rho,
        "num_scales": spec.num_scales,
        "taus": list(spec.taus),
        "plans": plans,
        "usage": "ConsistencyModelPipeline.from_pretrained(DIR)(timesteps=plans['2step']['timesteps'], "
        "generator=[torch.Generator().manual_seed(seed + i) for i in range(n)], batch_size=n)",
        "class_labels": "diffusers draws random labels when none are passed; cmexp samples with the null label"
        if loaded.label_dim
        else None,
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "cmexp_export.json").write_text(json.dumps(info, indent=2) + "\n")
        if dst.is_dir():
            dst.rmdir()  # empty (checked above)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


__all__ = [
    "DIFFUSERS_C_NOISE_SCALE",
    "build_pipeline",
    "check_exportable",
    "export_diffusers",
    "grid_timesteps",
    "unet_config",
    "unet_state_dict",
]
