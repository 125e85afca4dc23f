"""`bash scripts/device_check.sh --cpu-smoke` runs end to end on the CPU (tiny shapes), so the
prepared device check cannot rot: environment facts, the CUDA test set collected and skipped,
every throughput row with a real number, the summary, and BENCHMARKS.md left alone."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_device_check_cpu_smoke_runs_and_summarises(tmp_path: Path) -> None:
    bench = ROOT / "BENCHMARKS.md"
    before = hashlib.sha256(bench.read_bytes()).hexdigest()
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "scripts/device_check.sh", "--cpu-smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "device check summary (CPU smoke)" in out and "status 0" in out
    assert re.search(r"tests: \d+ skipped", out), out[-2000:]  # collected, skipped without CUDA
    res = json.loads((tmp_path / "throughput.json").read_text())
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    assert {r["recipe"] for r in ok} >= {"cd_lpips", "ct", "ect", "sct", "bare_ncsnpp"}
    assert {r["variant"] for r in ok} == {"fp32", "bf16", "compiled"}
    assert all(r["images_per_s"] > 0 and r["step_s"] > 0 for r in ok)
    for rec in ("cd_lpips", "ct", "ect", "sct", "bare_ncsnpp", "bare_ddpmpp"):
        assert re.search(rf"^{rec} +2 +\d+\.\d", out, re.M), rec  # a number in the summary
    table = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- gpu_throughput rows: CPU" in table and "| ct | CT step" in table
    assert hashlib.sha256(bench.read_bytes()).hexdigest() == before
