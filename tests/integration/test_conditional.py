"""Class-conditional training, guided CD and conditional sampling end to end (tiny nets on
the labelled synthetic mixture, 2 steps each): a conditional EDM teacher with label dropout, a
guided CD student from it, ``cmexp.sample`` with class labels and guidance scales."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmexp.sample import sample
from cmexp.train import train

from .conftest import compose_train

TINY = ["debug=tiny", "trainer.max_steps=2", "dataset.use_labels=true"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cond")
    train(compose_train([*TINY, "model=edm", "model.label_dropout=0.5"], base / "edm"))
    edm = base / "edm" / "checkpoints" / "last.ckpt"
    out = train(
        compose_train(
            [*TINY, "model=cd_guided", "net.guidance_embed=true", f"model.teacher_path={edm}"],
            base / "cd",
        )
    )
    return {"edm": edm, "cd": base / "cd" / "checkpoints" / "last.ckpt", "cd_module": out["model"]}


def run_sample(tmp_path: Path, overrides: list[str], name: str) -> dict:
    return sample(compose_train(overrides, tmp_path / name, config_name="sample"))


def test_checkpoints_record_labels_and_the_w_range(ckpts) -> None:
    edm = torch.load(ckpts["edm"], map_location="cpu", weights_only=True)["cmexp"]
    cd = torch.load(ckpts["cd"], map_location="cpu", weights_only=True)["cmexp"]
    assert edm["label_dim"] == 4 and edm["config"]["config"]["model"]["label_dropout"] == 0.5
    assert cd["label_dim"] == 4 and cd["guidance"] == {"w_min": 1.0, "w_max": 4.0, "sample": 2.0}
    assert cd["config"]["config"]["net"]["guidance_embed"] is True


def test_guided_student_samples_given_classes_at_any_scale(ckpts, tmp_path: Path) -> None:
    out = run_sample(
        tmp_path,
        [
            f"ckpt={ckpts['cd']}",
            "num_samples=5",
            "batch_size=2",
            "class_labels=[1,3]",
            "guidance=3",
        ],
        "cd3",
    )
    data = np.load(tmp_path / "cd3" / "samples.npz")
    assert data["arr_1"].tolist() == [1, 3, 1, 3, 1]
    info = json.loads((tmp_path / "cd3" / "sample.json").read_text())
    assert info["nfe"] == 1 and info["guidance"] == 3.0 and info["class_labels"] == [1, 3, 1, 3, 1]
    other = run_sample(
        tmp_path,
        [f"ckpt={ckpts['cd']}", "num_samples=5", "class_labels=[0,2]", "guidance=3"],
        "cd02",
    )
    assert not torch.equal(out["images"], other["images"])  # same seeds, other classes
    seeded = run_sample(tmp_path, [f"ckpt={ckpts['cd']}", "num_samples=4"], "seeded")
    info = seeded["info"]
    assert (
        info["guidance"] == 2.0
        and info["label_source"] == "seed"
        and all(0 <= c < 4 for c in info["class_labels"])
    )


def test_guided_teacher_doubles_the_nfe(ckpts, tmp_path: Path) -> None:
    plain = run_sample(
        tmp_path, [f"ckpt={ckpts['edm']}", "num_samples=2", "class_labels=[2]"], "plain"
    )["info"]
    guided = run_sample(
        tmp_path,
        [f"ckpt={ckpts['edm']}", "num_samples=2", "class_labels=[2]", "guidance=2"],
        "guided",
    )
    assert plain["nfe"] == 35 and guided["info"]["nfe"] == 70
    assert np.load(tmp_path / "guided" / "samples.npz")["arr_1"].tolist() == [2, 2]


def test_student_starts_as_the_guided_teachers_copy(ckpts) -> None:
    """The w embedding of a student initialised from its teacher is zero at step 0; after two
    steps the guided student's online net has moved, its teacher has not."""
    import hydra

    base = Path(ckpts["cd"]).parents[2]
    fresh = hydra.utils.instantiate(
        compose_train(
            [
                *TINY,
                "model=cd_guided",
                "net.guidance_embed=true",
                f"model.teacher_path={ckpts['edm']}",
            ],
            base / "cd_step0",
        ).model
    )
    teacher = {
        k.removeprefix("ema.net."): v
        for k, v in torch.load(ckpts["edm"], map_location="cpu", weights_only=True)[
            "state_dict"
        ].items()
        if k.startswith("ema.net.")
    }
    # step 0: the teacher's weights plus a w embedding that is exactly zero for every w
    embed = fresh.model.net.guidance_embed
    assert embed is not None and fresh.teacher.label_dim == 4
    assert not embed.proj.weight.any() and not embed.proj.bias.any()
    assert not embed(torch.tensor([0.0, 1.0, 2.5, 4.0, 15.0])).any()
    step0 = {k: v for k, v in fresh.model.net.state_dict().items() if "guidance_embed" not in k}
    assert step0.keys() == teacher.keys()
    assert all(torch.equal(step0[k], teacher[k]) for k in teacher)
    # after two steps: the online net (its w embedding included) moved, the teacher did not
    trained = ckpts["cd_module"]
    assert trained.global_step == 2
    online = trained.model.net.state_dict()
    assert any(not torch.equal(online[k], teacher[k]) for k in teacher)
    assert trained.model.net.guidance_embed.proj.weight.any()
    frozen = trained.teacher.net.state_dict()
    assert frozen.keys() == teacher.keys()
    assert all(torch.equal(frozen[k].cpu(), teacher[k]) for k in teacher)


def test_eval_scores_per_class_and_class_accuracy(ckpts, tmp_path: Path) -> None:
    from cmexp.eval import evaluate

    # a tiny feature classifier of the synthetic RGB set (the shipped Fashion-MNIST one scores
    # only 1-channel Fashion-MNIST-like images: cmexp.eval refuses it here)
    clf = tmp_path / "clf"
    train(
        compose_train(
            [*TINY, "model=classifier", "net=small_cnn", "net.width=4", "net.feature_dim=8",
             "~callbacks.sample_grid", "trainer.max_steps=3"],
            clf,
        )
    )  # fmt: skip
    overrides = [
        f"ckpt={ckpts['cd']}",
        f"features.ckpt={clf / 'checkpoints' / 'last.ckpt'}",
        "num_samples=8",
        "num_real=32",
        "steps=[1]",
        "class_labels=[0,1]",
        "guidance=2",
        "batch_size=8",
        f"cache_dir={tmp_path / 'cache'}",
        "kid_subset_size=4",
    ]
    out = evaluate(compose_train(overrides, tmp_path / "eval", config_name="eval"))
    scores = out["metrics"]["1step"]
    # recomputed: the feature classifier's argmax on the saved samples against their labels
    from cmexp.metrics import ClassifierFeatures

    saved = np.load(tmp_path / "eval" / "samples_1step.npz")
    images = torch.from_numpy(saved["arr_0"]).permute(0, 3, 1, 2)
    logits = ClassifierFeatures(ckpt="zoo:fmnist_classifier").logits(images)
    want = (logits.argmax(1) == torch.from_numpy(saved["arr_1"])).double().mean().item()
    assert scores["class_accuracy"] == pytest.approx(want, abs=1e-12)
    assert {"fd_fmnist_class0", "fd_fmnist_class1"} <= set(
        scores
    ) and "fd_fmnist_class2" not in scores
    assert out["protocol"]["guidance"] == 2.0 and out["protocol"]["label_counts"] == [4, 4, 0, 0]
    data = np.load(tmp_path / "eval" / "samples_1step.npz")
    assert data["arr_1"].tolist() == [0, 1] * 4


@pytest.mark.parametrize("mode", ["cd", "ect", "sct", "scd"])
def test_in_training_grids_show_every_class(ckpts, mode: str, tmp_path: Path) -> None:
    """The sample grids of every consistency mode draw image i with class i mod label_dim:
    exactly what the inference seam samples with class_labels=[0, 1, 2, 3] and the same seeds."""
    from cmexp.inference import generate, load_model
    from cmexp.inference.plan import sigma_plan

    extra = [] if mode == "sct" else [f"model.teacher_path={ckpts['edm']}"]
    out = train(compose_train([*TINY, f"model={mode}", *extra], tmp_path / mode))
    module = out["model"]
    grids = module.sample_sets(4, seed=3)
    loaded = load_model(tmp_path / mode / "checkpoints" / "last.ckpt")
    for k in (1, 2):
        ref = generate(
            loaded, 4, sigma_plan(loaded.spec, steps=k), seed=3, class_labels=[0, 1, 2, 3]
        )
        torch.testing.assert_close(grids[f"{k}step"].clamp(-1, 1), ref, atol=1e-5, rtol=1e-5)
    unlabelled = module.grid_labels
    module.grid_labels = lambda num: None  # labels from the seeds: other images
    assert not torch.allclose(module.sample_sets(4, seed=3)["1step"], grids["1step"])
    module.grid_labels = unlabelled
