"""The Fig. 3 sweeps compose into the expected jobs; a tiny multirun runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from .conftest import CONF_DIR, CT_EXPERIMENT

ROOT = CONF_DIR.parent
NS = ["9", "12", "18", "36", "50", "60", "80", "120"]


def jobs(overrides: list[str]) -> list[list[str]]:
    """The job override lists Hydra's basic sweeper launches for this command line."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides(params)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


@pytest.mark.parametrize(
    ("experiment", "sweep", "count", "expected"),
    [
        ("cifar10_cd_lpips", "fig3a", 3, [["metric=l2"], ["metric=l1"], ["metric=lpips"]]),
        (
            "cifar10_cd_lpips",
            "fig3b",
            16,
            [
                ["solver=euler", "schedule.num_scales=9"],
                ["solver=heun", "schedule.num_scales=120"],
            ],
        ),
        (
            "cifar10_cd_lpips",
            "fig3c",
            8,
            [["solver=heun", f"schedule.num_scales={n}"] for n in NS],
        ),
        ("cifar10_ct_lpips", "fig3d", 4, [["schedule=adaptive"], ["schedule=fixed_n120"]]),
        ("fmnist_cd_l2", "seeds", 3, [["seed=0"], ["seed=1"], ["seed=2"]]),
        ("cifar10_cd_lpips", "fig4", 2, [["metric=l2"], ["metric=lpips"]]),
        ("cifar10_pd_cm", "fig4", 2, [["metric=l2"], ["metric=lpips"]]),
        ("fmnist_pd", "fig4", 2, [["metric=l2"], ["metric=lpips"]]),
    ],
)
def test_sweep_composes_into_the_expected_jobs(experiment, sweep, count, expected) -> None:
    got = jobs([f"+experiment={experiment}", f"+sweep={sweep}"])
    assert len(got) == count
    for job in expected:
        assert job in got


def test_every_sweep_job_composes(composer) -> None:
    import hydra

    for job in jobs(["+experiment=cifar10_ct_lpips", "+sweep=fig3d"]):
        cfg = composer(["+experiment=cifar10_ct_lpips", *job])
        schedule = hydra.utils.instantiate(cfg.schedule)
        n, mu = schedule(0)
        if job == ["schedule=fixed_n120"]:
            assert (n, mu) == (120, 0.99)  # the official code's fixed CT setting
    cfg = composer(["+experiment=cifar10_cd_lpips", "solver=euler", "schedule.num_scales=50"])
    assert cfg.solver._target_.endswith("euler_step") and cfg.model.schedule.num_scales == 50


def test_tiny_multirun_runs_every_job_and_compare_reads_it(tmp_path: Path) -> None:
    import shutil

    from cmexp.compare import compare

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmexp.train",
            CT_EXPERIMENT,
            "debug=tiny",
            "model=ct",
            "trainer.max_steps=2",
            "+sweep=seeds",
            "logger=wandb",
            f"hydra.sweep.dir={tmp_path}",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted(
        p for p in tmp_path.iterdir() if p.is_dir() and (p / "checkpoints" / "last.ckpt").is_file()
    )
    assert [p.name for p in runs] == ["0", "1", "2"]
    assert (runs[1] / ".hydra" / "overrides.yaml").read_text().count("seed=1") == 1
    # compare: a table row and a curve per run, from the sweep folder
    files = compare([str(tmp_path)], tmp_path / "cmp", metric="train/loss")
    md = files["md"].read_text()
    assert [line.split("|")[1].strip() for line in md.splitlines()[2:]] == [
        "seed=0",
        "seed=1",
        "seed=2",
    ]
    assert files["png"].stat().st_size > 1000 and "train/loss" in files["csv"].read_text()
    # without its CSV log a run is read back from its W&B offline run (wandb leet inspect --json)
    wb = tmp_path / "wb_only"
    shutil.copytree(runs[0], wb)
    shutil.rmtree(wb / "csv")
    from cmexp.compare import find_runs

    (only,) = find_runs([str(wb)])
    assert only.final("train/loss") == pytest.approx(
        find_runs([str(runs[0])])[0].final("train/loss"), rel=1e-6
    )


@pytest.mark.parametrize("name", ["fig3a", "fig3b", "fig3c", "fig3d", "seeds"])
def test_wandb_sweep_files_match_the_hydra_sweeps(name: str) -> None:
    import math

    import yaml

    spec = yaml.safe_load((ROOT / "sweeps" / f"{name}.yaml").read_text())
    assert spec["method"] == "grid" and "cmexp.train" in spec["command"]
    experiment = next(a for a in spec["command"] if a.startswith("+experiment=")).split("=", 1)[1]
    grid = math.prod(len(p.get("values", [p.get("value")])) for p in spec["parameters"].values())
    assert grid == len(jobs([f"+experiment={experiment}", f"+sweep={name}"]))


def test_submitit_local_launcher_runs_a_sweep(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmexp.train",
            "-m",
            CT_EXPERIMENT,
            "debug=tiny",
            "model=ct",
            "trainer.max_steps=1",
            "seed=0,1",
            "hydra/launcher=submitit_local",
            "hydra.launcher.cpus_per_task=1",
            f"hydra.sweep.dir={tmp_path}",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.parent.parent.name for p in tmp_path.glob("*/checkpoints/last.ckpt")) == [
        "0",
        "1",
    ]
    assert (tmp_path / ".submitit").is_dir()


def test_fig4_jobs_train_cd_and_pd_at_equal_images_seen(composer) -> None:
    """Fig. 4 compares CD and PD from the same teacher at the same training budget: every job
    of the sweep composes, the CIFAR-10 pair sees the same images (800k x 512), and the PD
    rounds fill the run down to a 1-step student."""
    import hydra

    budgets = {}
    for experiment in ("cifar10_cd_lpips", "cifar10_pd_cm"):
        for job in jobs([f"+experiment={experiment}", "+sweep=fig4"]):
            cfg = composer([f"+experiment={experiment}", *job])
            assert cfg.metric._target_.split(".")[-1] in ("L2Distance", "LPIPSDistance")
            budgets[experiment] = cfg.trainer.max_steps * cfg.global_batch_size
    assert budgets["cifar10_cd_lpips"] == budgets["cifar10_pd_cm"] == 800_000 * 512
    pd = composer(["+experiment=cifar10_pd_cm", "metric=l2"])
    assert (
        sum(pd.model.steps_per_round) == pd.trainer.max_steps and pd.model.teacher_steps == 2**13
    )
    assert (
        hydra.utils.instantiate(pd.model.loss.weighting).__class__.__name__
        == "TruncatedSNRWeighting"
    )


def test_fig4_script_commands_compose_with_equal_budgets_and_the_table_reads_eval_output(
    tmp_path: Path,
) -> None:
    """scripts/fig4_fmnist.sh with DRY_RUN=1 prints its commands: the CD and PD trainings
    compose with the same steps x batch, and --table turns cmexp.eval outputs into fig4.md/png."""
    import json
    import shlex

    teacher, clf = tmp_path / "teacher.ckpt", tmp_path / "clf.ckpt"
    teacher.touch()
    clf.touch()
    env = {**os.environ, "DRY_RUN": "1", "CLASSIFIER": str(clf), "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", "scripts/fig4_fmnist.sh", str(teacher), str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.splitlines() if " -m cmexp." in line]
    trains = [a[3:] for a in lines if a[2] == "cmexp.train"]
    evals = [a[3:] for a in lines if a[2] == "cmexp.eval"]
    assert len(trains) == 2 and len(evals) == 8
    budgets = []
    for args in trains:
        keep = [
            a
            for a in args
            if not a.startswith(
                ("+sweep", "hydra.", "model.teacher_path", "callbacks.sample_quality")
            )
        ]
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=keep)
        budgets.append(cfg.trainer.max_steps * cfg.dataset.batch_size)
        if cfg.model._target_.endswith("PDLitModule"):
            assert cfg.model.steps_per_round * cfg.model.num_rounds == cfg.trainer.max_steps
            assert cfg.model.teacher_steps // 2**cfg.model.num_rounds == 1
    assert budgets[0] == budgets[1] == 1200 * 64
    assert any("solver_steps=[1,2,4,8]" in a and "sampler=ddim" in a for a in evals)
    assert all(
        "num_real=10000" in e and "real_split=test" in e for e in evals
    )  # the results.md protocol
    assert (
        sum(any(a.startswith("ckpt=") and "/pd/0/checkpoints/step" in a for a in e) for e in evals)
        == 4
    )
    # --table: fd_fmnist against NFE from the eval folders
    for name, sets in {
        "cd": {"1step": (1, "consistency", 30.0), "2step": (2, "consistency", 20.0)},
        "pd_round6": {"ddim1nfe": (1, "ddim", 40.0)},
        "teacher_ddim": {"ddim1nfe": (1, "ddim", 90.0), "ddim2nfe": (2, "ddim", 60.0)},
    }.items():
        folder = tmp_path / "out" / "eval" / name
        folder.mkdir(parents=True)
        payload = {
            "metrics": {k: {"fd_fmnist": v[2]} for k, v in sets.items()},
            "protocol": {
                "ckpt": name,
                "sets": {k: {"nfe": v[0], "sampler": v[1]} for k, v in sets.items()},
            },
        }
        (folder / "metrics.json").write_text(json.dumps(payload))
    table = subprocess.run(
        ["bash", "scripts/fig4_fmnist.sh", "--table", str(tmp_path / "out")],
        cwd=ROOT,
        env={**env, "DRY_RUN": "0"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert table.returncode == 0, table.stderr
    md = (tmp_path / "out" / "fig4.md").read_text()
    assert (
        "| cd | 30.00 | 20.00 |" in md
        and "| pd | 40.00 | - |" in md
        and "| teacher_ddim | 90.00 | 60.00 |" in md
    )
    assert (tmp_path / "out" / "fig4.png").stat().st_size > 1000


def test_modes_sweep_trains_every_mode_at_equal_images_seen(composer, tmp_path: Path) -> None:
    """+sweep=modes puts all eight modes on the same budget and evaluation cadence;
    scripts/modes_fmnist.py runs one resumable run per arm (TCM: stage 2 from the ECT arm's
    checkpoint at half the budget) and turns the logs into the fd-vs-images table and plot."""
    budgets = set()
    arms = {
        "cd": "fmnist_cd_l2",
        "ect": "fmnist_ect",
        "scd": "fmnist_scd",
        "ct": "fmnist_ct_pseudo_huber",
        "sct": "fmnist_sct",
        "meanflow": "fmnist_meanflow",
        "imm": "fmnist_imm",
        "tcm": "fmnist_tcm",
    }
    for experiment in arms.values():
        overrides = [f"+experiment={experiment}", "+sweep=modes"]
        if experiment == "fmnist_tcm":
            overrides.append("model.stage1_path=S.ckpt")
        cfg = composer(overrides)
        q = cfg.callbacks.sample_quality
        budgets.add(
            (cfg.trainer.max_steps, cfg.dataset.batch_size, q.every_n_steps, q.num_samples, q.seed)
        )
    assert budgets == {(1000, 64, 250, 1000, 0)}
    script = [sys.executable, "scripts/modes_fmnist.py"]
    env = {**os.environ, "DRY_RUN": "1"}
    args = ["--teacher", "T.ckpt", "--out", str(tmp_path), "--steps", "1200", "--until", "800"]
    out = subprocess.run(
        [*script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cmds = {
        line.split("hydra.sweep.subdir=")[1].split()[0]: line
        for line in out.stdout.splitlines()
        if "cmexp.train" in line
    }
    assert list(cmds) == [n if n != "tcm" else "tcm_800" for n in arms]
    for name, experiment in arms.items():
        cmd = cmds[name if name != "tcm" else "tcm_800"]
        assert f"+experiment={experiment} +sweep=modes" in cmd
        assert ("++model.teacher_path=T.ckpt" in cmd) == (name in ("cd", "ect", "scd"))
        assert "trainer.max_steps=" + ("400" if name == "tcm" else "800") in cmd
    assert "schedule.total_steps=1200" in cmds["ct"]  # the curriculum of the whole budget
    # TCM for the budget 800: stage 1 = ECT's 400 steps (25.6 kimg: stage 1), 400 of its own
    stage1 = tmp_path / "runs" / "ect" / "checkpoints" / "step0000400.ckpt"
    assert f"model.stage1_path={stage1}" in cmds["tcm_800"]
    assert "model.start_stage=1" in cmds["tcm_800"]
    bad = subprocess.run(
        [*script, "--modes", "cd,xyz"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "--modes: unknown xyz" in bad.stderr
    (tmp_path / "study.json").write_text('{"steps": 1200}')
    for name, fd in (("ect", 3.0), ("tcm_1200", 5.0)):
        run = tmp_path / "runs" / name
        (run / "csv").mkdir(parents=True)
        (run / "csv" / "metrics.csv").write_text(
            "step,train/kimg,val/fd_fmnist_1step,val/fd_fmnist_2step\n"
            f"199,12.8,,\n200,,{2 * fd},{fd}\n399,25.6,,\n400,,{fd},{fd / 2}\n"
        )
    out = subprocess.run(
        [*script, "--table", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = (tmp_path / "modes.csv").read_text().splitlines()
    assert "ect,fmnist_ect,400,25.6,3.0,1.5" in rows  # logged at global_step 400: 400 x 64
    # TCM's images seen include its stage 1: 600 ECT steps (38.4 kimg) before its own 400
    assert "tcm_1200,fmnist_tcm,400,64.0,5.0,2.5" in rows
    assert (tmp_path / "modes.png").stat().st_size > 1000
    # --final: the table of cmexp.eval's metrics.json at a budget (TCM: its run for that budget)
    for name, ckpt, fd in (
        ("ect", "ect/checkpoints/step0000600", 7.0),
        ("tcm", "tcm_600/checkpoints/step0000300", 9.0),
    ):
        (tmp_path / "runs" / f"{ckpt}.ckpt").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / f"{ckpt}.ckpt").write_bytes(b"")
        sets = {
            k: {"fd_fmnist": fd / n, "precision": 0.5, "recall": 0.25}
            for n, k in ((1, "1step"), (2, "2step"))
        }
        (tmp_path / "final" / f"{name}_600").mkdir(parents=True)
        (tmp_path / "final" / f"{name}_600" / "metrics.json").write_text(
            json.dumps({"metrics": sets})
        )
    out = subprocess.run(
        [*script, "--final", str(tmp_path), "--at", "600", "--modes", "ect,tcm"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    md = (tmp_path / "final.md").read_text()
    assert "| ect | `fmnist_ect` | 7.00 | 3.50 | 0.50 / 0.25 | 0.50 / 0.25 |" in md
    assert "| tcm | `fmnist_tcm` | 9.00 | 4.50 |" in md


def test_modes_script_draws_every_runs_samples_with_the_same_seeds(tmp_path: Path) -> None:
    """scripts/modes_fmnist.py --grids: one row per mode and step count from each run's
    last.ckpt (here a tiny CT run laid out as a +sweep=modes multirun job)."""
    from cmexp.train import train

    from .conftest import compose_train

    run = tmp_path / "runs" / "ct"  # the CT arm's run folder
    train(compose_train(["debug=tiny", "model=ct", "trainer.max_steps=2"], run))
    out = subprocess.run(
        [sys.executable, "scripts/modes_fmnist.py", "--grids", str(tmp_path)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    from PIL import Image

    png = tmp_path / "modes_grid.png"
    assert png.is_file() and Image.open(png).size[1] > 50
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run(
        [sys.executable, "scripts/modes_fmnist.py", "--grids", str(empty)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (out.returncode, out.stderr) == (
        1,
        f"no checkpoints under {empty / 'runs'}: train first\n",
    )
