"""Benchmarks of issue 7 (ratios measured in one run, on whatever machine runs this):

1. training-step overhead: one full CD step (Heun teacher) and one CT step (loss, backward,
   optimizer, target and EMA updates) divided by the bare network passes the algorithm needs
   (CD-Heun: 2 teacher forwards + 1 target forward + online forward/backward; CT: 1 target
   forward + online forward/backward). Target <= 1.05.
2. sampling: images/s of 1-step consistency sampling vs the teacher's Heun sampler at N = 18
   (NFE 35), same network and batch. Target >= 30x.
3. start-up: `python -m cmexp.train +experiment=cifar10_cd_lpips --cfg job` wall time. Target <= 3 s.
4. peak memory of a CD step vs a plain forward/backward of the online net (fresh processes,
   peak RSS on CPU / max_memory_allocated on CUDA).

    .venv/bin/python benchmarks/training_and_sampling.py [--net ncsnpp_small] [--batch 64] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _sync() -> None:
    """Wait for queued GPU work (no-op without CUDA), so wall times cover the kernels."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, repeat: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(
    kind: str,
    net_name: str,
    batch: int,
    device: str,
    channels: int = 1,
    metric: str = "l2",
    weights_path: str | None = None,
):
    """A CD (Heun, N = 18) or CT module around ``net_name`` with ``metric``, and a batch of images.

    Network weights do not matter for timing: the CD teacher is a second random network of the
    same architecture; ``metric="lpips"`` uses the VGG16 file at ``weights_path``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from cmexp.diffusion.precond import EDMPrecond
    from cmexp.training.base import frozen_copy

    GlobalHydra.instance().clear()
    over = [
        f"net={net_name}",
        "dataset=gaussian_mixture",
        f"dataset.channels={channels}",
        f"metric={metric}",
        "schedule=fixed",
        "model=ct",
    ]
    if metric == "lpips":
        over.append(f"metric.weights_path={weights_path}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=over)
    module = instantiate(cfg.model).to(device)
    teacher = None
    if kind == "cd":  # the CD loss with a teacher of the same architecture
        from cmexp.diffusion import heun_step
        from cmexp.methods.consistency.loss import ConsistencyDistillationLoss

        teacher = frozen_copy(EDMPrecond(instantiate(cfg.net))).to(device).eval()
        module.loss = ConsistencyDistillationLoss(module.loss.metric, heun_step, teacher=teacher)
    opt = module.optimizer_factory(params=module.model.parameters())
    x = (
        torch.rand(
            batch,
            module.model.img_channels,
            module.model.img_resolution,
            module.model.img_resolution,
            device=device,
        )
        * 2
        - 1
    )
    return module, teacher, opt, x


def step_overhead(kind: str, net_name: str, batch: int, device: str, repeat: int) -> dict:
    """Full training step vs the bare passes, timed alternately (full, bare, full, ...) so both
    see the same machine load; the full step is split into loss + backward and optimizer +
    target/EMA updates."""
    module, teacher, opt, x = build(kind, net_name, batch, device)
    module.train()
    sigma = torch.full((batch,), 1.0, device=device)

    def full() -> tuple[float, float]:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = module.compute_loss(x, None)
        loss.backward()
        _sync()
        t1 = time.perf_counter()
        opt.step()
        module.after_optimizer_step()
        _sync()
        return t1 - t0, time.perf_counter() - t1

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            if teacher is not None:
                teacher(x, sigma)
                teacher(x, sigma)
            module.target(x, sigma)
        module.model(x, sigma).square().mean().backward()
        _sync()
        return time.perf_counter() - t0

    for _ in range(2):
        full(), bare()
    lb, os_, br = [], [], []
    for _ in range(repeat):
        a, b = full()
        lb.append(a)
        os_.append(b)
        br.append(bare())
    full_s = statistics.median([a + b for a, b in zip(lb, os_)])
    bare_s = statistics.median(br)
    return {
        "kind": kind,
        "full_s": full_s,
        "bare_s": bare_s,
        "ratio": full_s / bare_s,
        "loss_backward_s": statistics.median(lb),
        "optimizer_ema_s": statistics.median(os_),
        "ratio_loss_backward": statistics.median(lb) / bare_s,
        "pair_ratio_median": statistics.median([(a + b) / c for a, b, c in zip(lb, os_, br)]),
    }


def sampling_ratio(net_name: str, batch: int, device: str, repeat: int) -> dict:
    from cmexp.diffusion import append_zero, karras_sigmas, sample_heun
    from cmexp.diffusion.precond import EDMPrecond
    from cmexp.diffusion.sampling import sample_onestep

    module, _, _, x = build("ct", net_name, batch, device)
    cm = module.ema.eval()
    edm = EDMPrecond(cm.net).eval()
    sig = append_zero(karras_sigmas(18, device=device))
    with torch.no_grad():
        t_cm = timeit(lambda: sample_onestep(cm, x), repeat)
        t_heun = timeit(lambda: sample_heun(edm, x * 80, sig), max(2, repeat // 4), warmup=1)
    return {
        "onestep_img_per_s": batch / t_cm,
        "heun35_img_per_s": batch / t_heun,
        "ratio": t_heun / t_cm,
    }


def startup(repeat: int = 3) -> dict:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "cmexp.train", "+experiment=cifar10_cd_lpips", "--cfg", "job"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "all_s": times}


def peak_memory(mode: str, net_name: str, batch: int, device: str) -> float:
    """Peak memory (MB) of one process doing ``mode`` ("cd" or "plain") twice."""
    code = f"""
import resource, torch, sys
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
from training_and_sampling import build
kind = {mode!r}
module, teacher, opt, x = build('cd' if kind == 'cd' else 'ct', {net_name!r}, {batch}, {device!r})
sigma = torch.full((x.shape[0],), 1.0, device=x.device)
for _ in range(2):
    opt.zero_grad(set_to_none=True)
    if kind == 'cd':
        loss, _ = module.compute_loss(x, None)
    else:
        loss = module.model(x, sigma).square().mean()
    loss.backward(); opt.step()
if torch.cuda.is_available():
    print(torch.cuda.max_memory_allocated() / 2**20)
else:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="ncsnpp_small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    ap.add_argument("--skip-startup", action="store_true", help="leave out the start-up benchmark")
    ap.add_argument("--write", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )
    res = {
        "machine": machine,
        "torch": torch.__version__,
        "net": args.net,
        "batch": args.batch,
        "cd_step": step_overhead("cd", args.net, args.batch, args.device, args.repeat),
        "ct_step": step_overhead("ct", args.net, args.batch, args.device, args.repeat),
        "sampling": sampling_ratio(args.net, args.batch, args.device, args.repeat),
        "startup": {"median_s": float("nan")} if args.skip_startup else startup(),
        "memory_mb": {
            "cd_step": peak_memory("cd", args.net, args.batch, args.device),
            "plain_fwd_bwd": peak_memory("plain", args.net, args.batch, args.device),
        },
    }
    print(json.dumps(res, indent=2))
    if args.write:
        m = res["memory_mb"]
        block = f"""
## Training, sampling, start-up, memory (issue 7) -- {time.strftime("%Y-%m-%d")}, {machine}, torch {torch.__version__}

`benchmarks/training_and_sampling.py --net {args.net} --batch {args.batch}` (medians of {args.repeat} runs, full and bare steps timed alternately, fp32):

| benchmark | measured | target |
|---|---|---|
| CD step (Heun, l2) / bare passes (2 teacher fwd + target fwd + online fwd/bwd) | {res["cd_step"]["full_s"]:.3f} s / {res["cd_step"]["bare_s"]:.3f} s = **{res["cd_step"]["ratio"]:.3f}** (median of per-pair ratios {res["cd_step"]["pair_ratio_median"]:.3f}) | <= 1.05 |
| of which loss + backward / bare passes; optimizer + target/EMA updates | {res["cd_step"]["ratio_loss_backward"]:.3f}; {1000 * res["cd_step"]["optimizer_ema_s"]:.1f} ms | |
| CT step / bare passes (target fwd + online fwd/bwd) | {res["ct_step"]["full_s"]:.3f} s / {res["ct_step"]["bare_s"]:.3f} s = **{res["ct_step"]["ratio"]:.3f}** (median of per-pair ratios {res["ct_step"]["pair_ratio_median"]:.3f}) | <= 1.05 |
| of which loss + backward / bare passes; optimizer + target/EMA updates | {res["ct_step"]["ratio_loss_backward"]:.3f}; {1000 * res["ct_step"]["optimizer_ema_s"]:.1f} ms | |
| 1-step sampling vs Heun N = 18 (NFE 35), images/s | {res["sampling"]["onestep_img_per_s"]:.1f} vs {res["sampling"]["heun35_img_per_s"]:.2f} = **{res["sampling"]["ratio"]:.1f}x** | >= 30x |
| start-up `+experiment=cifar10_cd_lpips --cfg job` | **{res["startup"]["median_s"]:.2f} s** | <= 3 s |
| peak memory: CD step vs plain online fwd/bwd | {m["cd_step"]:.0f} MB vs {m["plain_fwd_bwd"]:.0f} MB = **{m["cd_step"] / m["plain_fwd_bwd"]:.2f}x** | (report) |
"""
        out = Path(args.write)
        out.write_text((out.read_text() if out.exists() else "# Benchmarks\n") + block)


if __name__ == "__main__":
    main()
