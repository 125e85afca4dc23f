"""The benchmark scripts run end to end on a tiny network (their figures are not asserted:
benchmarks measure, tests do not time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _throughput(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "B.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_throughput.py",
            "--net",
            "tiny",
            "--batch",
            "2",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--write",
            str(out),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :]), out.read_text()


def test_gpu_throughput_script_runs_every_variant_and_writes_its_table(tmp_path: Path) -> None:
    # LPIPS (random VGG16 written on the fly) in fp32; bf16 autocast on both kinds with cheap metrics
    res, table = _throughput(tmp_path, "--kinds", "cd", "--variants", "fp32", "--metric", "lpips")
    assert res["rows"][0]["metric"] == "lpips" and "random" in res["vgg16"]
    assert "| CD (Heun, N=18, lpips) | fp32 | 2 x 1 |" in table
    res, table = _throughput(
        tmp_path, "--variants", "bf16", "--metric", "l2", "--ct-metric", "pseudo_huber"
    )
    assert [(r["kind"], r["variant"]) for r in res["rows"]] == [("cd", "bf16"), ("ct", "bf16")]
    assert all(
        r["images_per_s"] > 0 and r["micro_batch"] * r["accumulation"] == 2 for r in res["rows"]
    )
    assert (
        "| CT (pseudo_huber) | bf16 | 2 x 1 |" in table
        and table.count("## Training throughput") == 2
    )


def test_gpu_throughput_rejects_an_unknown_variant() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_throughput.py", "--variants", "fp16", "--write", ""],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stderr) == (
        1,
        "error: --variants: unknown variant 'fp16' (expected fp32, bf16, compiled)\n",
    )


def test_modes_step_cost_script_times_every_mode_and_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "B.md"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/modes_step_cost.py",
            "--net",
            "tiny",
            "--batch",
            "2",
            "--repeat",
            "1",
            "--write",
            str(out),
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows] == ["ct", "ect", "sct", "scd", "cd"]
    assert all(r["full_s"] > 0 and r["bare_s"] > 0 for r in rows)
    table = out.read_text()
    assert (
        "| sct | JVP (fwd + tangent) + online fwd/bwd |" in table
        and "## Step cost of each training mode" in table
    )
