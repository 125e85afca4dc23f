"""Two-process DDP on the CPU (gloo, ddp_fork: plain `ddp` inside pytest re-runs pytest)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from cmexp.train import train

from .conftest import compose_train, logged_losses, train_single_and_ddp


class RankReport(pl.Callback):
    """Each rank writes checksums of its networks and its logged kimg at the end of training."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def vec(m: torch.nn.Module) -> list[float]:
            return torch.cat([p.detach().flatten() for p in m.parameters()]).tolist()

        qual = next(
            (c for c in trainer.callbacks if type(c).__name__ == "SampleQualityCallback"), None
        )
        report = {
            "online": vec(pl_module.model),
            "target": vec(pl_module.target),
            "ema": vec(pl_module.ema),
            "kimg": pl_module.batches_seen
            * pl_module.global_batch_size(trainer.datamodule.batch_size)
            / 1000,
            "quality": getattr(qual, "_last", {}),
        }
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def test_ddp_ranks_keep_identical_target_and_ema_and_share_sample_metrics(
    tmp_path: Path, monkeypatch
) -> None:
    import hydra

    from .test_sample_edit import TINY

    clf = compose_train(
        [
            *TINY,
            "model=classifier",
            "net=small_cnn",
            "net.width=4",
            "net.feature_dim=8",
            "~callbacks.sample_grid",
            "trainer.max_steps=2",
        ],
        tmp_path / "clf",
    )
    train(clf)
    cfg = compose_train(
        [
            *TINY,
            "model=ct",
            "trainer.devices=2",
            "+trainer.strategy=ddp_fork",
            "trainer.max_steps=3",
            "quality=fmnist",
            f"callbacks.sample_quality.features.ckpt={tmp_path / 'clf' / 'checkpoints' / 'last.ckpt'}",
            "callbacks.sample_quality.every_n_steps=0",
            "callbacks.sample_quality.num_samples=6",
            "callbacks.sample_quality.num_real=16",
            "callbacks.sample_quality.batch_size=2",
            f"paths.root_dir={tmp_path}",
            "~callbacks.best_checkpoint",
        ],
        tmp_path / "ddp",
    )
    report = RankReport(tmp_path)
    orig = hydra.utils.instantiate

    def with_report(node, *args, **kwargs):
        obj = orig(node, *args, **kwargs)
        if isinstance(obj, pl.Trainer):
            obj.callbacks.append(report)
        return obj

    monkeypatch.setattr(hydra.utils, "instantiate", with_report)
    train(cfg)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for key in ("online", "target", "ema"):
        assert r0[key] == r1[key], key  # DDP keeps every copy identical on every rank
    assert r0["target"] != r0["ema"]
    assert r0["kimg"] == 3 * 8 * 2 / 1000  # global batch = per-device batch x 2 processes
    assert (
        r0["quality"] and r0["quality"] == r1["quality"]
    )  # features all-gathered: same numbers on both ranks


def test_global_batch_is_kept_by_gradient_accumulation(tmp_path: Path) -> None:
    import pytest

    from cmexp.utils.checks import ConfigError, accumulation_steps

    from .test_sample_edit import TINY

    cfg = compose_train(
        [
            "+experiment=cifar10_cd_lpips",
            "trainer=ddp",
            "trainer.devices=8",
            "dataset.batch_size=32",
        ],
        tmp_path / "a",
    )
    assert accumulation_steps(cfg) == 2  # 512 = 32 x 8 GPUs x 2 accumulation steps
    bad = compose_train(
        ["+experiment=cifar10_cd_lpips", "trainer=ddp", "trainer.devices=8"], tmp_path / "b"
    )
    with pytest.raises(
        ConfigError,
        match=r"global_batch_size=512 must be a multiple of dataset.batch_size=512 x trainer.devices=8",
    ):
        accumulation_steps(bad)
    # a tiny run: global batch 16 from per-device 8 -> 2 micro-batches per optimizer step
    out = train(
        compose_train(
            [*TINY, "model=ct", "global_batch_size=16", "trainer.max_steps=2"], tmp_path / "run"
        )
    )
    assert out["trainer"].accumulate_grad_batches == 2 and out["trainer"].global_step == 2
    assert out["model"].batches_seen == 4


def test_channels_last_and_compile_options_train(tmp_path: Path) -> None:
    import torch

    from .test_sample_edit import TINY

    out = train(
        compose_train(
            [*TINY, "model=ct", "model.channels_last=true", "trainer.max_steps=2"], tmp_path / "cl"
        )
    )
    conv = next(m for m in out["model"].model.modules() if isinstance(m, torch.nn.Conv2d))
    assert (
        conv.weight.is_contiguous(memory_format=torch.channels_last)
        and out["trainer"].global_step == 2
    )
    ckpt = torch.load(
        tmp_path / "cl" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    plain = train(compose_train([*TINY, "model=ct", "trainer.max_steps=1"], tmp_path / "plain"))[
        "model"
    ].state_dict()
    assert set(ckpt["state_dict"]) == set(plain)  # same checkpoint layout


def test_compiled_online_net_computes_the_eager_loss_and_gradients(tmp_path: Path) -> None:
    """`model.compile_net=true` (torch.compile, inductor: C++ kernels built with the machine's C
    compiler) on the tiny net: the same loss and gradients as the eager net for the same batch
    and draws, a graph really compiled, and the checkpoint keys unchanged. About 1 s with a warm
    inductor cache, about 30 s cold on a loaded 2-core CPU."""
    import hydra
    import torch
    from torch._dynamo.utils import counters

    from .test_sample_edit import TINY

    cfg = compose_train([*TINY, "model=ct"], tmp_path / "eager")
    torch.manual_seed(0)
    eager = hydra.utils.instantiate(cfg.model)
    cfg.model.compile_net = True
    compiled = hydra.utils.instantiate(cfg.model)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compiled.configure_model()  # what Lightning calls once the module is on its device
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = []
    for module in (eager, compiled):
        torch.manual_seed(2)  # the same noise levels and noise for both
        loss, _ = module.compute_loss(images, None)
        loss.backward()
        grads = {n: p.grad for n, p in module.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    assert counters["stats"]["unique_graphs"] >= 1  # the online net went through torch.compile
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_e and sorted(grads_c) == sorted(grads_e)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-5, msg=name)
    assert sorted(compiled.state_dict()) == sorted(eager.state_dict())  # no _orig_mod keys
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_online_net_trains_and_keeps_the_checkpoint_layout(tmp_path: Path) -> None:
    import torch

    from .test_sample_edit import TINY

    out = train(
        compose_train(
            [*TINY, "model=ct", "model.compile_net=true", "trainer.max_steps=2"], tmp_path / "c"
        )
    )
    assert out["trainer"].global_step == 2
    keys = set(
        torch.load(
            tmp_path / "c" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
        )["state_dict"]
    )
    assert not any("_orig_mod" in k for k in keys)


def test_ddp_step_equals_the_single_process_step_on_the_same_global_batch(
    tmp_path: Path, monkeypatch
) -> None:
    """2 processes x 4 images == 1 process x 8 images: same data, noise levels, noise and flips
    (drawn for the global batch and sliced), so the same losses and the same weights."""

    from .test_sample_edit import TINY

    runs = train_single_and_ddp(
        tmp_path, monkeypatch, [*TINY, "model=ct", "trainer.max_steps=3"], RankReport
    )
    reports = {}
    for name, (folder, run) in runs.items():
        reports[name] = json.loads((folder / "rank0.json").read_text())
        reports[name]["losses"] = logged_losses(run)
    single, ddp = reports["single"], reports["ddp"]
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert ddp["online"] == pytest.approx(single["online"], abs=1e-5)
    assert ddp["kimg"] == single["kimg"]


@pytest.mark.parametrize("rank", [1, 0])
def test_ddp_preemption_one_rank_signalled_all_save_and_resume_is_exact(
    tmp_path: Path, rank: int
) -> None:
    """Two ranks under ddp_fork (every rank a child process): a SIGTERM reaching one rank makes
    both save at the same step boundary, the stop reaches this process as TrainingPreempted
    (exit code 143), and the run resumed from that last.ckpt ends with the uninterrupted
    run's weights."""
    import signal as sig

    from .test_sample_edit import TINY

    base = [
        *TINY,
        "model=ct",
        "trainer.devices=2",
        "+trainer.strategy=ddp_fork",
        "trainer.max_steps=6",
        "callbacks.checkpoint.every_n_train_steps=100",
        f"paths.root_dir={tmp_path}",
    ]
    full = compose_train(base, tmp_path / "full")
    train(full)
    cut = compose_train(
        [
            *base,
            "+callbacks.signal._target_=tests.fakes.SignalAtStep",
            "+callbacks.signal.step=2",
            f"+callbacks.signal.rank={rank}",
        ],
        tmp_path / "cut",
    )
    out = train(cut)
    stop = out["preempted"]
    assert stop is not None and stop.exit_code == 128 + int(sig.SIGTERM)
    ckpt = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert (
        stop.ckpt == ckpt and not (tmp_path / "cut" / "checkpoints" / ".preempted.json").exists()
    )
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3  # the step in which the signal arrived, completed
    resumed = compose_train([*base, f"ckpt_path={ckpt}"], tmp_path / "resumed")
    train(resumed)
    a = torch.load(
        tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    b = torch.load(
        tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert a["global_step"] == b["global_step"] == 6
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0)
