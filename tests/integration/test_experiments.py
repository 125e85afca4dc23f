"""Every experiment composes and instantiates; the command line prints configs and reports bad
input on one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from .conftest import CONF_DIR
from .conftest import CT_EXPERIMENT as CT

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
ROOT = CONF_DIR.parent


def _cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cmexp.train", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=300,
    )


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME holding a VGG16 backbone file of the right format (random values)."""
    from tests.fakes import write_fake_vgg16

    home = tmp_path_factory.mktemp("torch_home")
    write_fake_vgg16(home / "hub" / "checkpoints")
    return home


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per net config, a checkpoint shaped like an EDM teacher written by this suite."""
    return {"_dir": tmp_path_factory.mktemp("teachers")}


def _fake_teacher(cfg, cache: dict[str, Path]) -> Path:
    from cmexp.diffusion import EDMPrecond

    key = OmegaConf.to_yaml(cfg.net)
    if key not in cache:
        net = hydra.utils.instantiate(cfg.net)
        teacher = EDMPrecond(net)
        path = cache["_dir"] / f"teacher{len(cache)}.ckpt"
        meta = {
            "kind": "edm",
            "img_resolution": net.img_resolution,
            "img_channels": net.img_channels,
            "label_dim": net.label_dim,
            "sigma_min": 0.002,
            "sigma_max": 80.0,
            "sigma_data": float(cfg.model.precond.sigma_data),  # 0.5; latent experiments 1.0
            "c_noise_scale": 0.25,
        }
        state = {f"ema.{k}": v for k, v in teacher.state_dict().items()}
        torch.save({"cmexp": meta, "state_dict": state}, path)
        cache[key] = path
    return cache[key]


def _fake_stage1(cfg, cache: dict[str, Path]) -> Path:
    """A checkpoint shaped like an ECT run of this suite (TCM's stage 1), with its net config."""
    from cmexp.diffusion import CMPrecond

    key = "stage1:" + OmegaConf.to_yaml(cfg.net)
    if key not in cache:
        net_cfg = OmegaConf.to_container(cfg.net, resolve=True)
        net = hydra.utils.instantiate(net_cfg)
        path = cache["_dir"] / f"stage1_{len(cache)}.ckpt"
        meta = {
            "kind": "ect",
            "img_resolution": net.img_resolution,
            "img_channels": net.img_channels,
            "label_dim": net.label_dim,
            "sigma_min": float(cfg.model.precond.sigma_min),
            "sigma_max": float(cfg.model.precond.sigma_max),
            "sigma_data": float(cfg.model.precond.sigma_data),
            "c_noise_scale": float(cfg.model.precond.c_noise_scale),
            "config": {"net": net_cfg},
        }
        state = {f"ema.{k}": v for k, v in CMPrecond(net).state_dict().items()}
        torch.save({"cmexp": meta, "state_dict": state}, path)
        cache[key] = path
    return cache[key]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(
    name, composer, teachers, fake_weights, monkeypatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(fake_weights))
    cfg = composer([f"+experiment={name}"])
    assert cfg.model._target_.startswith("cmexp.methods.")
    if cfg.model._target_.endswith(("CDLitModule", "PDLitModule", "ECTLitModule")):
        OmegaConf.update(cfg, "model.teacher_path", str(_fake_teacher(cfg, teachers)))
    if cfg.model._target_.endswith("TCMLitModule"):
        OmegaConf.update(cfg, "model.stage1_path", str(_fake_stage1(cfg, teachers)))
    datamodule = hydra.utils.instantiate(cfg.dataset)
    assert datamodule.batch_size == cfg.dataset.batch_size
    model = hydra.utils.instantiate(cfg.model)
    net = (
        model.model if hasattr(model, "model") else model.net
    )  # classifier, autoencoder: a bare net
    shape = (
        cfg.latent if cfg.get("latent") else cfg.dataset
    )  # latent mode: the net sees the latents
    assert net.img_resolution == shape.resolution
    assert net.img_channels == shape.channels
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert trainer_cfg["max_steps"] > 0
    for cb in cfg.callbacks.values():
        hydra.utils.instantiate(cb)
    if name.startswith("cifar10"):
        # the paper's Table 3 values (PD: the PD paper's batch 128; the CM paper's PD: 512; ECT 128; iCT 1024)
        batch = {
            "cifar10_pd": 128,
            "cifar10_ect": 128,
            "cifar10_ict": 1024,
            "cifar10_tcm": 1024,
            "cifar10_meanflow": 1024,  # MeanFlow App. A (py-meanflow: 128 x 8 GPUs)
        }.get(name, 512)
        assert cfg.dataset.batch_size == batch and cfg.net.model_channels == 128
        if "_cd_" in name or "_ct_" in name:
            assert cfg.model.ema_decay == 0.9999
            assert cfg.model.optimizer._target_ == "torch.optim.RAdam"
    if "_cd_" in name:
        assert cfg.schedule.num_scales == 18 and cfg.schedule.mu == 0.0
        assert cfg.solver._target_ == "cmexp.diffusion.heun_step"
    if name.endswith(("_pd", "_pd_cm")):  # rounds that reach 1 step and fill the run
        assert (
            model.student_steps(model.num_rounds - 1) == 1
            and model.total_steps == cfg.trainer.max_steps
        )
        assert cfg.trainer.gradient_clip_val == 1.0 and cfg.model.ema_decay == 0.0


def test_main_job_is_the_quick_fashion_mnist_cd_from_the_zoo_teacher(composer) -> None:
    from cmexp.train import MAIN_EXPERIMENT, train_overrides

    assert MAIN_EXPERIMENT == "fmnist_cd_quick"
    assert train_overrides([]) == [f"+experiment={MAIN_EXPERIMENT}"]
    cfg = composer(train_overrides([]))
    assert cfg.dataset._target_.endswith("FashionMNISTDataModule") and cfg.dataset.batch_size == 64
    assert (
        cfg.model._target_ == "cmexp.methods.consistency.module.CDLitModule"
        and cfg.trainer.max_steps == 700
    )
    assert (
        cfg.model.teacher_path == "zoo:fmnist_edm" and cfg.net.model_channels == 16
    )  # ncsnpp_small
    assert cfg.schedule.num_scales == 18 and cfg.schedule.mu == 0.0
    assert cfg.solver._target_ == "cmexp.diffusion.heun_step" and list(cfg.model.taus) == [3.2568]
    # an explicit experiment is kept as given; debug configs are applied after the experiment
    assert train_overrides(["+experiment=fmnist_edm", "debug=tiny", "seed=1"]) == [
        "+experiment=fmnist_edm",
        "seed=1",
        "+debug=tiny",
    ]
    assert composer(train_overrides([CT, "debug=tiny"])).dataset.batch_size == 8


def test_main_job_starts_from_the_zoo_teacher(composer) -> None:
    """The main job needs no teacher run: its student, target and sampling EMA start as copies of
    the shipped teacher's weights (CM paper App. C)."""
    from cmexp.train import train_overrides

    cfg = composer(train_overrides([]))
    model = hydra.utils.instantiate(cfg.model)
    teacher = model._teacher[0].state_dict()
    for net in (model.model, model.target, model.ema):
        student = net.state_dict()
        assert student.keys() == teacher.keys()
        assert all(torch.equal(student[k], teacher[k]) for k in teacher)


def test_main_job_values_do_not_leak_into_other_experiments(composer) -> None:
    cfg = composer(["+experiment=cifar10_edm"])
    assert cfg.model.ema_decay == 0.99929 and cfg.dataset.batch_size == 512
    cfg = composer(["+experiment=cifar10_ct_lpips"])
    assert cfg.schedule.s1 == 150
    plain = composer([])  # the primary config's group defaults: the CM paper's CT
    assert (
        plain.model.ema_decay == 0.9999
        and plain.schedule._target_ == "cmexp.diffusion.AdaptiveSchedule"
    )


def test_command_line_group_choice_beats_the_experiment(composer) -> None:
    from cmexp.train import train_overrides

    cfg = composer(train_overrides(["schedule=fixed"]))
    assert cfg.schedule._target_ == "cmexp.diffusion.FixedSchedule"
    hydra.utils.instantiate(cfg.schedule)


@pytest.mark.parametrize("name", ["cifar10_cd_lpips", "fmnist_ct_pseudo_huber"])
def test_cfg_job_prints_resolved_config(name: str) -> None:
    out = _cli(f"+experiment={name}", "--cfg", "job", "--resolve")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.model._target_.startswith("cmexp.methods.")


def test_unknown_group_option_and_bad_values_fail_with_one_clear_line(tmp_path: Path) -> None:
    out = _cli(CT, "net=resnet9000", f"paths.root_dir={tmp_path}")
    nets = ", ".join(sorted(p.stem for p in (CONF_DIR / "net").glob("*.yaml")))
    assert (out.returncode, out.stderr) == (
        2,
        f"error: In 'train': Could not find 'net/resnet9000'; Available options in 'net': {nets}\n",
    )
    out = _cli(
        CT, "schedule.s1=1", f"paths.root_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "r")
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: schedule.s1=1 must be >= schedule.s0=10"
    out = _cli(
        CT,
        "dataset=cifar10",
        f"dataset.data_dir={tmp_path / 'nothing'}",
        "net=tiny",
        f"paths.root_dir={tmp_path}",
        "hydra.run.dir=" + str(tmp_path / "r2"),
    )
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "dataset.data_dir" in last


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("local", "hydra._internal.core_plugins.basic_launcher.BasicLauncher"),
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_hydra_launcher_configs_compose(launcher: str, target: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"hydra/launcher={launcher}", "+experiment=cifar10_edm"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_ == target
    GlobalHydra.instance().clear()


def test_inception_quality_config_builds_the_callback_with_fid_names(
    composer, tmp_path: Path, monkeypatch
) -> None:
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    from cmexp.metrics import InceptionFeatures

    with monkeypatch.context() as m:  # a weights file with the real layout, random values
        m.setattr(fi.torch, "load", lambda *a, **k: None)
        m.setattr(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        state = fi.FeatureExtractorInceptionV3(
            "x", ["2048"], feature_extractor_weights_path="unused"
        ).state_dict()
    torch.save(state, tmp_path / InceptionFeatures.FILE)
    cfg = composer(
        [
            "+experiment=cifar10_cd_lpips",
            "quality=inception",
            f"callbacks.sample_quality.features.weights_path={tmp_path}",
        ]
    )
    assert cfg.callbacks.best_checkpoint.monitor == "val/fid_1step"
    cb = hydra.utils.instantiate(cfg.callbacks.sample_quality)
    assert cb.name == "" and cb.features.num_features == 2048


def test_ict_recipe_has_the_papers_cifar10_values(composer) -> None:
    """iCT (Song & Dhariwal 2023) CIFAR-10, value by value (reference.md section 5.1)."""
    cfg = composer(["+experiment=cifar10_ict"])
    assert cfg.model._target_ == "cmexp.methods.consistency.module.CTLitModule"
    assert cfg.global_batch_size == 1024  # batch 1024
    assert cfg.model.optimizer._target_ == "torch.optim.RAdam" and cfg.model.optimizer.lr == 1e-4
    assert cfg.trainer.max_steps == 400_000  # 400k iterations
    assert (cfg.schedule.s0, cfg.schedule.s1, cfg.schedule.mu) == (
        10,
        1280,
        0.0,
    )  # doubling, no target EMA
    assert (
        cfg.net.dropout == 0.3
        and cfg.net.fourier_scale == 0.02
        and cfg.net.embedding_type == "fourier"
    )
    assert cfg.model.ema_decay == 0.99993  # sampling EMA
    assert list(cfg.model.taus) == [0.821]  # 2-step sigma
    assert (cfg.model.precond.sigma_min, cfg.model.precond.sigma_max, cfg.model.rho) == (
        0.002,
        80.0,
        7.0,
    )
    assert (
        cfg.metric._target_ == "cmexp.losses.PseudoHuberDistance" and cfg.metric.c is None
    )  # 0.00054 sqrt(d)
    assert (
        cfg.model.loss.index_sampler._target_ == "cmexp.methods.consistency.loss.LognormalIndices"
    )
    assert (cfg.model.loss.index_sampler.P_mean, cfg.model.loss.index_sampler.P_std) == (-1.1, 2.0)
    assert (
        cfg.model.loss.weighting._target_ == "cmexp.losses.ICTWeighting"
    )  # 1/(sigma_{n+1} - sigma_n)
    schedule = hydra.utils.instantiate(cfg.schedule)
    blocks = [schedule(k)[0] for k in range(0, 400_000, 50_000)]
    assert blocks == [11, 21, 41, 81, 161, 321, 641, 1281]  # N = 11 ... 1281
    from cmexp.losses import pseudo_huber

    x = torch.zeros(1, 3, 32, 32)
    y = torch.zeros(1, 3, 32, 32)
    y[0, 0, 0, 0] = 1.0
    c = 0.00054 * 3072**0.5
    assert float(pseudo_huber(x, y)) == pytest.approx((1 + c * c) ** 0.5 - c)


def test_ect_recipe_has_the_papers_cifar10_values(composer) -> None:
    """ECT (Geng et al. 2025) CIFAR-10 as in locuslab/ect run_ecm.sh (reference.md section 5.2)."""
    cfg = composer(["+experiment=cifar10_ect"])
    assert cfg.model._target_ == "cmexp.methods.ect.module.ECTLitModule"
    assert cfg.global_batch_size == 128 and cfg.dataset.batch_size == 128
    assert cfg.model.optimizer._target_ == "torch.optim.RAdam" and cfg.model.optimizer.lr == 1e-4
    assert cfg.net.dropout == 0.2 and cfg.net.embedding_type == "positional"  # DDPM++ teacher net
    assert cfg.dataset.random_flip is False  # run_ecm.sh --augment=0, ct_train.py --xflip off
    assert cfg.trainer.max_steps == 200_000  # 25.6 Mimg
    assert cfg.model.double_kimg == 3200.0  # --double 250 x 12.8 kimg
    loss = cfg.model.loss
    assert (loss.P_mean, loss.P_std, loss.q, loss.k, loss.b) == (-1.1, 2.0, 2.0, 8.0, 1.0)
    assert loss.metric._target_ == "cmexp.losses.L2NormDistance"  # c = 0
    assert loss.weighting._target_ == "cmexp.losses.ICTWeighting"  # 1 / (t - r)
    assert (
        cfg.model.precond.sigma_min == 0.003
        and cfg.model.ema_decay == 0.9999
        and list(cfg.model.taus) == [0.821]
    )


#: every CIFAR-10 recipe's horizontal-flip setting and its source (each YAML says the same)
CIFAR10_FLIPS = {
    "cifar10_cd_l1": True,  # CM paper App. C; consistency_models_cifar10 data.random_flip
    "cifar10_cd_l2": True,
    "cifar10_cd_lpips": True,
    "cifar10_ct_fixed": True,
    "cifar10_ct_lpips": True,
    "cifar10_edm": True,  # CM paper App. C: all models, the EDM teacher included
    "cifar10_ict": True,  # iCT paper: horizontal flips
    "cifar10_sct": True,  # no source available: the suite's CM-paper default
    "cifar10_scd": True,  # no source available: the suite's CM-paper default
    "cifar10_pd": True,  # no source available: the suite's CM-paper default
    "cifar10_pd_cm": True,  # consistency_models_cifar10 default config
    "cifar10_ect": False,  # ECT: no augmentation (run_ecm.sh --augment=0, no --xflip)
    "cifar10_tcm_stage1": False,  # NVlabs/TCM README: --augment=0.0, no --xflip
    "cifar10_tcm": False,  # NVlabs/TCM README: --augment=0.0, no --xflip
    "cifar10_imm": True,  # no source available (lumalabs/imm has no training config)
    "cifar10_meanflow": True,  # py-meanflow RandomHorizontalFlip + EDM augment pipe's x-flips
}


def test_every_cifar10_recipe_has_a_recorded_flip_setting() -> None:
    assert sorted(CIFAR10_FLIPS) == [n for n in EXPERIMENTS if n.startswith("cifar10_")]


@pytest.mark.parametrize(("name", "flip"), sorted(CIFAR10_FLIPS.items()))
def test_cifar10_recipe_flips_as_its_source(name: str, flip: bool, composer) -> None:
    cfg = composer([f"+experiment={name}"])
    assert cfg.dataset.random_flip is flip
    # the YAML states the value itself (with its source), not only through the dataset default
    assert (
        f"random_flip: {str(flip).lower()}"
        in (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    )


def test_scm_recipes_have_their_dropout(composer) -> None:
    """sCT: the sCM paper's 0.2 (App. G); sCD: 0.0, FastGen's config_scd_cifar10.py (the paper
    states no sCD-specific dropout)."""
    assert composer(["+experiment=cifar10_sct"]).net.dropout == 0.2
    assert composer(["+experiment=cifar10_scd"]).net.dropout == 0.0


def test_scm_recipes_normalise_the_tangent_by_its_rms_norm(composer) -> None:
    """sCT/sCD: g / (||g||_2 / sqrt(D) + c), FastGen's g_norm_spatial_invariance=True (the
    default of config_scm.py's LossConfig, kept by its CIFAR-10 configs); l2 is the option."""
    for name in ("cifar10_sct", "cifar10_scd", "fmnist_sct", "fmnist_scd"):
        loss = composer([f"+experiment={name}"]).model.loss
        assert (loss.tangent_norm, loss.tangent_c) == ("rms", 0.1), name
    assert composer(["model=sct", "model.loss.tangent_norm=l2"]).model.loss.tangent_norm == "l2"
