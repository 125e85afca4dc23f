"""ECT end to end: tuned from a teacher trained here, sampled and edited by the inference tools."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch

from cmexp.inference import load_model
from cmexp.methods.ect.module import ECTLitModule
from cmexp.sample import sample
from cmexp.train import train
from cmexp.utils.checks import ConfigError

from .conftest import compose_train

TINY = ["debug=tiny"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ect_teacher") / "edm"
    train(
        compose_train([*TINY, "model=edm", "trainer.max_steps=2", "model.lr_warmup_kimg=0"], out)
    )
    return out / "checkpoints" / "last.ckpt"


def test_ect_starts_from_the_teacher_and_trains_through_stages(composer, teacher: Path) -> None:
    cfg = composer(
        [
            *TINY,
            "model=ect",
            f"model.teacher_path={teacher}",
            "trainer.max_steps=6",
            "model.double_kimg=0.016",
        ]
    )  # batch 8: a new stage every 2 steps
    model: ECTLitModule = hydra.utils.instantiate(cfg.model)
    state = torch.load(teacher, map_location="cpu", weights_only=False)["state_dict"]
    for name, p in model.model.net.named_parameters():
        torch.testing.assert_close(p, state[f"ema.net.{name}"])
        torch.testing.assert_close(dict(model.ema.net.named_parameters())[name], p)
    # before tuning, the model in training mode is the teacher's EDM denoiser
    from cmexp.training.teacher import load_teacher

    t = load_teacher(str(teacher), hydra.utils.instantiate(cfg.net))
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 3.0])
    model.model.train()
    torch.testing.assert_close(model.model(x, sigma), t(x, sigma))

    train(cfg)
    run = Path(cfg.paths.output_dir)
    import csv

    with open(run / "csv" / "metrics.csv") as fh:
        stages = [float(r["train/stage"]) for r in csv.DictReader(fh) if r.get("train/stage")]
    assert stages == [0, 0, 1, 1, 2, 2]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["cmexp"]["kind"] == "ect" and ckpt["cmexp"]["teacher_path"] == str(teacher)
    assert ckpt["cmexp"]["sigma_min"] == pytest.approx(0.003) and ckpt["cmexp"]["taus"] == [
        pytest.approx(0.821)
    ]
    assert (run / "samples" / "2step_last.png").is_file()

    # the inference seam: a consistency model with the boundary scalings, sampled with Alg. 1
    loaded = load_model(run / "checkpoints" / "last.ckpt")
    assert loaded.family == "consistency" and not loaded.model.training
    torch.testing.assert_close(loaded.model(x, 0.003), x)
    out = sample(
        compose_train(
            [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "num_samples=2", "steps=2"],
            run.parent / "sample",
            config_name="sample",
        )
    )
    assert out["info"]["nfe"] == 2 and out["info"]["sigmas"] == [80.0, pytest.approx(0.821)]


def test_ect_resume_is_exact(composer, teacher: Path) -> None:
    base = [*TINY, "model=ect", f"model.teacher_path={teacher}", "model.double_kimg=0.016"]
    full = composer([*base, "trainer.max_steps=4"], name="full")
    train(full)
    half = composer([*base, "trainer.max_steps=2"], name="half")
    train(half)
    resumed = composer(
        [
            *base,
            "trainer.max_steps=4",
            f"ckpt_path={Path(half.paths.output_dir) / 'checkpoints' / 'last.ckpt'}",
        ],
        name="resumed",
    )
    train(resumed)
    a = torch.load(Path(full.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)[
        "state_dict"
    ]
    b = torch.load(
        Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False
    )["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_ect_without_a_teacher_names_the_key(composer) -> None:
    with pytest.raises(
        ConfigError, match="model.teacher_path is required for easy consistency tuning"
    ):
        train(composer([*TINY, "model=ect"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.loss.q=1", "model.loss.q"),
        ("model.double_kimg=0", "model.double_kimg"),
    ],
)
def test_ect_bad_values_name_the_key(composer, teacher: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(composer([*TINY, "model=ect", f"model.teacher_path={teacher}", override]))
