"""openai/consistency_models_cifar10 Flax checkpoints (cmexp.interop.flax_cifar10): test-made
files in the release's msgpack layout (tests/flax_format.py, NCSN++ at a reduced width) load
as SongUNet models whose denoiser / consistency function equals a direct computation of the
release's NCSN++ and preconditioning on the Flax tree; every bad file fails on one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests import flax_format as ff

ARCH = {"ch_mult": (1, 2), "num_res_blocks": 1}


def _params(seed: int = 0) -> dict:
    return ff.ncsnpp_params(nf=8, ch_mult=ARCH["ch_mult"], num_res_blocks=1, seed=seed)


@pytest.fixture(scope="module")
def trees() -> tuple[dict, dict]:
    online = _params()
    return online, ff.perturbed(online, 1)


def _write(tmp_path: Path, rel: str, trees: tuple[dict, dict], target: bool = False) -> Path:
    online, ema = trees
    return ff.write_state(tmp_path / rel, ff.train_state(online, ema, target=target))


def _load(path: Path, use_ema: bool = True):
    from cmexp.inference.loader import load_model

    torch.set_num_threads(1)
    return load_model(str(path), use_ema=use_ema, device="cpu")


def test_reads_the_train_state_without_jax(tmp_path: Path, trees) -> None:
    import sys

    from cmexp.interop.flax_cifar10 import read_msgpack_state

    f = _write(tmp_path, "cd-lpips/checkpoints/checkpoint_80", trees)
    state = read_msgpack_state(f)
    assert sorted(state) == sorted(
        ["step", "lr", "ema_rate", "params", "params_ema", "model_state", "opt_state", "rng_state"]
    )
    w = state["params_ema"]["ResnetBlockBigGANpp_0"]["Conv_0"]["kernel"]
    assert w.shape == (3, 3, 8, 8) and w.dtype == np.float32
    np.testing.assert_array_equal(w, trees[1]["ResnetBlockBigGANpp_0"]["Conv_0"]["kernel"])
    assert int(state["step"]) == 800000 and "jax" not in sys.modules and "flax" not in sys.modules


@pytest.mark.parametrize(
    ("rel", "kind", "use_ema"),
    [
        ("cd-lpips/checkpoints/checkpoint_80", "cd", True),
        ("cd-l1/checkpoints/checkpoint_80", "cd", False),
        ("cifar10-continuous-cd-lpips-stopgrad/checkpoints/checkpoint_40", "cd", True),
        ("continuous-ct-l2/checkpoints/checkpoint_80", "ct", True),
    ],
)
def test_consistency_function_equals_the_releases(
    tmp_path: Path, trees, rel: str, kind: str, use_ema: bool
) -> None:
    """``get_distiller_fn`` of the release on the Flax tree = the loaded CMPrecond(SongUNet),
    for the EMA and the online parameters."""
    loaded = _load(_write(tmp_path, rel, trees), use_ema)
    assert loaded.kind == kind
    p = trees[1] if use_ema else trees[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=g) * 2
    t = torch.tensor([80.0, 0.5853, 0.01])
    with torch.no_grad():
        ours = loaded.model(x * t[:, None, None, None], t)
        ref = ff.distiller(p, x * t[:, None, None, None], t, **ARCH)
    assert (ours - ref).abs().max() < 2e-4 * ref.abs().max()


def test_edm_teacher_equals_the_releases_denoiser(tmp_path: Path, trees) -> None:
    loaded = _load(_write(tmp_path, "edm_cifar10_ema", trees))
    assert loaded.kind == "edm" and type(loaded.model).__name__ == "EDMPrecond"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([2.0, 0.1])
    with torch.no_grad():
        ours = loaded.model(x, t)
        ref = ff.denoiser(trees[1], x, t, **ARCH)
    assert (ours - ref).abs().max() < 2e-4 * ref.abs().max()


def test_metadata_records_the_release(tmp_path: Path, trees) -> None:
    from cmexp.diffusion.karras import karras_sigmas
    from cmexp.inference.checkpoint import read_checkpoint
    from cmexp.interop.flax_cifar10 import ct_num_scales

    cd = read_checkpoint(_write(tmp_path, "cd-lpips/checkpoints/checkpoint_80", trees))
    grid = karras_sigmas(18, 0.002, 80.0, 7.0, dtype=torch.float64)
    assert cd.meta["source_format"] == "openai-consistency-models-cifar10-flax"
    assert cd.meta["num_scales"] == 18 and cd.meta["taus"] == [pytest.approx(float(grid[11]))]
    assert cd.meta["c_noise_scale"] == 0.25 and "precond" not in cd.meta
    assert cd.config["net"]["model_channels"] == 8 and cd.config["dataset"]["_target_"].endswith(
        "CIFAR10DataModule"
    )
    ct = read_checkpoint(_write(tmp_path, "ct-lpips/checkpoints/checkpoint_74", trees, True))
    assert ct.kind == "ct" and ct.meta["num_scales"] == ct_num_scales(740000) == 146
    assert ct.meta["taus"] == []  # the paper's CT 2-step tau is not published
    edm = read_checkpoint(_write(tmp_path, "edm_cifar10_ema", trees))
    assert edm.meta["precond"] == {"name": "edm"} and edm.meta["sampler"] == "heun"
    assert ct_num_scales(800000) == 151 and ct_num_scales(0) == 2


def test_release_names(tmp_path: Path) -> None:
    from cmexp.interop.flax_cifar10 import release_for

    def name(p: str) -> str | None:
        found = release_for(Path(p))
        return found[0] if found else None

    assert name("/m/cifar10-continuous-cd-l2-stopgrad/checkpoints/checkpoint_40") == (
        "cifar10-continuous-cd-l2-stopgrad"
    )
    assert (
        name("/m/cifar10-continuous-cd-l2/checkpoints/checkpoint_40") == "cifar10-continuous-cd-l2"
    )
    assert name("/m/cd-lpips_checkpoint_80") == "cd-lpips"
    assert name("/m/edm_cifar10_ema") == "edm_cifar10_ema"
    assert name("/m/checkpoints/checkpoint_80") is None and name("/m/cd-lpipsx/c") is None


def _err(path: Path) -> str:
    from cmexp.inference.checkpoint import read_checkpoint

    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_files_fail_on_one_line(tmp_path: Path, trees) -> None:
    good = ff.state_bytes(ff.train_state(*trees))
    d = tmp_path / "cd-lpips" / "checkpoints"
    d.mkdir(parents=True)
    (d / "truncated").write_bytes(good[: len(good) // 2])
    assert "truncated" in _err(d / "truncated")
    # a pickle that would run code where the msgpack file is expected: refused, never run
    (d / "checkpoint_80").write_bytes(b"\x80\x04cos\nsystem\n(S'touch flax_bad_ran'\ntR.")
    assert "was refused: it needs os.system" in _err(d / "checkpoint_80")
    assert not Path("flax_bad_ran").exists()
    # the wrong layout: a msgpack map that is no train state, an unknown entry, a list
    (d / "layout").write_bytes(ff.state_bytes({"foo": np.zeros(2, np.float32), "bar": {}}))
    assert "without params/params_ema" in _err(d / "layout")
    state = ff.train_state(*trees)
    state["optimizer"] = {}
    (d / "extra").write_bytes(ff.state_bytes(state))
    assert "'optimizer'" in _err(d / "extra")
    # unknown module, missing leaf, wrong shape, extra leaf: each named
    for what, edit in (
        ("params_ema/Foo_0", lambda p: p.__setitem__("Foo_0", {"w": np.zeros(1, np.float32)})),
        (
            "params_ema/ResnetBlockBigGANpp_2/Conv_1/bias is missing",
            lambda p: p["ResnetBlockBigGANpp_2"]["Conv_1"].pop("bias"),
        ),
        (
            "params_ema/AttnBlockpp_1/NIN_3/W has shape (8, 16)",
            lambda p: p["AttnBlockpp_1"]["NIN_3"].__setitem__("W", np.zeros((8, 16), np.float32)),
        ),
        (
            "params_ema/Conv_1/extra",
            lambda p: p["Conv_1"].__setitem__("extra", np.zeros(1, np.float32)),
        ),
    ):
        ema = ff.perturbed(trees[0], 2)
        edit(ema)
        f = ff.write_state(tmp_path / "cd-l2" / "checkpoint_80", ff.train_state(trees[0], ema))
        assert what in _err(f), what
    # an extension type Flax never writes; an object array
    import msgpack

    (d / "ext").write_bytes(msgpack.packb({"params": msgpack.ExtType(7, b"x")}))
    assert "extension object of type 7" in _err(d / "ext")
    bad = msgpack.packb(
        (
            [2],
            "object",
            b"\0" * 16,
        )
    )
    (d / "obj").write_bytes(msgpack.packb({"params": msgpack.ExtType(1, bad)}))
    assert "dtype 'object'" in _err(d / "obj")
    # a good file under a name that says nothing
    anon = tmp_path / "models" / "checkpoint_80"
    anon.parent.mkdir()
    anon.write_bytes(good)
    assert "keep the released names" in _err(anon)


def test_other_layouts_are_refused(tmp_path: Path) -> None:
    p = _params()
    del p["Downsample_0"]
    f = ff.write_state(tmp_path / "cd-lpips" / "checkpoint_80", ff.train_state(p))
    assert "residual input pyramid" in _err(f)
    p = _params()
    p.pop("GaussianFourierProjection_0")
    f = ff.write_state(tmp_path / "cd-l1" / "checkpoint_80", ff.train_state(p))
    assert "cifar10_k_vp.py" in _err(f)
