"""NVlabs/edm network pickles: read without running their code, mapped onto cmexp's networks
and wrappers with outputs identical to an independent reference forward pass
(``tests/edm_format.py``), strict about keys, refused when they would need code execution."""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import pytest
import torch

from cmexp.inference.loader import load_model
from tests import edm_format as ef

RES = 16

#: (preconditioner, network, builder kwargs): DDPM++ (conditional, augmentation labels), NCSN++
#: (Fourier features, residual input pyramid, [1,3,3,1] filter), ADM (2 heads, conditional).
CASES = {
    "ddpmpp_vp_cond": (
        "VPPrecond",
        "SongUNet",
        {
            "model_channels": 16,
            "channel_mult": (1, 2, 2),
            "num_blocks": 1,
            "attn_resolutions": (8,),
            "label_dim": 10,
            "augment_dim": 9,
        },
    ),
    "ncsnpp_edm": (
        "EDMPrecond",
        "SongUNet",
        {
            "model_channels": 16,
            "channel_mult": (1, 2),
            "num_blocks": 1,
            "attn_resolutions": (8,),
            "embedding_type": "fourier",
            "channel_mult_noise": 2,
            "encoder_type": "residual",
            "resample_filter": (1, 3, 3, 1),
        },
    ),
    "ddpmpp_ve": (
        "VEPrecond",
        "SongUNet",
        {"model_channels": 16, "channel_mult": (1, 2), "num_blocks": 2, "attn_resolutions": (16,)},
    ),
    "adm_edm_cond": (
        "EDMPrecond",
        "DhariwalUNet",
        {
            "model_channels": 128,
            "channel_mult": (1, 2),
            "num_blocks": 1,
            "attn_resolutions": (8,),
            "label_dim": 5,
        },
    ),
}


def _build(case: str, seed: int = 0) -> tuple[str, str, ef.EDMModule, dict]:
    kind, arch, kw = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    net = (ef.song_unet if arch == "SongUNet" else ef.dhariwal_unet)(RES, 3, gen, **kw)
    return kind, arch, ef.precond(kind, net, RES, 3, kw.get("label_dim", 0)), {**net._init_kwargs}


def _write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ema, name: str = "net.pkl") -> Path:
    path = ef.write_edm_pickle(tmp_path / name, ema, monkeypatch)
    for mod in ("torch_utils", "torch_utils.persistence"):  # the reader must not need them
        monkeypatch.delitem(sys.modules, mod)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_mapped_network_equals_the_reference_forward(
    case: str, tmp_path: Path, monkeypatch
) -> None:
    kind, arch, pre, kw = _build(case)
    path = _write(tmp_path, monkeypatch, pre)
    before = sorted(p.name for p in tmp_path.iterdir())
    loaded = load_model(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written next to it
    wrapper = {
        "EDMPrecond": "EDMPrecond",
        "VPPrecond": "VPSDEPrecond",
        "VEPrecond": "VESDEPrecond",
    }[kind]
    assert type(loaded.model).__name__ == wrapper and loaded.kind == "edm"
    label_dim = kw.get("label_dim", 0)
    assert loaded.label_dim == label_dim and loaded.img_resolution == RES
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, RES, RES, generator=gen)
    sigma = torch.tensor([0.05, 7.0])
    w = ef.edm_state(pre)
    for labels in [None, torch.tensor([1, 3])] if label_dim else [None]:
        ref = ef.reference_forward(kind, arch, w, kw, x, sigma, labels, label_dim)
        with torch.no_grad():
            out = loaded.model(x, sigma, labels)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
        assert (out - ref).abs().max() < 1e-5 * ref.abs().max() * 10


def test_sampling_range_and_wrapper_are_recorded(tmp_path: Path, monkeypatch) -> None:
    from cmexp.inference.loader import build_wrapper

    _, _, pre, _ = _build("ddpmpp_vp_cond")
    loaded = load_model(_write(tmp_path, monkeypatch, pre))
    # EDM's sampler clamps to the network's range: VP sigma(1e-5) ~ 0.001 < 0.002, sigma(1) ~ 152 > 80
    assert (loaded.spec.sigma_min, loaded.spec.sigma_max) == (0.002, 80.0)
    assert loaded.meta["precond"] == {"name": "vp_sde", "beta_d": 19.9, "beta_min": 0.1, "M": 1000}
    rebuilt = build_wrapper(loaded.model.net, {**loaded.meta, "precond": loaded.model.describe()})
    x, s = torch.randn(1, 3, RES, RES), torch.tensor([2.0])
    with torch.no_grad():
        assert torch.equal(rebuilt(x, s), loaded.model(x, s))
    _, _, pre, _ = _build("ddpmpp_ve")
    loaded = load_model(_write(tmp_path, monkeypatch, pre, "ve.pkl"))
    assert (loaded.spec.sigma_min, loaded.spec.sigma_max) == (0.02, 80.0)
    assert loaded.model.describe() == {"name": "ve_sde"}


def test_real_cifar10_ddpmpp_key_names_and_shapes(tmp_path: Path, monkeypatch) -> None:
    """edm-cifar10-32x32-uncond-vp.pkl's network: EDMPrecond(SongUNet DDPM++, 128 x (2,2,2),
    4 blocks, attention at 16, augment_dim 9) with random values."""
    gen = torch.Generator().manual_seed(0)
    net = ef.song_unet(32, 3, gen, augment_dim=9, record_kwargs=True)
    pre = ef.precond("EDMPrecond", net, 32, 3)
    keys = ef.edm_state(pre)
    # pinned from EDM's construction: 55,732,739 network parameters + map_augment (9 x 128)
    assert (
        sum(v.numel() for k, v in keys.items() if not k.endswith("resample_filter"))
        == 55_732_739 + 9 * 128
    )
    assert keys["enc.16x16_block0.qkv.weight"].shape == (768, 256, 1, 1)
    assert keys["dec.32x32_aux_conv.weight"].shape == (3, 256, 3, 3)
    path = _write(tmp_path, monkeypatch, pre, "edm-cifar10-32x32-uncond-vp.pkl")
    loaded = load_model(path)
    assert sum(p.numel() for p in loaded.net.parameters()) == 55_732_739
    assert loaded.dataset.get("_target_") == "cmexp.data.CIFAR10DataModule"
    assert loaded.net.noise_embed.freqs[-1].item() == pytest.approx(1e-4)  # endpoint spacing
    x, sigma = torch.randn(1, 3, 32, 32, generator=gen), torch.tensor([1.3])
    ref = ef.reference_forward("EDMPrecond", "SongUNet", keys, {**net._init_kwargs}, x, sigma)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, sigma), ref, rtol=1e-5, atol=1e-4)


def test_missing_and_extra_keys_are_named(tmp_path: Path, monkeypatch) -> None:
    _, _, pre, _ = _build("ddpmpp_ve")
    del pre.model.enc["16x16_block0"].conv0.weight
    pre.model.enc["16x16_block0"].conv0.weight = None
    with pytest.raises(ValueError, match=r"lacks model\.enc\.16x16_block0\.conv0\.weight"):
        load_model(_write(tmp_path, monkeypatch, pre, "missing.pkl"))
    _, _, pre, _ = _build("ddpmpp_ve")
    pre.model.dec["8x8_in1"].register_parameter(
        "extra", torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    )
    with pytest.raises(
        ValueError, match=r"has model\.dec\.8x8_in1\.extra, which its recorded architecture"
    ):
        load_model(_write(tmp_path, monkeypatch, pre, "extra.pkl"))
    _, _, pre, _ = _build("ddpmpp_ve")
    pre.model.map_layer1.weight = torch.nn.Parameter(torch.zeros(64, 63), requires_grad=False)
    with pytest.raises(ValueError, match=r"model\.map_layer1\.weight has shape \(64, 63\)"):
        load_model(_write(tmp_path, monkeypatch, pre, "shape.pkl"))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickles_that_would_run_code_are_refused(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Evil(marker)}))
    with pytest.raises(
        ValueError, match=r"ckpt=.*evil\.pkl was refused: it needs (os|posix)\.system"
    ):
        load_model(path)
    assert not marker.exists()
    # a class of another package (here EDM's own, unimported) is refused before anything is built
    path.write_bytes(b"\x80\x04ctraining.networks\nSongUNet\n)\x81.")
    with pytest.raises(
        ValueError, match=r"refused: it needs training\.networks\.SongUNet.*would run code"
    ):
        load_model(path, key="model.teacher_path")
    # the pickled module source of the persistence records is never executed (it raises SystemExit)
    _, _, pre, _ = _build("ddpmpp_ve")
    assert "raise SystemExit" in ef.MODULE_SRC
    load_model(_write(tmp_path, monkeypatch, pre, "ok.pkl"))


def test_unsupported_pickles_name_what_they_hold(tmp_path: Path, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    net = ef.dhariwal_unet(
        RES, 3, gen, model_channels=128, channel_mult=(1, 2), num_blocks=1, attn_resolutions=()
    )
    path = _write(tmp_path, monkeypatch, ef.precond("iDDPMPrecond", net, RES, 3), "iddpm.pkl")
    with pytest.raises(
        ValueError,
        match=r"is not supported: its network is a iDDPMPrecond .*supported: EDMPrecond",
    ):
        load_model(path)
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"weights": [1, 2]}))
    with pytest.raises(
        ValueError, match=r"not supported: no network found \(a pickle holding \['weights'\]"
    ):
        load_model(tmp_path / "plain.pkl")
    net = ef.song_unet(
        RES, 3, gen, model_channels=16, channel_mult=(1, 2), num_blocks=1, encoder_type="skip"
    )
    path = _write(tmp_path, monkeypatch, ef.precond("EDMPrecond", net, RES, 3), "skip.pkl")
    with pytest.raises(ValueError, match=r"encoder_type='skip'"):
        load_model(path)


def test_edm_pickle_as_cd_teacher(tmp_path: Path, monkeypatch) -> None:
    """``model.teacher_path=<edm pickle>``: the teacher is its own converted network; a student
    net of the same architecture starts from it; a different one (DDPM++ without EDM's embedding
    spacing) and a VP teacher with init_from_teacher are refused with the reason."""
    from cmexp.diffusion.schedules import FixedSchedule
    from cmexp.diffusion.solvers import heun_step
    from cmexp.methods.consistency.loss import ConsistencyDistillationLoss
    from cmexp.losses.distances import L2Distance
    from cmexp.methods.consistency.module import CDLitModule
    from cmexp.nets import SongUNet

    kind, arch, pre, kw = _build("ncsnpp_edm")
    path = _write(tmp_path, monkeypatch, pre, "edm-teacher.pkl")
    loaded = load_model(path)
    cfg = {k: v for k, v in loaded.config["net"].items() if k != "_target_"}

    def cd(net, teacher, init=True):
        loss = ConsistencyDistillationLoss(metric=L2Distance(), solver=heun_step)
        return CDLitModule(
            net,
            loss,
            FixedSchedule(18, 0.0),
            torch.optim.Adam,
            teacher_path=str(teacher),
            init_from_teacher=init,
        )

    module = cd(SongUNet(**cfg), path)
    x, s = torch.randn(2, 3, RES, RES), torch.tensor([0.3, 5.0])
    w = ef.edm_state(pre)
    with torch.no_grad():
        torch.testing.assert_close(
            module.teacher(x, s),
            ef.reference_forward(kind, arch, w, kw, x, s),
            rtol=1e-5,
            atol=1e-4,
        )
        assert torch.equal(module.model.net.eval()(x, s, None), module.teacher.net(x, s, None))
    assert "teacher" not in "".join(module.state_dict())
    with pytest.raises(ValueError, match=r"the run's net is not the teacher's architecture"):
        cd(SongUNet(**{**cfg, "resample_filter": [1, 1]}), path)
    with pytest.raises(ValueError, match=r"teacher with 0 classes .* net\.label_dim=10"):
        cd(SongUNet(**{**cfg, "label_dim": 10}), path)
    _, _, vp, _ = _build("ddpmpp_ve")
    vpath = _write(tmp_path, monkeypatch, vp, "ve-teacher.pkl")
    vcfg = {k: v for k, v in load_model(vpath).config["net"].items() if k != "_target_"}
    with pytest.raises(ValueError, match=r"VEPrecond\(SongUNet\).*model\.init_from_teacher=false"):
        cd(SongUNet(**vcfg), vpath)
    module = cd(SongUNet(**vcfg), vpath, init=False)
    assert type(module.teacher).__name__ == "VESDEPrecond"
    assert math.isfinite(float(module.teacher(x, s).abs().max()))
