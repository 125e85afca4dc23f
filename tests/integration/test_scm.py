"""sCT / sCD end to end (tiny nets, synthetic data, CPU): the Fashion-MNIST experiments under
``debug=tiny``, their checkpoints through the loader, ``cmexp.sample``, ``cmexp.eval`` and an
editor, sCD's teacher conversion and initialisation, exact resume, and a 2-process DDP step that
equals the single-process step on the same global batch (the JVP runs on the unwrapped network)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import hydra
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from cmexp.diffusion import EDMPrecond, EDMTrigFlowPrecond, TrigFlowPrecond
from cmexp.inference import load_model
from cmexp.train import train

from .conftest import compose_train, logged_losses, train_single_and_ddp

TINY = ["debug=tiny"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An EDM teacher, an sCT run and an sCD run from it (+experiment=fmnist_s*t debug=tiny)."""
    base = tmp_path_factory.mktemp("scm")
    out = {}
    train(
        compose_train(
            [*TINY, "model=edm", "trainer.max_steps=2", "model.lr_warmup_kimg=0"], base / "edm"
        )
    )
    out["edm"] = base / "edm" / "checkpoints" / "last.ckpt"
    train(
        compose_train(
            ["+experiment=fmnist_sct", *TINY, "quality=none", "trainer.max_steps=4"], base / "sct"
        )
    )
    out["sct_run"] = base / "sct"
    out["sct"] = base / "sct" / "checkpoints" / "last.ckpt"
    cfg = compose_train(
        [
            "+experiment=fmnist_scd",
            *TINY,
            "quality=none",
            "trainer.max_steps=2",
            f"model.teacher_path={out['edm']}",
        ],
        base / "scd",
    )
    out["scd_model"] = train(cfg)["model"]
    out["scd"] = base / "scd" / "checkpoints" / "last.ckpt"
    return out


def _losses(run: Path) -> dict[int, float]:
    with open(run / "csv" / "metrics.csv") as fh:
        return {
            int(r["step"]): float(r["train/loss"])
            for r in csv.DictReader(fh)
            if r.get("train/loss")
        }


def test_fmnist_sct_trains_and_its_checkpoint_describes_the_trigflow_model(runs) -> None:
    ckpt = torch.load(runs["sct"], map_location="cpu", weights_only=True)
    meta = ckpt["cmexp"]
    assert meta["kind"] == "sct" and meta["precond"] == {"name": "trigflow"}
    assert meta["t_mids"] == [1.1] and meta["taus"] == pytest.approx([0.5 * math.tan(1.1)])
    assert meta["c_noise_scale"] == 1.0 and meta["sigma_max"] == 80.0
    assert any(k.startswith("weight_net.") for k in ckpt["state_dict"])  # the adaptive weighting
    assert not any(k.startswith("target.") for k in ckpt["state_dict"])  # no target network
    losses = _losses(runs["sct_run"])
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses.values())
    with open(runs["sct_run"] / "csv" / "metrics.csv") as fh:
        warm = [float(r["train/warmup"]) for r in csv.DictReader(fh) if r.get("train/warmup")]
    assert warm == pytest.approx([0.0, 1 / 200, 2 / 200, 3 / 200])  # fmnist_sct: 200-step warm-up
    loaded = load_model(runs["sct"])
    assert isinstance(loaded.model, TrigFlowPrecond) and loaded.family == "consistency"
    assert loaded.spec.taus == pytest.approx((0.5 * math.tan(1.1),))


def test_scd_converts_the_edm_teacher_and_starts_as_its_denoiser(runs, composer) -> None:
    model = runs["scd_model"]
    assert isinstance(model.teacher, EDMTrigFlowPrecond) and not model.teacher.net.training
    assert not any(k.startswith(("teacher", "_teacher")) for k in model.state_dict())
    ckpt = torch.load(runs["scd"], map_location="cpu", weights_only=True)
    assert ckpt["cmexp"]["kind"] == "scd" and ckpt["cmexp"]["precond"] == {"name": "trigflow_edm"}
    assert ckpt["cmexp"]["teacher_path"] == str(runs["edm"])
    # a fresh student (before any step) is the teacher's denoiser in the sigma interface
    fresh = hydra.utils.instantiate(
        composer(["+experiment=fmnist_scd", *TINY, f"model.teacher_path={runs['edm']}"]).model
    )
    teacher_state = torch.load(runs["edm"], map_location="cpu", weights_only=True)["state_dict"]
    edm = EDMPrecond(fresh.teacher.net)
    edm.load_state_dict({k[4:]: v for k, v in teacher_state.items() if k.startswith("ema.")})
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 5.0])
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.model(x, sigma), edm.eval()(x, sigma), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(fresh.ema(x, sigma), fresh.model(x, sigma))


def test_scd_teacher_mismatch_is_one_error_naming_the_key(runs, composer) -> None:
    cfg = composer(
        [
            "+experiment=fmnist_scd",
            *TINY,
            f"model.teacher_path={runs['edm']}",
            "model.precond.c_noise_scale=1.0",
        ]
    )
    errors = (ValueError, hydra.errors.InstantiationException)
    with pytest.raises(
        errors,
        match=r"model.teacher_path=.* was trained with c_noise_scale=0.25 but this run sets model.precond.c_noise_scale=1.0",
    ):
        hydra.utils.instantiate(cfg.model)
    cfg = composer(["+experiment=fmnist_scd", *TINY, f"model.teacher_path={runs['sct']}"])
    with pytest.raises(errors, match="holds a 'sct' model; expected 'edm'"):
        hydra.utils.instantiate(cfg.model)


def test_sample_eval_and_edit_work_on_sct_and_scd_checkpoints(runs, tmp_path: Path) -> None:
    from cmexp.edit import edit
    from cmexp.sample import sample

    for kind in ("sct", "scd"):
        out = sample(
            compose_train(
                [f"ckpt={runs[kind]}", "num_samples=3", "steps=2"],
                tmp_path / f"s_{kind}",
                config_name="sample",
            )
        )
        info = json.loads((tmp_path / f"s_{kind}" / "sample.json").read_text())
        assert info["nfe"] == 2 and info["sigmas"] == pytest.approx([80.0, 0.5 * math.tan(1.1)])
        assert out["images"].shape == (3, 3, 32, 32) and torch.isfinite(out["images"]).all()
        arr = np.load(tmp_path / f"s_{kind}" / "samples.npz")["arr_0"]
        assert arr.shape == (3, 32, 32, 3)
    # a sample equals the dedicated TrigFlow sampler's (eps -> 0 aside: sqrt(tau^2 - eps^2))
    loaded = load_model(runs["sct"])
    from cmexp.diffusion import SeededNoise, sample_multistep, sample_trigflow

    noise = SeededNoise([0, 1])
    z = noise.randn((3, 32, 32))
    a = sample_multistep(loaded.model, z, [80.0, 0.5 * math.tan(1.1)], 0.0, noise=noise.randn_like)
    noise = SeededNoise([0, 1])
    z = noise.randn((3, 32, 32))
    b = sample_trigflow(loaded.model, z, [loaded.model.t_max, 1.1], noise=noise.randn_like)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    edit(
        compose_train(
            ["task=denoise", f"ckpt={runs['sct']}", "num_samples=2"],
            tmp_path / "edit",
            config_name="edit",
        )
    )
    assert (tmp_path / "edit" / "metrics.json").is_file()


def test_eval_scores_an_sct_checkpoint(runs, tmp_path: Path) -> None:
    from cmexp.eval import evaluate

    clf = tmp_path / "clf"
    train(
        compose_train(
            [
                *TINY,
                "model=classifier",
                "net=small_cnn",
                "net.width=4",
                "net.feature_dim=8",
                "~callbacks.sample_grid",
                "trainer.max_steps=2",
            ],
            clf,
        )
    )
    cfg = compose_train(
        [
            f"ckpt={runs['sct']}",
            "steps=[1,2]",
            "num_samples=8",
            "num_real=16",
            "batch_size=8",
            f"features.ckpt={clf / 'checkpoints' / 'last.ckpt'}",
            f"cache_dir={tmp_path / 'cache'}",
        ],
        tmp_path / "ev",
        config_name="eval",
    )
    out = evaluate(cfg)
    assert set(out["metrics"]) == {"1step", "2step"}
    assert all(math.isfinite(m["fd_fmnist"]) for m in out["metrics"].values())


def test_sct_resumes_exactly(tmp_path: Path) -> None:
    base = [
        "+experiment=fmnist_sct",
        *TINY,
        "quality=none",
        "model.loss.warmup_steps=2",
        "callbacks.checkpoint.every_n_train_steps=2",
    ]
    full = train(compose_train([*base, "trainer.max_steps=4"], tmp_path / "full"))["model"]
    train(compose_train([*base, "trainer.max_steps=2"], tmp_path / "half"))
    resumed = train(
        compose_train(
            [
                *base,
                "trainer.max_steps=4",
                f"ckpt_path={tmp_path / 'half' / 'checkpoints' / 'last.ckpt'}",
            ],
            tmp_path / "half",
        )
    )["model"]
    for a, b in (
        (full.model, resumed.model),
        (full.ema, resumed.ema),
        (full.weight_net, resumed.weight_net),
    ):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for name in sa:
            torch.testing.assert_close(sa[name], sb[name], msg=name)
    assert _losses(tmp_path / "full")[3] == pytest.approx(_losses(tmp_path / "half")[3], rel=1e-6)


class _Report(pl.Callback):
    """Each rank writes its online, EMA and weighting parameters at the end of training."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def vec(m: torch.nn.Module) -> list[float]:
            return torch.cat([p.detach().flatten() for p in m.parameters()]).tolist()

        report = {
            "online": vec(pl_module.model),
            "ema": vec(pl_module.ema),
            "weight": vec(pl_module.weight_net),
        }
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def test_sct_ddp_equals_the_single_process_step_and_keeps_ranks_identical(
    tmp_path: Path, monkeypatch
) -> None:
    """2 processes x 4 images == 1 process x 8 images (times and noise drawn for the global batch
    and sliced; no dropout: its masks come from each rank's own stream). The tangent JVP runs on
    the unwrapped network under no_grad; the online pass inside Lightning's DDP forward carries
    the gradient, so DDP all-reduces every parameter (network and adaptive weighting): after 3
    steps all ranks hold the same weights, equal to the single-process run's."""
    reports = {}
    # plain SGD: weight differences are gradient differences (Adam would blow the rounding noise of
    # near-zero gradients up to lr-sized steps)
    sgd = [
        "model.optimizer._target_=torch.optim.SGD",
        "~model.optimizer.betas",
        "~model.optimizer.eps",
        "model.optimizer.lr=0.05",
    ]
    common = [*TINY, "model=sct", "trainer.max_steps=3", "model.loss.warmup_steps=2", *sgd]
    for name, (folder, run) in train_single_and_ddp(
        tmp_path, monkeypatch, common, _Report
    ).items():
        reports[name] = [
            json.loads((folder / f"rank{r}.json").read_text())
            for r in ((0, 1) if name == "ddp" else (0,))
        ]
        reports[name][0]["losses"] = logged_losses(run)
    (single,), (r0, r1) = reports["single"], reports["ddp"]
    assert len(r0["losses"]) == 3
    for key in ("online", "ema", "weight"):
        assert r0[key] == r1[key], key  # identical on every rank
        assert r0[key] == pytest.approx(single[key], abs=1e-5), key  # = the single-process step
    assert r0["losses"] == pytest.approx(single["losses"], rel=1e-4)
    start = hydra.utils.instantiate(
        compose_train([*common, "dataset.batch_size=8"], tmp_path / "init").model
    )
    init = torch.cat([p.detach().flatten() for p in start.model.parameters()])
    assert not torch.allclose(init, torch.tensor(r0["online"]))  # training moved the weights
