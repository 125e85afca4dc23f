"""The paper's baselines end to end (tiny nets, synthetic data, CPU): progressive distillation
rounds with exact resume and its checkpoints on the inference side, the DDPM-line samplers on
an EDM teacher through `cmexp.sample` / `cmexp.eval`, and a VP teacher at zero terminal SNR."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cmexp.inference import load_model
from cmexp.sample import sample
from cmexp.train import train
from cmexp.utils.checks import ConfigError
from cmexp import registry

from .conftest import compose_train, raises_wrapped_value_error

TINY = ["debug=tiny"]
ROOT = Path(__file__).resolve().parents[2]
# a PD run small enough for the tests: 8 teacher steps -> 4, 2, 1 in rounds of 3 steps
ROUNDS = [
    "model.teacher_steps=8",
    "model.num_rounds=3",
    "model.steps_per_round=3",
    "trainer.max_steps=9",
]


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _losses(run: Path) -> dict[int, float]:
    rows = _rows(run)
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EDM teacher trained here on the synthetic set (tiny net, 3 x 32 x 32)."""
    out = tmp_path_factory.mktemp("teacher") / "edm"
    train(
        compose_train([*TINY, "model=edm", "trainer.max_steps=4", "model.lr_warmup_kimg=0"], out)
    )
    return out / "checkpoints" / "last.ckpt"


def _cli(entry: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "CMEXP_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"cmexp.{entry}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# ------------------------------------------------------------------ progressive distillation
def test_fmnist_pd_experiment_runs_on_cpu_from_a_trained_teacher(
    composer, teacher_ckpt: Path
) -> None:
    """`+experiment=fmnist_pd model.teacher_path=<edm>` (debug=tiny: the tiny net on the
    synthetic set): the student starts from the teacher, round 0 distils 64 -> 32 steps."""
    cfg = composer(
        ["+experiment=fmnist_pd", *TINY, f"model.teacher_path={teacher_ckpt}", "quality=none"],
        name="fm",
    )
    assert (
        cfg.model.teacher_steps == 64
        and cfg.model.num_rounds == 6
        and cfg.trainer.gradient_clip_val == 1.0
    )
    out = train(cfg)
    model = out["model"]
    assert out["trainer"].global_step == 4 and model.teacher_round == 0
    assert not model.round_teacher.training and all(
        not p.requires_grad for p in model.round_teacher.parameters()
    )
    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for (
        name,
        p,
    ) in model.round_teacher.named_parameters():  # round 0's teacher = the EDM teacher's EMA
        torch.testing.assert_close(p, state[f"ema.{name}"])
    rows = _rows(Path(cfg.paths.output_dir))
    assert {float(r["train/student_steps"]) for r in rows if r.get("train/student_steps")} == {
        32.0
    }
    assert (Path(cfg.paths.output_dir) / "samples" / "ddim32nfe_last.png").is_file()


def test_pd_rounds_halve_the_steps_and_checkpoints_sample_with_their_own_ddim_plan(
    composer, teacher_ckpt: Path, tmp_path: Path
) -> None:
    cfg = composer(
        [
            *TINY,
            "model=pd",
            f"model.teacher_path={teacher_ckpt}",
            *ROUNDS,
            "callbacks.checkpoint.every_n_train_steps=3",
        ],
        name="pd",
    )
    out = train(cfg)
    run = Path(cfg.paths.output_dir)
    rows = _rows(run)
    steps = {
        int(r["step"]): (int(float(r["train/round"])), int(float(r["train/student_steps"])))
        for r in rows
        if r.get("train/round")
    }
    assert steps == {
        0: (0, 4),
        1: (0, 4),
        2: (0, 4),
        3: (1, 2),
        4: (1, 2),
        5: (1, 2),
        6: (2, 1),
        7: (2, 1),
        8: (2, 1),
    }
    lrs = [float(r["lr-Adam"]) for r in rows if r.get("lr-Adam")]
    assert lrs[:4] == pytest.approx(
        [5e-5, 5e-5 * 2 / 3, 5e-5 / 3, 5e-5]
    )  # linear decay, restarted per round
    # the student of round k-1 became round k's teacher: at the end, round 2's teacher is the
    # round-1 student, saved at step 6
    model = out["model"]
    at6 = torch.load(
        run / "checkpoints" / "step0000006.ckpt", map_location="cpu", weights_only=True
    )
    for name, p in model.round_teacher.named_parameters():
        torch.testing.assert_close(p, at6["state_dict"][f"ema.{name}"])
    # each round's checkpoint loads on the inference side with its student's own plan
    for step, n in ((3, 4), (6, 2), (9, 1)):
        loaded = load_model(run / "checkpoints" / f"step{step:07d}.ckpt")
        assert loaded.kind == "pd" and loaded.family == "denoiser"
        assert (loaded.spec.sampler, loaded.spec.final_zero, loaded.spec.num_scales) == (
            "ddim",
            False,
            n + 1,
        )
    info = sample(
        compose_train(
            [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "num_samples=3"],
            tmp_path / "s",
            config_name="sample",
        )
    )["info"]
    assert info["kind"] == "pd" and info["sampler"] == "ddim" and info["nfe"] == 1
    assert info["sigmas"] == [80.0, 0.002]
    two = sample(
        compose_train(
            [f"ckpt={run / 'checkpoints' / 'step0000006.ckpt'}", "num_samples=3"],
            tmp_path / "s2",
            config_name="sample",
        )
    )["info"]
    assert two["nfe"] == 2 and len(two["sigmas"]) == 3


def test_pd_resume_in_the_middle_of_round_two_continues_the_uninterrupted_run(
    composer, teacher_ckpt: Path
) -> None:
    """Round, round teacher, student, optimizer and RNG all come back from the checkpoint: the
    resumed run's losses and weights equal the uninterrupted run's."""
    common = [
        *TINY,
        "model=pd",
        f"model.teacher_path={teacher_ckpt}",
        *ROUNDS,
        "callbacks.checkpoint.every_n_train_steps=1",
        "dataset.length=40",
        "model.ema_decay=0.5",
    ]
    full = composer(common, name="full")
    full_model = train(full)["model"]
    full_losses = _losses(Path(full.paths.output_dir))
    mid = (
        Path(full.paths.output_dir) / "checkpoints" / "step0000007.ckpt"
    )  # round 2 = steps 6, 7, 8
    assert torch.load(mid, map_location="cpu", weights_only=True)["cmexp"]["pd_round"] == 2
    resumed = composer([*common, f"ckpt_path={mid}"], name="resumed")
    out = train(resumed)
    res_losses = _losses(Path(resumed.paths.output_dir))
    assert out["trainer"].global_step == 9 and out["model"].teacher_round == 2
    assert sorted(res_losses) == [7, 8]
    for step, value in res_losses.items():
        assert value == pytest.approx(full_losses[step], rel=1e-5, abs=1e-7), step
    for part in ("model", "round_teacher", "ema"):
        a, b = getattr(full_model, part).state_dict(), getattr(out["model"], part).state_dict()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.teacher_steps=8", "model.num_rounds=4"],
            "model.num_rounds=4 exceeds log2(model.teacher_steps=8) = 3",
        ),
        (
            ["model.teacher_steps=12", "model.num_rounds=3"],
            "model.teacher_steps=12 is not divisible by 2^model.num_rounds",
        ),
        (
            ["model.teacher_steps=8", "model.steps_per_round=[2,2]"],
            "model.steps_per_round must be one integer or one per round (3)",
        ),
        (
            ["model.teacher_steps=8", "model.steps_per_round=1"],
            "trainer.max_steps=4 exceeds the rounds' total",
        ),
    ],
)
def test_pd_bad_rounds_name_the_key(composer, teacher_ckpt: Path, overrides, message) -> None:
    cfg = composer([*TINY, "model=pd", f"model.teacher_path={teacher_ckpt}", *overrides])
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("^", r"\^")
    ):
        train(cfg)
    with pytest.raises(
        ConfigError, match="model.teacher_path is required for progressive distillation"
    ):
        train(composer([*TINY, "model=pd"]))


def test_pd_round_error_on_the_command_line_is_one_line(
    teacher_ckpt: Path, tmp_path: Path
) -> None:
    out = _cli(
        "train",
        "+experiment=fmnist_pd",
        "debug=tiny",
        f"model.teacher_path={teacher_ckpt}",
        "model.num_rounds=7",
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("error: model.num_rounds=7 exceeds log2(model.teacher_steps=64) = 6")
    )


# ------------------------------------------------------------------ samplers on the EDM teacher
def test_sample_ddim_ddpm_and_edm_sde_on_an_edm_checkpoint(
    teacher_ckpt: Path, tmp_path: Path
) -> None:
    def run(name: str, *args: str) -> dict:
        return sample(
            compose_train(
                [f"ckpt={teacher_ckpt}", "num_samples=4", "num_scales=4", *args],
                tmp_path / name,
                config_name="sample",
            )
        )

    heun = run("heun")["info"]
    assert heun["sampler"] == "heun" and heun["nfe"] == 7  # the checkpoint's own sampler
    ddim = run("ddim", "sampler=ddim")
    euler = run("euler", "sampler=euler")
    assert ddim["info"]["nfe"] == 4 and ddim["info"]["options"] == {"eta": 0.0}
    torch.testing.assert_close(
        ddim["images"], euler["images"], atol=1e-5, rtol=0
    )  # DDIM eta 0 = Euler
    ddpm = run("ddpm", "sampler=ddpm")
    assert ddpm["info"]["nfe"] == 4 and not torch.allclose(ddpm["images"], ddim["images"])
    # stochastic samplers draw from image i's own generator: the same images in any batch
    ddpm2 = run("ddpm2", "sampler=ddpm", "batch_size=3")
    torch.testing.assert_close(
        ddpm["images"], ddpm2["images"], atol=1e-5, rtol=0
    )  # batch-size rounding only
    eta = run("eta", "sampler=ddim", "eta=0.5")
    assert eta["info"]["options"] == {"eta": 0.5} and not torch.allclose(
        eta["images"], ddim["images"]
    )
    sde = run("sde", "sampler=edm_sde", "s_churn=10", "s_tmin=0.05", "s_tmax=50", "s_noise=1.003")
    assert sde["info"]["nfe"] == 7 and sde["info"]["options"]["s_churn"] == 10.0
    sde0 = run("sde0", "sampler=edm_sde")
    torch.testing.assert_close(sde0["images"], run("heun2")["images"])  # S_churn = 0 is Heun
    few = run("few", "sampler=ddim", "solver_steps=2")["info"]
    assert few["nfe"] == 2 and few["sigmas"] == pytest.approx(
        [80.0, (80 ** (1 / 7) / 2 + 0.002 ** (1 / 7) / 2) ** 7, 0.002]
    )
    assert run("fewh", "sampler=heun", "solver_steps=2")["info"]["nfe"] == 4
    arr = np.load(tmp_path / "ddpm" / "samples.npz")["arr_0"]
    assert arr.shape == (4, 32, 32, 3)


@pytest.mark.parametrize(
    ("arg", "line"),
    [
        (
            "sampler=dpm",
            f"error: sampler must be one of {', '.join(registry.samplers())} or null, got 'dpm'",
        ),
        ("eta=-0.5", "error: eta must be a number >= 0, got -0.5"),
    ],
)
def test_bad_sampler_input_is_one_line_naming_the_key(
    teacher_ckpt: Path, tmp_path: Path, arg: str, line: str
) -> None:
    out = _cli(
        "sample",
        f"ckpt={teacher_ckpt}",
        "num_samples=1",
        "sampler=ddim",
        arg,
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == line


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "run"
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
            out,
        )
    )
    return out / "checkpoints" / "last.ckpt"


def test_eval_scores_the_teacher_at_several_solver_step_counts(
    teacher_ckpt: Path, classifier_ckpt: Path, tmp_path: Path
) -> None:
    from cmexp.eval import evaluate

    cfg = compose_train(
        [
            f"ckpt={teacher_ckpt}",
            "sampler=ddim",
            "solver_steps=[1,2,4]",
            "num_samples=8",
            "num_real=16",
            "batch_size=8",
            f"features.ckpt={classifier_ckpt}",
            f"cache_dir={tmp_path / 'cache'}",
        ],
        tmp_path / "ev",
        config_name="eval",
    )
    out = evaluate(cfg)
    assert set(out["metrics"]) == {"ddim1nfe", "ddim2nfe", "ddim4nfe"}
    sets = json.loads((tmp_path / "ev" / "metrics.json").read_text())["protocol"]["sets"]
    assert sets["ddim2nfe"]["nfe"] == 2 and sets["ddim1nfe"]["sigmas"] == [80.0, 0.002]
    assert all("fd_fmnist" in m for m in out["metrics"].values())


# ------------------------------------------------------------------ a VP teacher at zero terminal SNR
def test_vp_teacher_at_zero_terminal_snr_trains_and_samples_from_pure_noise(
    composer, teacher_ckpt: Path, tmp_path: Path
) -> None:
    from cmexp.diffusion import VPrecond

    cfg = composer(
        [
            *TINY,
            "model=edm_vp",
            "vp_schedule=linear",
            "vp_schedule.zero_terminal_snr=true",
            "model.sample_num_scales=4",
            "model.lr_warmup_kimg=0",
        ],
        name="vp",
    )
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert (Path(cfg.paths.output_dir) / "samples" / "ddim4nfe_last.png").is_file()
    loaded = load_model(ckpt)
    assert isinstance(loaded.model, VPrecond) and loaded.model.prediction == "v"
    assert loaded.spec.sigma_max == float("inf") and loaded.spec.alpha_bars[-1] == 0.0
    info = sample(
        compose_train([f"ckpt={ckpt}", "num_samples=2"], tmp_path / "s", config_name="sample")
    )
    assert info["info"]["sampler"] == "ddim" and info["info"]["sigmas"][0] == float("inf")
    assert torch.isfinite(info["images"]).all()
    with pytest.raises(ValueError, match="^sampler=heun cannot start at sigma_max = inf"):
        sample(
            compose_train([f"ckpt={ckpt}", "sampler=heun"], tmp_path / "h", config_name="sample")
        )
    with raises_wrapped_value_error(
        r"^model\.teacher_path=\S+ is a 'vp'-preconditioned teacher \(model=edm_vp\); "
        r"distillation here needs an EDM-preconditioned one \(model=edm\)$"
    ):
        train(composer([*TINY, "model=pd", f"model.teacher_path={ckpt}", *ROUNDS], name="pd_vp"))


def test_a_schedule_that_does_not_decrease_is_one_error_naming_alpha_bars(composer) -> None:
    cfg = composer(
        [
            *TINY,
            "model=edm_vp",
            "~vp_schedule.alpha_bars",
            "+vp_schedule.alpha_bars=[0.9,0.95,0.1]",
        ]
    )
    with raises_wrapped_value_error(  # Hydra wraps the ValueError; the CLI unwraps it
        r"^vp_schedule\.alpha_bars must be strictly decreasing \(alpha_bar falls as t grows\), "
        r"got vp_schedule\.alpha_bars\[1\]=0\.95 >= vp_schedule\.alpha_bars\[0\]=0\.9$"
    ):
        train(cfg)
