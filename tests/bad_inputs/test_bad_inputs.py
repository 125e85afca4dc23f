"""Every case of the bad-input corpus (``cases.py``) ends with exit code 2 and one ``error: ...``
line naming the key or file, no traceback, and no run folder created or touched.

The cases run in-process, the way ``python -m cmexp.<entry>`` runs them: the precheck
(``cmexp.utils.cli.precheck``: composition, values, run folder) under ``run_cli``, then the
entry point's function on the composed config under ``run_cli``. A few run as real
subprocesses to show the exit code, the single stderr line, the time to fail and the lock.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict, read_write

from cmexp.utils import runs
from cmexp.utils.cli import override_key, precheck, run_cli
from tests.integration.conftest import CT_EXPERIMENT as CT

from .cases import CASES, Case

ROOT = Path(__file__).resolve().parents[2]


def _tree(path: Path) -> dict[str, tuple[int, int]] | None:
    """``{relative path: (size, mtime_ns)}`` of everything under ``path`` (None: absent)."""
    if not path.exists():
        return None
    if path.is_file():
        st = path.stat()
        return {".": (st.st_size, st.st_mtime_ns)}
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
    }


def _task(entry: str) -> Callable[..., Any]:
    if entry == "train":
        from cmexp.train import train

        return train
    if entry == "sample":
        from cmexp.sample import sample

        return sample
    if entry == "eval":
        from cmexp.eval import evaluate

        return evaluate
    if entry == "edit":
        from cmexp.edit import edit

        return edit
    if entry == "export":
        from cmexp.export import export

        return export
    from cmexp.tau_search import tau_search

    return tau_search


def _argv(case: Case, args: list[str]) -> list[str]:
    """The overrides as ``python -m cmexp.train`` hands them to Hydra (main experiment, debug last)."""
    if case.entry != "train":
        return args
    from cmexp.train import train_overrides

    if not any(override_key(a) == "experiment" for a in args):
        args = [
            CT,
            *args,
        ]  # the cases were written for a CT run (the main job is CD from the zoo teacher)
    return train_overrides(args)


def _run_job(case: Case, cfg: DictConfig, out: Path) -> None:
    """What Hydra's job does after the precheck: the entry point's function on the composed
    config, with its outputs in ``out``, under ``run_cli``."""
    from hydra.core.hydra_config import HydraConfig

    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    job = copy.deepcopy(cfg)  # as Hydra's run_job
    with open_dict(job):
        del job["hydra"]
        job.paths.output_dir = str(out)
    run_cli(_task(case.entry), job)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_with_one_line_and_writes_nothing(
    case: Case, bad_files, tmp_path: Path, capsys, monkeypatch
) -> None:
    if case.cpu_only and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setenv("CMEXP_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    args = [a.format(**bad_files) for a in case.args]
    fragment = case.fragment.format(**bad_files)
    out = tmp_path / "out"
    if case.entry == "compare":
        args += [] if "--out" in args else ["--out", str(out)]
        watched = Path(args[args.index("--out") + 1])
    else:
        given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
        args += [] if given else [f"hydra.run.dir={out}"]
        watched = Path(given[0]) if given else out
    before = _tree(watched)
    stage = "config"
    with pytest.raises(SystemExit) as exc:
        try:
            if case.entry == "compare":
                from cmexp.compare import main

                main(args)
            else:
                cfg = run_cli(precheck, case.entry, _argv(case, args))
                stage = "load"
                _run_job(case, cfg, out)
        finally:
            GlobalHydra.instance().clear()
            runs.release_run_folder(out)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exc.value.code == case.code, err
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in err
    assert _tree(watched) == before, f"{watched} was created or changed"
    if case.entry != "compare":
        assert stage == case.stage, (
            f"failed at the {stage} stage, the corpus says {case.stage}: {errors[0]}"
        )


def test_every_case_names_a_key_or_file() -> None:
    """The fragment of each case names what was wrong: a config key or flag of its command line,
    a file it names, or the run folder."""
    for case in CASES:
        names = {a.split("=", 1)[0].lstrip("+~") for a in case.args if "=" in a} | {
            a for a in case.args if a.startswith("-")
        }
        names |= {m for a in case.args for m in re.findall(r"\{(\w+)\}", a)} | {
            "ckpt",
            "paths",
            "features.ckpt",
            "features=",  # the feature extractor (config group) that does not fit the images
            "model:",
        }
        names |= {
            "hydra.run.dir",
            "model.teacher_path",
            "dataset.data_dir",
            "callbacks.sample_quality.features.ckpt",
        }
        assert any(n and (n in case.fragment) for n in names), case
        if "unexpected keyword argument" in case.fragment:  # a TypeError must name the argument
            assert re.search(r"^\w+: .*unexpected keyword argument '\w+'", case.fragment), case
    assert len(CASES) >= 100
    assert {c.entry for c in CASES} == {
        "train",
        "sample",
        "eval",
        "edit",
        "tau_search",
        "compare",
        "export",
    }


# ------------------------------------------------------------------------------ real processes
ENV = {**os.environ, "CMEXP_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def _cli(
    *args: str, cwd: Path = ROOT, timeout: int = 300
) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return out, time.perf_counter() - t0


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert (
        len([ln for ln in lines if ln.startswith("error:")]) == 1 and "Traceback" not in out.stderr
    ), out.stderr
    return lines[-1]


def test_cli_config_error_fails_in_a_second_without_a_folder(
    bad_files, tmp_path: Path, record_property
) -> None:
    out, seconds = _cli(
        "cmexp.sample", f"ckpt={bad_files['ct']}", "num_samples=0", f"paths.root_dir={tmp_path}"
    )
    assert _one_error_line(out) == "error: num_samples must be an integer >= 1, got 0"
    assert not (tmp_path / "logs").exists()  # the default run folder logs/sample/adhoc/runs/<time>
    record_property("seconds_to_fail", round(seconds, 2))
    print(f"cmexp.sample num_samples=0 failed in {seconds:.2f} s")
    assert seconds < 20  # about 1 s on an idle machine; generous for a loaded CI box
    out, _ = _cli(
        "cmexp.train",
        CT,
        "debug=tiny",
        f"ckpt_path={bad_files['truncated']}",
        f"paths.root_dir={tmp_path}",
    )
    assert "is a truncated or corrupt checkpoint" in _one_error_line(out)
    assert not (tmp_path / "logs").exists()


def test_cli_load_error_removes_the_folder_hydra_made(bad_files, tmp_path: Path) -> None:
    """A bad image is found while loading, after Hydra made the run folder: the folder (holding
    only Hydra's files) and its new parents are removed."""
    out, _ = _cli(
        "cmexp.edit",
        "task=denoise",
        f"ckpt={bad_files['ct']}",
        f"images_dir={bad_files['imgs']}",
        f"paths.root_dir={tmp_path}",
    )
    assert _one_error_line(out) == (
        f"error: images_dir={bad_files['imgs']}: {bad_files['imgs']}/notes.png is not a "
        "readable image (UnidentifiedImageError); remove it from the folder or replace it"
    )
    assert not (tmp_path / "logs").exists()


def test_cli_never_writes_into_another_run(bad_files) -> None:
    """`hydra.run.dir=<a finished training run>`: refused before Hydra rewrites .hydra/*.yaml."""
    run = Path(bad_files["ct_run"])
    (run / ".hydra").mkdir(exist_ok=True)
    before = _tree(run)
    for entry, extra in (
        ("cmexp.sample", [f"ckpt={bad_files['ct']}"]),
        ("cmexp.train", [CT, "debug=tiny"]),
    ):
        out, _ = _cli(entry, *extra, f"hydra.run.dir={run}")
        assert f"error: hydra.run.dir={run} already holds a train run" in _one_error_line(out)
    assert _tree(run) == before


def test_second_training_on_a_locked_folder_fails_at_once(tmp_path: Path) -> None:
    """A training locks its run folder (flock on <run>/.lock): a second training there fails at
    once naming the folder; the lock goes with the process, even when it is killed."""
    run = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cmexp.train",
            CT,
            "debug=tiny",
            "trainer.max_steps=100000",
            f"hydra.run.dir={run}",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not runs.is_locked(run):
            time.sleep(0.05)
        assert runs.is_locked(run)
        for resume in ([], ["ckpt_path=auto"]):
            out, _ = _cli(
                "cmexp.train",
                CT,
                "debug=tiny",
                *resume,
                f"hydra.run.dir={run}",
                f"paths.root_dir={tmp_path}",
            )
            assert _one_error_line(out) == (
                f"error: hydra.run.dir={run} is in use by another training (it holds the "
                f"lock {run / '.lock'}); wait for it to end or use another folder"
            )
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: no clean-up code runs
        first.wait(timeout=60)
    assert not runs.is_locked(run)  # the kernel released it: no stale lock


def test_cli_export_refuses_an_existing_out_file(tmp_path: Path) -> None:
    """`cmexp.export format=slim out=<an existing file>`: one line naming out=, exit 2, the
    file untouched (it ended in Hydra's HYDRA_FULL_ERROR text with exit 1)."""
    dst = tmp_path / "exists.pt"
    dst.write_text("keep me")
    before = _tree(dst)
    out, _ = _cli("cmexp.export", "ckpt=zoo:fmnist_cd", "format=slim", f"out={dst}")
    assert _one_error_line(out) == (
        f"error: out={dst} is a file that exists; refusing to overwrite it: give a new file "
        "name (or remove it first)"
    )
    assert _tree(dst) == before and dst.read_text() == "keep me"


def test_cli_unknown_group_option_of_a_multirun_is_one_line(tmp_path: Path) -> None:
    """An unknown option of any config group, in a single run or a multirun (`-m`, a swept
    group), ends like `+experiment=<unknown>`: one line listing the options, exit 2."""
    for args, group in (
        (["cmexp.train", "+sweep=nope"], "sweep"),
        (["cmexp.train", "-m", "+sweep=nope"], "sweep"),
        (["cmexp.train", "-m", "+experiment=fmnist_ct_pseudo_huber,nope"], "experiment"),
        (["cmexp.sample", "ckpt=zoo:fmnist_cd", "-m", "seed=1,2", "+sweep=nope"], "sweep"),
    ):
        out, _ = _cli(*args, f"paths.root_dir={tmp_path}")
        line = _one_error_line(out)
        assert f"Could not find '{group}/nope'; Available options in '{group}': " in line, line
    assert not (tmp_path / "logs").exists()


def test_cli_model_without_experiment_names_the_appended_main_experiment(tmp_path: Path) -> None:
    """`python -m cmexp.train model=edm`: the main job's CD experiment is appended (no
    +experiment), whose model.taus EDM does not take; the line says so and names the way out."""
    out, _ = _cli("cmexp.train", "model=edm", f"paths.root_dir={tmp_path}")
    line = _one_error_line(out)
    assert line.startswith(
        "error: model: EDMLitModule.__init__() got an unexpected keyword argument 'taus'"
    ), line
    assert (
        "no +experiment was given, so the main job's experiment +experiment=fmnist_cd_quick "
        "was appended and its model settings stay: pass +experiment=fmnist_edm"
    ) in line
    assert not (tmp_path / "logs").exists()


def test_cli_diffusion_sampler_on_a_consistency_model_is_refused(tmp_path: Path) -> None:
    """`sampler=ddim` / `heun` on a consistency model (cmexp.sample, cmexp.eval): refused with
    the reason, exit 2, nothing written (using f as a denoiser in a diffusion sampler would be
    another method, docs/usage.md)."""
    for entry, sampler in (
        ("cmexp.sample", "ddim"),
        ("cmexp.sample", "heun"),
        ("cmexp.eval", "ddim"),
    ):
        out, _ = _cli(
            entry, "ckpt=zoo:fmnist_cd", f"sampler={sampler}", "num_samples=8",
            f"paths.root_dir={tmp_path}",
        )  # fmt: skip
        assert _one_error_line(out) == (
            f"error: sampler={sampler} does not fit a consistency model (its samplers: consistency)"
        )
    assert not (tmp_path / "logs").exists()
