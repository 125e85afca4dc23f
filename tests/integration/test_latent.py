"""Latent mode end to end on the synthetic 3 x 32 x 32 set with tiny nets: the autoencoder
stage, latent EDM / CD / CT / ECT / sCT / sCD runs, and sample / eval / edit on a latent checkpoint (decoded
images of the dataset's shape), plus the latent-shape and teacher-space errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from cmexp.train import train

from .conftest import compose_train

TINY = ["debug=tiny", "trainer.max_steps=2"]
AE = [
    "model=autoencoder",
    "net=autoencoder_kl",
    "net.model_channels=4",
    "model.scale_images=32",
    "model.psnr_images=8",
    "~callbacks.sample_grid",
]


def _latent(ae: Path) -> list[str]:
    return ["latent=autoencoder", f"latent.autoencoder_path={ae}"]


def _run(overrides: list[str], out: Path) -> Path:
    train(compose_train([*TINY, *overrides], out))
    GlobalHydra.instance().clear()
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny autoencoder (32x32x3 -> 8x8x4) and a latent EDM teacher on its latents."""
    base = tmp_path_factory.mktemp("latent")
    ae = _run(AE, base / "ae")
    edm = _run(["model=edm", *_latent(ae)], base / "edm")
    return {"ae": ae, "edm": edm, "base": base}


def test_autoencoder_checkpoint_records_scale_psnr_and_latent_shape(runs) -> None:
    meta = torch.load(runs["ae"], map_location="cpu", weights_only=True)["cmexp"]
    assert meta["kind"] == "autoencoder"
    assert (meta["latent_resolution"], meta["latent_channels"], meta["img_resolution"]) == (
        8,
        4,
        32,
    )
    assert (
        meta["scale_factor"] == pytest.approx(1 / meta["latent_std"])
        and meta["scale_images"] == 32
    )
    assert np.isfinite(meta["psnr"]) and meta["psnr_images"] == 8
    info = json.loads((runs["ae"].parents[1] / "autoencoder.json").read_text())
    assert info["psnr"] == pytest.approx(meta["psnr"])
    assert (runs["ae"].parents[1] / "reconstructions.png").is_file()


def test_latent_edm_checkpoint_embeds_the_codec(runs) -> None:
    from cmexp.inference import load_model

    ckpt = torch.load(runs["edm"], map_location="cpu", weights_only=True)
    info = ckpt["cmexp"]["latent"]
    ae_meta = torch.load(runs["ae"], map_location="cpu", weights_only=True)["cmexp"]
    assert (ckpt["cmexp"]["img_resolution"], ckpt["cmexp"]["img_channels"]) == (
        8,
        4,
    )  # the network's input
    assert (
        info["resolution"],
        info["channels"],
        info["img_resolution"],
        info["img_channels"],
    ) == (8, 4, 32, 3)
    assert (
        info["scale"] == pytest.approx(ae_meta["scale_factor"])
        and len(info["autoencoder_sha256"]) == 64
    )
    assert any(k.startswith("latent.autoencoder.") for k in ckpt["state_dict"])
    assert ckpt["cmexp"]["sigma_data"] == 1.0
    loaded = load_model(runs["edm"])
    assert loaded.latent is not None and (loaded.img_resolution, loaded.img_channels) == (32, 3)
    assert (loaded.model.img_resolution, loaded.model.img_channels) == (8, 4)
    # the embedded codec is the autoencoder's
    from cmexp.inference.latent import load_codec

    codec = load_codec(runs["ae"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(loaded.latent.encode(x), codec.encode(x), atol=1e-6)


@pytest.fixture(scope="module")
def students(runs) -> dict[str, Path]:
    """Latent CD and ECT students of the latent teacher and a latent CT run, trained once for
    every test that reads them (whatever the order or selection of the tests)."""
    base, ae = runs["base"], runs["ae"]
    out = {
        model: _run(
            [f"model={model}", *_latent(ae), f"model.teacher_path={runs['edm']}"], base / model
        )
        for model in ("cd", "ect")
    }
    out["ct"] = _run(["model=ct", *_latent(ae)], base / "ct")
    return out


def test_latent_cd_ct_and_ect_train_from_the_latent_teacher(students) -> None:
    for model in ("cd", "ect", "ct"):
        path = students[model]
        meta = torch.load(path, map_location="cpu", weights_only=True)["cmexp"]
        assert meta["kind"] == model and meta["latent"]["resolution"] == 8
        assert (path.parents[1] / "samples" / "1step_last.png").is_file()


def test_latent_sct_and_scd_train_and_sample_decoded_images(runs) -> None:
    """The continuous-time modes in latent space: sCT from scratch and sCD from the latent EDM
    teacher (converted to TrigFlow) train on the latents, record the codec and sample decoded
    images through the inference seam."""
    from cmexp.inference import generate, load_model
    from cmexp.inference.plan import sigma_plan

    base, ae = runs["base"], runs["ae"]
    for model, extra in (("sct", []), ("scd", [f"model.teacher_path={runs['edm']}"])):
        path = _run([f"model={model}", *_latent(ae), *extra], base / model)
        meta = torch.load(path, map_location="cpu", weights_only=True)["cmexp"]
        assert meta["kind"] == model and meta["latent"]["resolution"] == 8
        assert (path.parents[1] / "samples" / "1step_last.png").is_file()
        loaded = load_model(path)
        assert loaded.latent is not None and loaded.model.img_resolution == 8
        images = generate(loaded, 2, sigma_plan(loaded.spec, steps=2), seed=0)
        assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1


def test_sample_on_a_latent_checkpoint_returns_decoded_images(
    runs, students, tmp_path: Path
) -> None:
    from cmexp.sample import sample

    for kind, ckpt, extra in (
        ("edm", runs["edm"], []),
        ("ct", students["ct"], ["steps=2", "taus=[0.585]"]),
    ):
        cfg = compose_train(
            [f"ckpt={ckpt}", "num_samples=3", *extra], tmp_path / kind, config_name="sample"
        )
        out = sample(cfg)
        assert out["images"].shape == (3, 3, 32, 32)
        assert out["images"].min() >= -1 and out["images"].max() <= 1
        assert np.load(tmp_path / kind / "samples.npz")["arr_0"].shape == (3, 32, 32, 3)


def test_eval_and_edit_on_a_latent_checkpoint(runs, students, tmp_path: Path) -> None:
    from cmexp.edit import edit
    from cmexp.eval import evaluate

    clf = _run(
        [
            "model=classifier",
            "net=small_cnn",
            "net.width=4",
            "net.feature_dim=8",
            "~callbacks.sample_grid",
        ],
        tmp_path / "clf",
    )
    cfg = compose_train(
        [
            f"ckpt={runs['edm']}",
            "num_samples=6",
            f"features.ckpt={clf}",
            "num_real=16",
            "batch_size=8",
            f"cache_dir={tmp_path / 'cache'}",
            "dataset=gaussian_mixture",
        ],
        tmp_path / "eval",
        config_name="eval",
    )
    out = evaluate(cfg)
    (name,) = out["metrics"]
    assert np.isfinite(out["metrics"][name]["fd_fmnist"])
    assert np.load(tmp_path / "eval" / f"samples_{name}.npz")["arr_0"].shape == (6, 32, 32, 3)
    cd = students["cd"]
    res = edit(
        compose_train(
            ["task=interpolate", f"ckpt={cd}", "num_samples=2", "task.num=3"],
            tmp_path / "interp",
            config_name="edit",
        )
    )
    assert res["rows"]["pair0"].shape == (3, 3, 32, 32)
    res = edit(
        compose_train(
            ["task=stroke", f"ckpt={cd}", "num_samples=2"], tmp_path / "stroke", config_name="edit"
        )
    )
    assert res["rows"]["result"].shape == (2, 3, 32, 32)
    with pytest.raises(
        ValueError, match=r"task=inpaint edits pixels .* latent-space model; latent models support"
    ):
        edit(
            compose_train(
                ["task=inpaint", f"ckpt={cd}", "num_samples=2"],
                tmp_path / "inpaint",
                config_name="edit",
            )
        )


def test_latent_shape_and_teacher_space_mismatches_name_the_key(runs, tmp_path: Path) -> None:
    ae = runs["ae"]
    with pytest.raises(
        ValueError,
        match=r"latent.autoencoder_path=.* encodes to 4x8x8 latents but latent.channels x "
        r"latent.resolution\^2 is 4x4x4; set latent.resolution=8",
    ):
        train(
            compose_train(
                [*TINY, "model=edm", *_latent(ae), "latent.resolution=4"], tmp_path / "a"
            )
        )
    with pytest.raises(
        ValueError, match=r"encodes to 4x8x8 latents but the network's input .* is 3x8x8"
    ):
        train(
            compose_train([*TINY, "model=edm", *_latent(ae), "net.img_channels=3"], tmp_path / "b")
        )
    pixel = _run(["model=edm"], tmp_path / "pixel_edm")
    with pytest.raises(
        ValueError,
        match=r"model.teacher_path=.* is a pixel-space teacher but this run trains in latent",
    ):
        train(
            compose_train(
                [*TINY, "model=cd", *_latent(ae), f"model.teacher_path={pixel}"], tmp_path / "c"
            )
        )
    with pytest.raises(
        ValueError,
        match=r"ckpt_path=.* holds a latent-space 'edm' model but this run trains in pixel",
    ):
        train(compose_train([*TINY, "model=edm", f"ckpt_path={runs['edm']}"], tmp_path / "d"))


def test_latent_consistency_model_guided_and_conditional(runs, tmp_path: Path) -> None:
    """fmnist_lcm's recipe in tiny form: a class-conditional latent teacher with label dropout,
    guided CD from it into a student that takes w, in the same latent space; the student samples
    given classes at a chosen scale in 2 steps and returns decoded images."""
    from cmexp.sample import sample

    ae = runs["ae"]
    labels = ["dataset.use_labels=true"]
    teacher = _run(
        ["model=edm", "model.label_dropout=0.1", *labels, *_latent(ae)], tmp_path / "teacher"
    )
    student = _run(
        [
            "model=cd_guided",
            "net.guidance_embed=true",
            *labels,
            *_latent(ae),
            f"model.teacher_path={teacher}",
        ],
        tmp_path / "lcm",
    )
    meta = torch.load(student, map_location="cpu", weights_only=True)["cmexp"]
    assert (
        meta["latent"]["resolution"] == 8
        and meta["guidance"]["w_max"] == 4.0
        and meta["label_dim"] > 0
    )
    out = sample(
        compose_train(
            [f"ckpt={student}", "num_samples=4", "steps=2", "class_labels=[0,1]", "guidance=3"],
            tmp_path / "sample",
            config_name="sample",
        )
    )
    assert out["images"].shape == (4, 3, 32, 32) and out["info"]["nfe"] == 2
    assert np.load(tmp_path / "sample" / "samples.npz")["arr_1"].tolist() == [0, 1, 0, 1]
