"""openai/consistency_models checkpoints (``edm_imagenet64_ema.pt``, ``cd_imagenet64_{l2,lpips}.pt``,
``ct_imagenet64.pt``, ``{edm,cd,ct}_{bedroom,cat}256*.pt``) as cmexp models.

Each file is a bare ``state_dict`` of guided-diffusion's ``UNetModel`` (read with
``torch.load(weights_only=True)``); :class:`cmexp.nets.ADMUNet` has the same key names, so the
weights load strictly as they are. What the file does not say is taken from the release:

* the architecture: widths, block counts, attention placement, scale-shift norm and classes
  are read off the weights' shapes; the image size follows consistency_models' table of
  ``channel_mult`` per size (4 levels: 64, 6 levels: 256); 64-channel heads.
* what the weights are: the file name's prefix, as released: ``edm_`` = an EDM denoiser
  (``EDMPrecond``), ``cd_`` / ``ct_`` = a consistency function (``CMPrecond``).
* the preconditioning: sigma_data 0.5, sigma_min 0.002, sigma_max 80, c_noise
  ``1000 * 0.25 * ln(sigma)`` (``c_noise_scale = 250``), rho 7.
* the sampling grid and the 2-step tau of ``scripts/launch.sh`` (``--steps``, ``--ts``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cmexp.interop.edm import Converted
from cmexp.interop.safe_pickle import UnsupportedPickleError

SUPPORTED = (
    "openai/consistency_models checkpoints named as released: edm_*.pt (EDM teacher), cd_*.pt / ct_*.pt "
    "(consistency models), e.g. edm_imagenet64_ema.pt, cd_imagenet64_lpips.pt, ct_bedroom256.pt"
)

#: consistency_models' ``create_model``: channel_mult by image size.
CHANNEL_MULT_BY_SIZE = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}

#: scripts/launch.sh: ``--steps`` (the grid N) and the 2-step ``--ts`` middle index per release.
RELEASE_GRIDS: dict[str, tuple[int, int | None]] = {
    "cd_imagenet64_lpips": (40, 22),
    "cd_imagenet64_l2": (40, 22),
    "ct_imagenet64": (201, 106),
    "cd_bedroom256_lpips": (40, 17),
    "cd_bedroom256_l2": (40, 18),
    "ct_bedroom256": (151, 67),
    "ct_cat256": (151, 62),
    "cd_cat256_lpips": (40, None),
    "cd_cat256_l2": (40, None),
}

#: Keys that only a guided-diffusion UNetModel state dict has.
SIGNATURE = ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight")


def looks_like_openai(state: Any) -> bool:
    """A plain ``{name: tensor}`` dict with guided-diffusion's UNetModel key names."""
    return isinstance(state, dict) and all(k in state for k in SIGNATURE)


def kind_from_name(path: Path) -> str:
    """ "edm", "cd" or "ct" from the released file name's prefix."""
    stem = path.name.lower()
    for prefix, kind in (("edm_", "edm"), ("cd_", "cd"), ("ct_", "ct")):
        if stem.startswith(prefix):
            return kind
    raise UnsupportedPickleError(
        "it is an openai/consistency_models UNet state dict, but its file name does not say what it is: "
        "these files hold only weights; keep the released name (edm_*.pt = EDM teacher, cd_*.pt / ct_*.pt = "
        "consistency model)"
    )


def infer_architecture(state: dict[str, Tensor]) -> dict[str, Any]:
    """The :class:`cmexp.nets.ADMUNet` config a UNetModel state dict was built with."""
    conv_in = state["input_blocks.0.0.weight"]
    mc, channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    out_blocks = sorted(
        {int(m.group(1)) for k in state if (m := re.match(r"output_blocks\.(\d+)\.", k))}
    )
    ups = [
        k
        for k in out_blocks
        if any(
            f"output_blocks.{k}.{j}.in_layers.0.weight" in state
            or f"output_blocks.{k}.{j}.conv.weight" in state
            for j in (1, 2)
        )
    ]
    levels = len(ups) + 1
    if len(out_blocks) % levels:
        raise UnsupportedPickleError(
            f"{len(out_blocks)} output blocks do not split into {levels} levels"
        )
    nb = len(out_blocks) // levels - 1
    mults = []
    for level in range(levels):  # output blocks run from the lowest resolution up
        width = int(state[f"output_blocks.{level * (nb + 1)}.0.out_layers.3.weight"].shape[0])
        mults.append(width // mc)
    mults = tuple(reversed(mults))
    size = next((s for s, m in CHANNEL_MULT_BY_SIZE.items() if m == mults), None)
    if size is None:
        raise UnsupportedPickleError(
            f"its channel_mult {mults} is none of consistency_models' sizes "
            f"({', '.join(f'{s}: {m}' for s, m in CHANNEL_MULT_BY_SIZE.items())})"
        )
    attn, res = [], size >> (levels - 1)
    for level in range(levels):
        if f"output_blocks.{level * (nb + 1)}.1.qkv.weight" in state:
            attn.append(res)
        res *= 2
    emb = state["input_blocks.1.0.emb_layers.1.weight"]
    width = state["input_blocks.1.0.out_layers.3.weight"].shape[0]
    return {
        "_target_": "cmexp.nets.ADMUNet",
        "img_resolution": size,
        "img_channels": channels,
        "label_dim": int(state["label_emb.weight"].shape[0]) if "label_emb.weight" in state else 0,
        "model_channels": mc,
        "channel_mult": list(mults),
        "num_blocks": nb,
        "attn_resolutions": sorted(attn, reverse=True),
        "num_heads": 1,
        "num_head_channels": 64,
        "dropout": 0.0,
        "use_scale_shift_norm": int(emb.shape[0]) == 2 * int(width),
        "resblock_updown": not any(k.endswith(".op.weight") for k in state),
    }


def convert_openai(path: Path, state: dict[str, Tensor]) -> Converted:
    """A consistency_models state dict as cmexp ``meta``/``config``/weights (see module docstring)."""
    kind = kind_from_name(path)
    net_cfg = infer_architecture(state)
    stem = path.stem.lower()
    num_scales, tau_index = RELEASE_GRIDS.get(stem.removesuffix("_ema"), (40, None))
    meta: dict[str, Any] = {
        "kind": kind,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "sigma_data": 0.5,
        "c_noise_scale": 250.0,
        "rho": 7.0,
        "num_scales": num_scales,
        "taus": [],
        "sampler": "heun",
        "img_resolution": net_cfg["img_resolution"],
        "img_channels": net_cfg["img_channels"],
        "label_dim": net_cfg["label_dim"],
        "source_format": "openai-consistency-models",
        # image_sample.py's default: every sampler clamps the denoiser / consistency output
        "clip_denoised": True,
    }
    if kind == "edm":
        meta["precond"] = {"name": "edm"}
    elif tau_index is not None:
        from cmexp.diffusion.karras import karras_sigmas

        meta["taus"] = [
            float(karras_sigmas(num_scales, 0.002, 80.0, 7.0, dtype=torch.float64)[tau_index])
        ]
    return Converted(meta, {"net": net_cfg}, check_weights(state, net_cfg))


def check_weights(state: dict[str, Tensor], net_cfg: dict[str, Any]) -> dict[str, Tensor]:
    """``state`` as float32 tensors shaped for ``net_cfg``'s ADMUNet; a missing or extra key or a
    wrong shape is an error naming the key. guided-diffusion's 1-D attention convs
    (``[3C, C, 1]``) are reshaped to the 1x1 ``Conv2d`` of consistency_models (``[3C, C, 1, 1]``)."""
    from cmexp.nets.adm import ADMUNet

    with torch.device("meta"):
        ref = ADMUNet(**{k: v for k, v in net_cfg.items() if k != "_target_"}).state_dict()
    missing = [k for k in ref if k not in state]
    extra = [k for k in state if k not in ref]
    for what, keys in (("lacks", missing), ("has", extra)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            verb = (
                "which its architecture needs"
                if what == "lacks"
                else "which its inferred architecture does not have"
            )
            raise UnsupportedPickleError(f"the state dict {what} {keys[0]}{more}, {verb}")
    out = {}
    for k, target in ref.items():
        v = state[k]
        if v.shape != target.shape:
            if v.numel() != target.numel() or v.ndim != 3 or target.ndim != 4:
                raise UnsupportedPickleError(
                    f"{k} has shape {tuple(v.shape)}, its architecture needs {tuple(target.shape)}"
                )
            v = v.reshape(target.shape)
        out[k] = v.float()
    return out
