"""Fixture files for the bad-input corpus, built once per session: tiny checkpoints of every kind
(2 training steps on the synthetic set), damaged and foreign checkpoints, image folders with a
non-image file, a 17x9 mask, damaged ``.npz`` files, run folders of other commands and CSV logs
that are not UTF-8."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

TINY = ["debug=tiny", "trainer.max_steps=2"]


def _train(overrides: list[str], out: Path) -> Path:
    from cmexp.train import train
    from tests.integration.conftest import compose_train

    train(compose_train([*TINY, *overrides], out))
    GlobalHydra.instance().clear()
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``{name: path}`` of every file the corpus names (``{name}`` in ``cases.py``)."""
    from PIL import Image

    from cmexp.inference import export_weights

    base = tmp_path_factory.mktemp("bad_inputs")
    fx = base / "files"
    fx.mkdir()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ct = _train(["model=ct"], base / "runs" / "ct")
        edm = _train(["model=edm"], base / "runs" / "edm")
        cond_edm = _train(
            ["model=edm", "dataset.use_labels=true"], base / "runs" / "cond_edm"
        )  # 4 classes
        clf = _train(
            [
                "model=classifier",
                "net=small_cnn",
                "net.width=4",
                "net.feature_dim=8",
                "~callbacks.sample_grid",
            ],
            base / "runs" / "clf",
        )
        meanflow = _train(
            ["model=meanflow", "net.guidance_embed=true"], base / "runs" / "meanflow"
        )
        ae = _train(  # latent mode: a tiny autoencoder (32x32x3 -> 8x8x4) and a CT model on its latents
            [
                "model=autoencoder",
                "net=autoencoder_kl",
                "net.model_channels=4",
                "model.scale_images=16",
                "model.psnr_images=4",
                "~callbacks.sample_grid",
            ],
            base / "runs" / "ae",
        )
        latent_ct = _train(
            ["model=ct", "latent=autoencoder", f"latent.autoencoder_path={ae}"],
            base / "runs" / "latent_ct",
        )
    finally:
        torch.set_num_threads(n)
    files: dict[str, Path] = {
        "ct": ct,
        "edm": edm,
        "clf": clf,
        "ct_run": ct.parents[1],
        "fx": fx,
        "cond_edm": cond_edm,
        "ae": ae,
        "latent_ct": latent_ct,
        "meanflow": meanflow,
    }

    # checkpoints: damaged, foreign, slim, another architecture
    raw = ct.read_bytes()
    (fx / "corrupt.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    (fx / "truncated.ckpt").write_bytes(raw[: len(raw) // 2])
    (fx / "empty.ckpt").write_bytes(b"")
    (fx / "folder.ckpt").mkdir()
    torch.save({"a": 1}, fx / "nonlightning.ckpt")
    torch.save(
        {"state_dict": {"layer.weight": torch.ones(2, 2)}, "optimizer_states": [], "epoch": 0},
        fx / "foreign.ckpt",
    )
    export_weights(ct, fx / "slim.ckpt")
    full = torch.load(ct, map_location="cpu", weights_only=True)
    full["state_dict"] = {
        k: (v[: max(1, v.shape[0] // 2)] if k.endswith("conv_in.weight") else v)
        for k, v in full["state_dict"].items()
    }
    torch.save(full, fx / "other_arch.ckpt")
    files.update(
        {
            name: fx / f"{name}.ckpt"
            for name in (
                "corrupt",
                "truncated",
                "empty",
                "nonlightning",
                "foreign",
                "slim",
                "other_arch",
            )
        }
    )
    files["folder_ckpt"] = fx / "folder.ckpt"

    # images and masks
    rng = np.random.default_rng(0)
    for name in ("imgs", "goodimgs", "noimgs"):
        (fx / name).mkdir()
    for i in range(3):
        for name in ("imgs", "goodimgs"):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                fx / name / f"{i}.png"
            )
    (fx / "imgs" / "notes.png").write_text("not an image")
    Image.fromarray(np.zeros((9, 17), dtype=np.uint8)).save(fx / "mask17x9.png")
    (fx / "text.png").write_text("not an image either")
    (fx / "afile").write_text("a plain file")
    files.update(
        {
            "imgs": fx / "imgs",
            "goodimgs": fx / "goodimgs",
            "noimgs": fx / "noimgs",
            "mask17x9": fx / "mask17x9.png",
            "textpng": fx / "text.png",
            "afile": fx / "afile",
            "nothere": fx / "does_not_exist",
        }
    )

    # sample files
    np.savez(fx / "good.npz", arr_0=rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8))
    good = (fx / "good.npz").read_bytes()
    (fx / "trunc.npz").write_bytes(good[: len(good) // 2])
    np.savez(fx / "empty.npz", arr_0=np.zeros((0, 32, 32, 3), dtype=np.uint8))
    np.savez(fx / "one.npz", arr_0=np.zeros((1, 32, 32, 3), dtype=np.uint8))
    np.savez(fx / "noarr.npz", images=np.zeros((4, 32, 32, 3), dtype=np.uint8))
    np.savez(fx / "float.npz", arr_0=np.zeros((4, 32, 32, 3), dtype=np.float32))
    np.savez(fx / "grey.npz", arr_0=rng.integers(0, 255, (10, 28, 28, 1), dtype=np.uint8))
    files.update(
        {
            f"{name}_npz": fx / f"{name}.npz"
            for name in ("good", "trunc", "empty", "one", "noarr", "float", "grey")
        }
    )

    # run folders: another command's outputs, logs that cannot be read
    sample_run = fx / "sample_run"
    (sample_run / ".hydra").mkdir(parents=True)
    (sample_run / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: sample\n")
    (sample_run / ".hydra" / "config.yaml").write_text("ckpt: x\n")
    (sample_run / ".hydra" / "overrides.yaml").write_text("- ckpt=x\n")
    (sample_run / "sample.json").write_text(json.dumps({"nfe": 1}))
    for name, body in (
        ("badcsv_run", b"step,train/loss\n0,\xff\xfe1.0\n"),
        ("badstep_run", b"step,train/loss\n0,1.0\nabc,2.0\n"),
    ):
        run = fx / name
        (run / "csv").mkdir(parents=True)
        shutil.copy(files["ct_run"] / "config_resolved.yaml", run / "config_resolved.yaml")
        (run / "csv" / "metrics.csv").write_bytes(body)
        files[name] = run
    files["sample_run"] = sample_run
    files.update(_foreign_files(fx))
    files.update(_flax_files(fx))
    files["ncsnpp_ct"] = _ncsnpp_ct(ct, fx)
    return {k: str(v) for k, v in files.items()}


def _ncsnpp_ct(ct: Path, fx: Path) -> Path:
    """A slim CT checkpoint whose network is a small NCSN++ (SongUNet), with c_noise_scale 250
    (what format=diffusers refuses for its network alone)."""
    from cmexp.diffusion.precond import CMPrecond
    from cmexp.nets import SongUNet

    meta = torch.load(ct, map_location="cpu", weights_only=True)["cmexp"]
    net_cfg = {
        "_target_": "cmexp.nets.SongUNet",
        "img_resolution": 16,
        "img_channels": 3,
        "model_channels": 16,
        "channel_mult": [1, 2],
        "num_blocks": 1,
        "attn_resolutions": [8],
    }
    meta = {**meta, "c_noise_scale": 250.0, "img_resolution": 16, "img_channels": 3}
    meta["config"] = {**meta["config"], "config": {**meta["config"]["config"], "net": net_cfg}}
    model = CMPrecond(
        SongUNet(**{k: v for k, v in net_cfg.items() if k != "_target_"}), c_noise_scale=250.0
    )
    state = {f"ema.{k}": v for k, v in model.state_dict().items()}
    torch.save({"cmexp": meta, "state_dict": state, "global_step": 2}, fx / "ct_ncsnpp.ckpt")
    return fx / "ct_ncsnpp.ckpt"


def _flax_files(fx: Path) -> dict[str, Path]:
    """issue 33: openai/consistency_models_cifar10 Flax files gone wrong (tests/flax_format.py):
    truncated, a msgpack map that is no train state, a code-running pickle under a released
    name, a good state under a name that says nothing; reference statistics of 3-d features."""
    from tests import flax_format as ff

    params = ff.ncsnpp_params(nf=8, ch_mult=(1, 2), num_res_blocks=1)
    good = ff.state_bytes(ff.train_state(params))
    out = {
        "flax_trunc": fx / "cd-lpips" / "checkpoints" / "checkpoint_80",
        "flax_layout": fx / "cd-l2" / "checkpoints" / "checkpoint_80",
        "flax_evil": fx / "ct-lpips" / "checkpoints" / "checkpoint_74",
        "flax_noname": fx / "flax" / "checkpoint_80",
        "stats3_npz": fx / "stats3.npz",
        "good_npz": fx / "good.npz",
    }
    for key in ("flax_trunc", "flax_layout", "flax_evil", "flax_noname"):
        out[key].parent.mkdir(parents=True, exist_ok=True)
    out["flax_trunc"].write_bytes(good[: len(good) // 2])
    out["flax_layout"].write_bytes(ff.state_bytes({"weights": {}, "step": np.int32(1)}))
    out["flax_evil"].write_bytes(b"\x80\x04cos\nsystem\n(S'touch cmexp_bad_input_ran'\ntR.")
    out["flax_noname"].write_bytes(good)
    np.savez(out["stats3_npz"], mu=np.zeros(3), sigma=np.eye(3))
    return out


def _foreign_files(fx: Path) -> dict[str, Path]:
    """Checkpoints of other code bases (cmexp.interop): a 16x16 NVlabs/edm pickle, one that
    would run code, an unsupported preconditioner, and openai/consistency_models state dicts
    whose name does not say what they hold or that lack a key."""
    from cmexp.nets import ADMUNet
    from tests import edm_format as ef

    gen = torch.Generator().manual_seed(0)
    small = {
        "model_channels": 16,
        "channel_mult": (1, 2),
        "num_blocks": 1,
        "attn_resolutions": (8,),
    }
    with pytest.MonkeyPatch.context() as mp:
        ef.write_edm_pickle(
            fx / "edm16.pkl",
            ef.precond("EDMPrecond", ef.song_unet(16, 3, gen, **small), 16, 3),
            mp,
        )
        ef.write_edm_pickle(
            fx / "iddpm.pkl",
            ef.precond("iDDPMPrecond", ef.song_unet(16, 3, gen, **small), 16, 3),
            mp,
        )
    (fx / "evil.pkl").write_bytes(b"\x80\x04cos\nsystem\n(S'touch cmexp_bad_input_ran'\ntR.")
    state = ADMUNet(64, 3, 0, 16, (1, 2, 3, 4), 1, (8,)).state_dict()
    torch.save(state, fx / "unet_weights.pt")
    torch.save(
        {k: v for k, v in state.items() if not k.startswith("out.0.")}, fx / "cd_imagenet64_l2.pt"
    )
    return {
        "edm_pkl": fx / "edm16.pkl",
        "iddpm_pkl": fx / "iddpm.pkl",
        "evil_pkl": fx / "evil.pkl",
        "oai_noname": fx / "unet_weights.pt",
        "oai_missing": fx / "cd_imagenet64_l2.pt",
    }
