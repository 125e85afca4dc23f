"""openai/consistency_models_cifar10 checkpoints through the entry points: a test-made CD file in
the release's Flax msgpack layout (NCSN++ at a reduced width, under the released folder name)
samples through ``cmexp.sample`` (1 and 2 steps equal to the release's own sampler computed
directly on the Flax tree), ``cmexp.eval``, ``cmexp.edit`` and ``cmexp.tau_search``, and the
test-made ``edm_cifar10_ema`` serves as a CD teacher (``model.teacher_path``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import flax_format as ff
from tests.integration.conftest import compose_train, fake_inception_weights

ARCH = {"ch_mult": (1, 2), "num_res_blocks": 1}
#: The suite's NCSN++ at the test-made release files' width (a student that starts from them).
FILE_NET = [
    "net=ncsnpp",
    "net.model_channels=8",
    "net.channel_mult=[1,2]",
    "net.num_blocks=1",
    "net.attn_resolutions=[16]",
    "net.label_dim=0",
    "dataset.resolution=32",
]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``<root>/models/cd-lpips/checkpoints/checkpoint_80``, ``<root>/models/edm_cifar10_ema``
    and a small CIFAR-10 pickle folder ``<root>/data/cifar-10-batches-py``."""
    root = tmp_path_factory.mktemp("flax_release")
    params = ff.ncsnpp_params(nf=8, num_res_blocks=1, ch_mult=(1, 2), seed=3)
    ema = ff.perturbed(params, 4)
    cd = ff.write_state(
        root / "models" / "cd-lpips" / "checkpoints" / "checkpoint_80",
        ff.train_state(params, ema),
    )
    edm = ff.write_state(root / "models" / "edm_cifar10_ema", ff.train_state(params, ema))
    folder = root / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump(
                {
                    "data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
                    "labels": list(range(4)),
                },
                fh,
            )
    return {"cd": cd, "edm": edm, "root": root, "ema": ema}  # type: ignore[dict-item]


def _direct_samples(p: dict, n: int, seed: int, sigmas: list[float]) -> torch.Tensor:
    """The release's samplers (onestep / the notebook's stochastic iterative sampler) on the
    Flax tree, with cmexp's per-image noise."""
    from cmexp.diffusion.sampling import SeededNoise

    noise = SeededNoise(range(seed, seed + n))
    x = noise.randn((3, 32, 32)) * sigmas[0]
    for i, t in enumerate(sigmas):
        x0 = ff.distiller(p, x, torch.full((n,), float(t)), **ARCH).clamp(-1, 1)
        if i + 1 < len(sigmas):
            nxt = sigmas[i + 1]
            x = x0 + noise.randn_like(x0) * (nxt**2 - 0.002**2) ** 0.5
    return x0


@pytest.mark.parametrize("steps", [1, 2])
def test_sample_equals_the_releases_sampler(release, tmp_path: Path, steps: int) -> None:
    from cmexp.sample import sample
    from cmexp.utils.images import to_uint8

    torch.set_num_threads(1)
    cfg = compose_train(
        [f"ckpt={release['cd']}", "num_samples=3", "batch_size=2", f"steps={steps}", "seed=5"],
        tmp_path / "out",
        "sample",
    )
    info = sample(cfg)["info"]
    assert info["kind"] == "cd" and info["nfe"] == steps
    if steps == 2:  # the notebook's ts = [0, 11, 17] on the N = 18 grid
        assert info["sigmas"][1] == pytest.approx(0.58535, rel=1e-4)
    got = np.load(tmp_path / "out" / "samples.npz")["arr_0"].astype(int)
    want = to_uint8(_direct_samples(release["ema"], 3, 5, info["sigmas"])).numpy().astype(int)
    assert got.shape == want.shape == (3, 32, 32, 3)
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01
    assert sorted(p.name for p in release["cd"].parent.iterdir()) == ["checkpoint_80"]


def test_eval_edit_and_tau_search(release, tmp_path: Path, monkeypatch) -> None:
    import json

    from cmexp.edit import edit
    from cmexp.eval import evaluate
    from cmexp.tau_search import tau_search

    torch.set_num_threads(1)
    monkeypatch.setenv("CMEXP_ROOT", str(release["root"]))  # data_dir = <root>/data
    common = [f"ckpt={release['cd']}", f"cache_dir={tmp_path / 'cache'}"]
    # CIFAR-10-shaped samples are scored with Inception (the Fashion-MNIST classifier refuses
    # them): a weights file of the real layout with random values
    weights = fake_inception_weights(tmp_path / "inception", monkeypatch)
    out = evaluate(
        compose_train(
            [*common, "num_samples=4", "num_real=8", "batch_size=4", "steps=[1,2]",
             "features=inception", f"features.weights_path={weights}", "kid_subset_size=4"],
            tmp_path / "eval",
            "eval",
        )
    )  # fmt: skip
    assert set(out["metrics"]) == {"1step", "2step"}
    assert np.isfinite(out["metrics"]["2step"]["fid"])
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["protocol"]["kind"] == "cd" and saved["protocol"]["reference"]["count"] == 8
    res = edit(
        compose_train(
            [
                "task=inpaint",
                f"ckpt={release['cd']}",
                f"data_dir={release['root'] / 'data'}",
                "num_samples=2",
                "task.num_scales=3",
            ],
            tmp_path / "edit",
            "edit",
        )
    )
    assert res["metrics"]["kind"] == "cd" and np.isfinite(res["metrics"]["psnr"])
    ts = tau_search(
        compose_train(
            [
                *common,
                "num_samples=4",
                "num_real=8",
                "batch_size=4",
                "num_scales=5",
                "features=inception",
                f"features.weights_path={weights}",
            ],
            tmp_path / "ts",
            "tau_search",
        )
    )
    assert ts["num_scales"] == 5 and len(ts["taus"]) == 1
    assert sorted(p.name for p in release["cd"].parent.iterdir()) == ["checkpoint_80"]


@pytest.mark.parametrize("method", ["cd", "ect", "scd"])
def test_released_edm_teacher_distils(release, tmp_path: Path, method: str) -> None:
    """``model.teacher_path=edm_cifar10_ema`` (test-made): CD's teacher and ECT's starting
    point, and sCD's teacher (converted to TrigFlow time); the student is net=ncsnpp at the
    file's width and starts from the teacher's weights (model.init_from_teacher=true for CD and
    sCD; ECT always does)."""
    from cmexp.train import train

    torch.set_num_threads(1)
    overrides = [
        "debug=tiny",
        f"model={method}",
        f"model.teacher_path={release['edm']}",
        *FILE_NET,
        "trainer.max_steps=2",
    ]
    train(compose_train(overrides, tmp_path / "run"))
    ckpt = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["cmexp"]["kind"] == method
    assert ckpt["cmexp"]["teacher_path"] == str(release["edm"])


@pytest.mark.parametrize("method", ["ect", "tcm"])
def test_released_consistency_model_is_fine_tuned(release, tmp_path: Path, method: str) -> None:
    """A released CD file (test-made) as ECT's starting point (``model.teacher_path``) and as
    TCM's stage 1 (``model.stage1_path``), with the boundary scalings it was trained with
    (``model/precond=cm``): the student starts as exactly the released EMA network and trains.
    With ECT's own scalings (``model/precond=ect``) the run is refused on one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from cmexp.inference import load_model
    from cmexp.train import train

    torch.set_num_threads(1)
    key = "model.teacher_path" if method == "ect" else "model.stage1_path"
    overrides = [
        "debug=tiny",
        f"model={method}",
        f"{key}={release['cd']}",
        *FILE_NET,
        "trainer.max_steps=2",
    ]
    released = load_model(str(release["cd"])).model.net.state_dict()
    cfg = compose_train([*overrides, "model/precond=cm"], tmp_path / "a")
    module = instantiate(cfg.model)
    for name in ("model", "ema"):
        mine = getattr(module, name).net.state_dict()
        assert mine.keys() == released.keys()
        assert all(torch.equal(mine[k], released[k]) for k in mine), name
    train(compose_train([*overrides, "model/precond=cm"], tmp_path / "run"))
    ckpt = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["cmexp"]["kind"] == method
    with pytest.raises(InstantiationException) as err:
        instantiate(compose_train([*overrides, "model/precond=ect"], tmp_path / "b").model)
    assert isinstance(err.value.__cause__, ValueError)
    msg = str(err.value.__cause__).splitlines()
    assert msg == [
        f"{key}={release['cd']} is a 'cd' model, trained with the boundary scalings; the "
        "student must train with the same: use model/precond=cm"
    ]
