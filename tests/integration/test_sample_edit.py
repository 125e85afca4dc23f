"""`cmexp.sample` and `cmexp.edit` on checkpoints trained here (tiny nets, synthetic data)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cmexp.edit import edit
from cmexp.sample import sample
from cmexp.train import train
from cmexp import registry
from tests.fakes import write_fake_vgg16

from .conftest import compose_train

TINY = ["debug=tiny"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny CT model and a tiny EDM teacher on the synthetic 3 x 32 x 32 set."""
    base = tmp_path_factory.mktemp("ckpts")
    out = {}
    for kind in ("ct", "edm"):
        cfg = compose_train([*TINY, f"model={kind}", "trainer.max_steps=2"], base / kind)
        train(cfg)
        out[kind] = base / kind / "checkpoints" / "last.ckpt"
    return out


def run_sample(tmp_path: Path, overrides: list[str], name: str) -> dict:
    cfg = compose_train(overrides, tmp_path / name, config_name="sample")
    return sample(cfg)


def test_sample_writes_npz_grid_and_protocol(ckpts, tmp_path: Path) -> None:
    out = run_sample(tmp_path, [f"ckpt={ckpts['ct']}", "num_samples=5", "batch_size=2"], "one")
    run = tmp_path / "one"
    arr = np.load(run / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 32, 32, 3)
    assert (run / "samples_grid.png").is_file()
    info = json.loads((run / "sample.json").read_text())
    assert info["nfe"] == 1 and info["sigmas"] == [80.0] and info["kind"] == "ct"
    assert out["images"].shape == (5, 3, 32, 32)
    # same seeds, other batch size and count: the same images
    run_sample(tmp_path, [f"ckpt={ckpts['ct']}", "num_samples=3", "batch_size=3"], "two")
    assert np.array_equal(np.load(tmp_path / "two" / "samples.npz")["arr_0"], arr[:3])
    # other seeds: other images
    run_sample(tmp_path, [f"ckpt={ckpts['ct']}", "num_samples=3", "seed=100"], "three")
    assert not np.array_equal(np.load(tmp_path / "three" / "samples.npz")["arr_0"], arr[:3])


def test_multistep_taus_from_values_or_grid_indices(ckpts, tmp_path: Path) -> None:
    out = run_sample(
        tmp_path,
        [f"ckpt={ckpts['ct']}", "num_samples=2", "steps=2", "tau_indices=[11]", "num_scales=18"],
        "idx",
    )
    assert (
        out["info"]["nfe"] == 2 and abs(out["info"]["sigmas"][1] - 0.585) < 1e-3
    )  # CIFAR-10 CD tau
    out = run_sample(
        tmp_path, [f"ckpt={ckpts['ct']}", "num_samples=2", "steps=3", "taus=[2.0,0.5]"], "vals"
    )
    assert out["info"]["sigmas"] == [80.0, 2.0, 0.5]
    with pytest.raises(ValueError, match="steps=3 needs 2 intermediate noise levels"):
        run_sample(tmp_path, [f"ckpt={ckpts['ct']}", "steps=3", "taus=[0.5]"], "bad")
    with pytest.raises(ValueError, match="descending"):
        run_sample(tmp_path, [f"ckpt={ckpts['ct']}", "steps=3", "taus=[0.5,2.0]"], "bad2")


def test_teacher_sampling_with_heun_and_euler(ckpts, tmp_path: Path) -> None:
    heun = run_sample(tmp_path, [f"ckpt={ckpts['edm']}", "num_samples=2", "num_scales=3"], "heun")
    euler = run_sample(
        tmp_path,
        [f"ckpt={ckpts['edm']}", "num_samples=2", "num_scales=3", "sampler=euler"],
        "euler",
    )
    assert heun["info"]["nfe"] == 5 and euler["info"]["nfe"] == 3
    assert heun["images"].shape == euler["images"].shape == (2, 3, 32, 32)
    with pytest.raises(
        ValueError,
        match=f"sampler must be one of {', '.join(registry.samplers())} or null, got 'dpm'",
    ):
        run_sample(tmp_path, [f"ckpt={ckpts['edm']}", "sampler=dpm"], "bad")


@pytest.mark.parametrize(
    "task", ["inpaint", "colorize", "superres", "denoise", "interpolate", "stroke"]
)
def test_every_edit_task_writes_grid_and_metrics(
    ckpts, tmp_path: Path, task: str, monkeypatch
) -> None:
    monkeypatch.setenv("CMEXP_OFFLINE", "1")
    cfg = compose_train(
        [
            f"task={task}",
            f"ckpt={ckpts['ct']}",
            "num_samples=4",
            "task.num_scales=4" if task in ("inpaint", "colorize", "superres") else "seed=0",
        ],
        tmp_path / task,
        config_name="edit",
    )
    out = edit(cfg)
    metrics = json.loads((tmp_path / task / "metrics.json").read_text())
    assert (tmp_path / task / f"edit_{task}.png").is_file() and metrics["task"] == task
    if task in ("inpaint", "colorize", "superres", "denoise"):
        assert list(out["rows"]) == ["before", "input", "result", "ground_truth"]
        # PSNR written out: images mapped from [-1, 1] to [0, 1], one MSE over the whole batch
        a = (out["rows"]["result"].clamp(-1, 1) + 1) / 2
        b = (out["rows"]["ground_truth"].clamp(-1, 1) + 1) / 2
        want = 10 * math.log10(1.0 / float((a - b).double().square().mean()))
        assert metrics["psnr"] == pytest.approx(want, rel=1e-5)
        assert -1 <= metrics["ssim"] <= 1  # SSIM: only its range (no independent value here)
        assert metrics["lpips"] is None and "vgg16" in metrics["lpips_skipped"]
    if task == "inpaint":  # the known pixels are the real image's, bit for bit
        keep = ~out["rows"]["input"].eq(0).all(1, keepdim=True)
        keep = keep.expand_as(out["rows"]["result"])
        assert np.array_equal(
            out["rows"]["result"][keep].numpy(), out["rows"]["ground_truth"][keep].numpy()
        )


def test_edit_reports_lpips_when_weights_exist_and_reads_image_folders(
    ckpts, tmp_path: Path
) -> None:
    from PIL import Image

    weights = write_fake_vgg16(tmp_path / "w")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    cfg = compose_train(
        [
            "task=denoise",
            f"ckpt={ckpts['ct']}",
            f"images_dir={folder}",
            f"metric.weights_path={weights}",
        ],
        tmp_path / "run",
        config_name="edit",
    )
    metrics = edit(cfg)["metrics"]
    assert metrics["num_samples"] == 3 and isinstance(metrics["lpips"], float)


def test_edit_rejects_teachers_and_grey_colorization(ckpts, tmp_path: Path) -> None:
    cfg = compose_train(
        ["task=inpaint", f"ckpt={ckpts['edm']}"], tmp_path / "a", config_name="edit"
    )
    with pytest.raises(ValueError, match="holds a 'edm' model.*editing needs a consistency model"):
        edit(cfg)
    import torch

    from cmexp.diffusion.sampling import SeededNoise
    from cmexp.inference import SamplingSpec
    from cmexp.inference.tasks import Colorize, EditContext

    ctx = EditContext(
        f=lambda x, s, c=None: x,
        images=torch.zeros(2, 1, 8, 8),
        noise=SeededNoise([0, 1]),
        spec=SamplingSpec(family="consistency", sampler="consistency"),
    )
    with pytest.raises(ValueError, match="task=colorize needs a 3-channel model"):
        Colorize()(ctx)


def test_command_lines_run_and_report_bad_input_in_one_line(ckpts, tmp_path: Path) -> None:
    env = {**os.environ, "CMEXP_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmexp.sample",
            f"ckpt={ckpts['ct']}",
            "num_samples=2",
            f"hydra.run.dir={tmp_path / 's'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "s" / "samples.npz").is_file()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmexp.edit",
            "task=superres",
            f"ckpt={tmp_path / 'missing.ckpt'}",
            f"hydra.run.dir={tmp_path / 'e'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().splitlines()[-1]
        == f"error: ckpt={tmp_path / 'missing.ckpt'}: no such checkpoint file"
    )


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny feature classifier on the synthetic set (labels = mixture components)."""
    out = tmp_path_factory.mktemp("clf") / "run"
    cfg = compose_train(
        [
            *TINY,
            "model=classifier",
            "net=small_cnn",
            "net.width=4",
            "net.feature_dim=8",
            "~callbacks.sample_grid",
            "trainer.max_steps=3",
        ],
        out,
    )
    train(cfg)
    ckpt = out / "checkpoints" / "last.ckpt"
    # the recorded accuracy, recomputed from the checkpoint on the run's test split
    import hydra

    from cmexp.metrics import ClassifierFeatures

    info = json.loads((out / "classifier.json").read_text())
    test = hydra.utils.instantiate(cfg.dataset).dataset("test")
    logits = ClassifierFeatures(ckpt=str(ckpt)).logits(test.images)
    want = (logits.argmax(1) == test.labels).double().mean().item()
    assert info["test_images"] == len(test) and info["test_acc"] == pytest.approx(want, abs=1e-6)
    return ckpt


def test_tau_search_picks_taus_by_feature_frechet_distance(
    ckpts, classifier_ckpt, tmp_path: Path
) -> None:
    from cmexp.tau_search import tau_search

    cfg = compose_train(
        [
            f"ckpt={ckpts['ct']}",
            f"features.ckpt={classifier_ckpt}",
            "num_samples=16",
            "num_real=32",
            "num_scales=6",
            "steps=2",
        ],
        tmp_path / "ts",
        config_name="tau_search",
    )
    res = tau_search(cfg)
    saved = json.loads((tmp_path / "ts" / "tau_search.json").read_text())
    assert saved["tau_indices"] == res["tau_indices"] and len(res["taus"]) == 1
    assert 1 <= res["tau_indices"][0] <= 4 and res["metric"] == "fd_fmnist"
    scores = {tuple(e["tau_indices"]): e["fd_fmnist"] for e in saved["evaluated"]}
    assert res["score"] == min(scores.values())  # the chosen schedule is the best evaluated one
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        tau_search(
            compose_train(
                [f"ckpt={ckpts['ct']}", f"features.ckpt={classifier_ckpt}", "steps=1"],
                tmp_path / "bad",
                config_name="tau_search",
            )
        )


def test_sample_quality_callback_logs_metrics_and_keeps_the_best_checkpoint(
    classifier_ckpt, tmp_path: Path
) -> None:
    import csv

    cfg = compose_train(
        [
            *TINY,
            "model=ct",
            "quality=fmnist",
            f"callbacks.sample_quality.features.ckpt={classifier_ckpt}",
            "callbacks.sample_quality.every_n_steps=2",
            "callbacks.sample_quality.num_samples=8",
            "callbacks.sample_quality.num_real=16",
            "callbacks.sample_quality.batch_size=4",
            f"paths.root_dir={tmp_path}",
        ],
        tmp_path / "run",
    )
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    keys = {k for r in rows for k, v in r.items() if v}
    for s in ("1step", "2step"):
        assert {
            f"val/fd_fmnist_{s}",
            f"val/kid_fmnist_{s}",
            f"val/is_fmnist_{s}",
            f"val/precision_{s}",
            f"val/recall_{s}",
        } <= keys
    # logged once per evaluation (steps 2 and 4), not repeated on every later row
    assert sorted(int(r["step"]) for r in rows if r.get("val/fd_fmnist_1step")) == [2, 4]
    best = [
        p
        for p in (tmp_path / "run" / "checkpoints").iterdir()
        if p.name.startswith("best_fd1step")
    ]
    assert len(best) == 1
    # last.ckpt, written at the same step as the evaluation, holds the best checkpoint's updated
    # state: a resumed run compares against the best so far instead of starting afresh
    last = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    states = [v for k, v in last["callbacks"].items() if "val/fd_fmnist_1step" in k]
    assert len(states) == 1 and states[0]["best_model_path"] == str(best[0])
    assert states[0]["best_model_score"] is not None
    final = json.loads((tmp_path / "run" / "sample_quality.json").read_text())
    digest = hashlib.sha256(Path(classifier_ckpt).read_bytes()).hexdigest()[:12]
    assert final["step"] == 4 and final["weights_sha256"] == digest  # the extractor's file
    assert final["seconds_total"] > 0
    cached = list((tmp_path / ".cache" / "real_features").glob("*.pt"))
    assert len(cached) == 1 and "16" in cached[0].name  # computed once, keyed by the count


def test_eval_samples_a_checkpoint_and_scores_npz_files(
    ckpts, classifier_ckpt, tmp_path: Path
) -> None:
    from cmexp.eval import evaluate

    common = [
        f"features.ckpt={classifier_ckpt}",
        "num_real=32",
        "batch_size=8",
        f"cache_dir={tmp_path / 'cache'}",
        "dataset=gaussian_mixture",
    ]
    cfg = compose_train(
        [f"ckpt={ckpts['ct']}", "num_samples=12", "steps=[1,2]", *common],
        tmp_path / "a",
        config_name="eval",
    )
    out = evaluate(cfg)
    run = tmp_path / "a"
    for s in ("1step", "2step"):
        arr = np.load(run / f"samples_{s}.npz")["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (12, 32, 32, 3)
        assert {"fd_fmnist", "kid_fmnist", "is_fmnist", "precision", "recall"} <= set(
            out["metrics"][s]
        )
    saved = json.loads((run / "metrics.json").read_text())
    proto = saved["protocol"]
    assert (
        proto["weights_sha256"]
        and proto["reference"]["split"] == "train"
        and proto["seeds"] == [0, 11]
    )
    assert proto["sets"]["2step"]["nfe"] == 2 and proto["sets"]["1step"]["sigmas"] == [80.0]
    assert proto["clip_denoised"] is True and proto["sets"]["2step"]["clip_denoised"] is True
    # scoring the written npz again gives the same numbers
    again = evaluate(
        compose_train(
            [f"samples={run / 'samples_1step.npz'}", *common], tmp_path / "b", config_name="eval"
        )
    )
    assert again["metrics"]["samples"]["fd_fmnist"] == pytest.approx(
        out["metrics"]["1step"]["fd_fmnist"], rel=1e-6, abs=1e-6
    )
    with pytest.raises(ValueError, match="exactly one of ckpt"):
        evaluate(compose_train([*common], tmp_path / "c", config_name="eval"))


def test_inception_features_fail_fast_offline_and_load_a_weights_file(
    tmp_path: Path, monkeypatch
) -> None:
    import time

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    from cmexp.metrics import InceptionFeatures

    monkeypatch.setenv("CMEXP_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    t0 = time.perf_counter()
    with pytest.raises(
        FileNotFoundError,
        match=r"weights-inception-2015-12-05-6726825d.pth.*features.weights_path",
    ):
        InceptionFeatures()
    assert time.perf_counter() - t0 < 5
    # a fake weights file with the real layout (random values)
    with monkeypatch.context() as m:
        m.setattr(fi.torch, "load", lambda *a, **k: None)
        m.setattr(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        state = fi.FeatureExtractorInceptionV3(
            "x", ["2048"], feature_extractor_weights_path="unused"
        ).state_dict()
    torch.save(state, tmp_path / InceptionFeatures.FILE)
    feats = InceptionFeatures(weights_path=str(tmp_path))
    x = torch.rand(2, 1, 32, 32)
    assert feats(x).shape == (2, 2048) and feats.logits(x).shape == (2, 1008)


def test_fmnist_quality_uses_the_shipped_classifier_and_a_trained_one_never_replaces_it(
    tmp_path: Path,
) -> None:
    import csv

    from cmexp import zoo

    shipped = zoo.info("fmnist_classifier")
    # the classifier experiment exports its slim checkpoint to <root>/checkpoints, never overwriting
    # it and never touching the shipped file
    export = tmp_path / "checkpoints" / "fmnist_classifier.ckpt"
    clf = [
        *TINY,
        "model=classifier",
        "net=small_cnn",
        "net.width=4",
        "net.feature_dim=8",
        "~callbacks.sample_grid",
        "trainer.max_steps=2",
        f"+model.export_path={export}",
    ]
    train(compose_train(clf, tmp_path / "clf1"))
    first = export.read_bytes()
    train(compose_train(clf, tmp_path / "clf2"))
    assert export.read_bytes() == first
    assert zoo.sha256(shipped["path"]) == shipped["sha256"]
    quality = [
        *TINY,
        "model=ct",
        "quality=fmnist",
        "dataset.channels=1",  # the shipped classifier scores 1-channel samples only
        f"paths.root_dir={tmp_path}",
        "callbacks.sample_quality.every_n_steps=0",
        "callbacks.sample_quality.num_samples=4",
        "callbacks.sample_quality.num_real=8",
        "callbacks.sample_quality.batch_size=4",
    ]
    train(compose_train(quality, tmp_path / "with"))
    metrics = json.loads((tmp_path / "with" / "sample_quality.json").read_text())
    assert "val/fd_fmnist_1step" in metrics and metrics["weights"] == shipped["path"]
    assert shipped["sha256"].startswith(metrics["weights_sha256"])
    rows = list(csv.DictReader(open(tmp_path / "with" / "csv" / "metrics.csv")))
    assert any(r.get("val/fd_fmnist_2step") for r in rows)
