"""Step cost of each training mode relative to the bare network passes it needs (issue 16).

One run, ratios only (full step and bare passes timed alternately, so both see the same load):

- CT:  full step / (target forward + online forward/backward)
- ECT: full step / (target forward at r + online forward/backward)
- sCT: full step / (one forward-mode JVP of the online net (forward + tangent) + online forward/backward)
- sCD: full step / (teacher forward + JVP + online forward/backward)
- CD (Heun): full step / (2 teacher forwards + target forward + online forward/backward)
- IMM: full step / (target forward at (s, r) + online forward/backward at (s, t)); the rest is
  the MMD over particle groups (M = 4)
- MeanFlow: full step / (one forward-mode JVP of u (forward + tangent) + online forward/backward)
- TCM (stage 2): full step / (stage-1 forward + target forward at r + online forward/backward):
  the target at r runs the whole batch through the frozen stage-1 model and the student when
  some rows fall below t' (NVlabs/TCM's TCMPrecond does the same); stage 1 is a CT checkpoint
  of the same network with random weights

The full step is ``compute_loss`` + backward + optimizer step + target/EMA updates. The teacher
of CD/ECT/sCD is a random network of the same architecture saved as an EDM checkpoint.

``--profile`` adds an op-level account (torch.profiler, 3 steps of each): the convolutions the
full step and the bare passes run (forward and backward calls per step: equal counts mean the
step runs no network pass beyond the bare ones), and the shares of the full step spent in the
optimizer step and in the target/EMA updates (``lerp_``), which the bare passes do not contain,
and the ratio without them (``ratio x (1 - both shares)``: what the loss's own arithmetic adds).

    .venv/bin/python benchmarks/modes_step_cost.py [--net ncsnpp_small] [--batch 32] [--repeat 5] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cmexp  # noqa: E402, F401 - the config tree's resolvers
from benchmarks.training_and_sampling import _sync  # noqa: E402


def fake_teacher(cfg, folder: Path) -> Path:
    """An EDM checkpoint of ``cfg.net`` with random weights (timing does not depend on them)."""
    from hydra.utils import instantiate

    from cmexp.diffusion import EDMPrecond

    net = instantiate(cfg.net)
    teacher = EDMPrecond(net)
    meta = {
        "kind": "edm",
        "img_resolution": net.img_resolution,
        "img_channels": net.img_channels,
        "label_dim": net.label_dim,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "sigma_data": 0.5,
        "c_noise_scale": 0.25,
    }
    path = folder / "teacher.ckpt"
    torch.save(
        {"cmexp": meta, "state_dict": {f"ema.{k}": v for k, v in teacher.state_dict().items()}},
        path,
    )
    return path


def fake_stage1(net_name: str, folder: Path) -> Path:
    """A CT checkpoint of ``net_name`` with random weights (TCM's stage 1)."""
    module, _, _ = build("ct", net_name, 1, folder)
    path = folder / "stage1.ckpt"
    meta = {**module.metadata(), "config": module.run_config}
    torch.save({"cmexp": meta, "state_dict": module.state_dict()}, path)
    return path


def build(mode: str, net_name: str, batch: int, folder: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    over = [f"net={net_name}", "dataset=gaussian_mixture", "dataset.channels=1", f"model={mode}"]
    if mode in ("cd", "ct"):
        over += ["schedule=fixed", "metric=l2"] + (
            ["solver=heun", "schedule.num_scales=18"] if mode == "cd" else []
        )
    if mode == "imm":
        over += ["net.guidance_embed=true"]  # the second time s
    if mode == "meanflow":
        over += ["net.guidance_embed=true", "net.embedding_type=positional"]  # as fmnist_meanflow
    if mode == "tcm":  # stage 1: a CT model (boundary scalings in training)
        over += ["model/precond=cm", f"model.stage1_path={fake_stage1(net_name, folder)}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=over)
    if mode in ("cd", "ect", "scd"):
        OmegaConf.update(cfg, "model.teacher_path", str(fake_teacher(cfg, folder)))
    module = instantiate(cfg.model)
    # what cmexp.train records (the net config is what a TCM stage 1 must describe)
    module.run_config = {"config": {"net": OmegaConf.to_container(cfg.net, resolve=True)}}
    module.train()
    params = (
        module.trainable_parameters()
        if hasattr(module, "trainable_parameters")
        else module.model.parameters()
    )
    opt = module.optimizer_factory(params=list(params))
    m = module.model
    x = torch.rand(batch, m.img_channels, m.img_resolution, m.img_resolution) * 2 - 1
    return module, opt, x


def bare_passes(mode: str, module, x: torch.Tensor):
    """The network passes the algorithm needs, with nothing else."""
    sigma = torch.full((x.shape[0],), 1.0)
    model = module.model
    teacher = getattr(module, "teacher", None)

    if mode == "meanflow":
        t, r = torch.full_like(sigma, 0.7), torch.full_like(sigma, 0.2)

        def run_meanflow() -> None:
            with torch.no_grad():
                torch.func.jvp(
                    lambda xx, tt: model.u(xx, r, tt),
                    (x, t),
                    (torch.randn_like(x), torch.ones_like(t)),
                )
            model.u(x, r, t).square().mean().backward()

        return run_meanflow

    def run() -> None:
        with torch.no_grad():
            if mode == "cd":
                teacher(x, sigma)
                teacher(x, sigma)
            if mode in ("cd", "ct"):
                module.target(x, sigma)
            if mode in ("ect", "imm", "tcm"):
                model(x, sigma)
            if mode == "tcm":
                module.teacher(x, sigma)
            if mode == "scd":
                teacher(x, sigma)
            if mode in ("sct", "scd"):
                torch.func.jvp(
                    lambda xx, ss: model(xx, ss),
                    (x, sigma),
                    (torch.randn_like(x), torch.ones_like(sigma)),
                )
        model(x, sigma).square().mean().backward()

    return run


def op_profile(full, bare, steps: int = 3) -> dict:
    """Per-step convolution calls (forward, backward) of ``full`` and ``bare`` and the share of
    ``full``'s self CPU time in the optimizer step and in ``lerp_`` (target/EMA updates)."""
    from torch.profiler import ProfilerActivity, profile

    def run(fn) -> dict[str, tuple[float, float]]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
        return {
            e.key: (e.count / steps, e.self_cpu_time_total / steps) for e in prof.key_averages()
        }

    f, b = run(full), run(bare)
    total = sum(t for _, t in f.values())

    def count(ops: dict, key: str) -> float:
        return ops.get(key, (0.0, 0.0))[0]

    optim = sum(t for k, (_, t) in f.items() if k.startswith("Optimizer.step"))
    return {
        "conv_full": count(f, "aten::convolution"),
        "conv_bare": count(b, "aten::convolution"),
        "conv_bwd_full": count(f, "aten::convolution_backward"),
        "conv_bwd_bare": count(b, "aten::convolution_backward"),
        "optimizer_share": optim / total,
        "ema_share": f.get("aten::lerp_", (0, 0.0))[1] / total,
    }


def step_cost(
    mode: str, net_name: str, batch: int, repeat: int, folder: Path, profile: bool = False
) -> dict:
    module, opt, x = build(mode, net_name, batch, folder)
    bare = bare_passes(mode, module, x)

    def full() -> None:
        opt.zero_grad(set_to_none=True)
        loss, _ = module.compute_loss(x, None)
        loss.backward()
        opt.step()
        module.after_optimizer_step()

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        _sync()
        return time.perf_counter() - t0

    for _ in range(2):
        timed(full), timed(bare)
    fs, bs = [], []
    for _ in range(repeat):
        fs.append(timed(full))
        bs.append(timed(bare))
    f, b = statistics.median(fs), statistics.median(bs)
    return {
        "mode": mode,
        "full_s": f,
        "bare_s": b,
        "ratio": f / b,
        "pair_ratio_median": statistics.median([a / c for a, c in zip(fs, bs, strict=True)]),
        **(op_profile(full, bare) if profile else {}),
    }


PASSES = {
    "cd": "2 teacher fwd + target fwd + online fwd/bwd",
    "ct": "target fwd + online fwd/bwd",
    "ect": "target fwd at r + online fwd/bwd",
    "sct": "JVP (fwd + tangent) + online fwd/bwd",
    "scd": "teacher fwd + JVP + online fwd/bwd",
    "imm": "target fwd at (s, r) + online fwd/bwd",
    "meanflow": "JVP of u (fwd + tangent) + online fwd/bwd",
    "tcm": "stage-1 fwd + target fwd at r + online fwd/bwd",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--net", default="ncsnpp_small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--modes", default="ct,ect,sct,scd,cd,imm,meanflow,tcm")
    parser.add_argument(
        "--write", type=Path, default=None, help="append a section to this markdown file"
    )
    parser.add_argument("--profile", action="store_true", help="add the op-level account")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            rows.append(
                step_cost(mode, args.net, args.batch, args.repeat, Path(tmp), args.profile)
            )
            print(json.dumps(rows[-1]), flush=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [
        "",
        f"## Step cost of each training mode (benchmarks/modes_step_cost.py, {args.net}, batch {args.batch}, CPU)",
        "",
        (
            f"Machine: {machine}. Command: `.venv/bin/python benchmarks/modes_step_cost.py --net {args.net} "
            f"--batch {args.batch} --repeat {args.repeat}{' --profile' * args.profile}`. Full step = loss + backward + optimizer + target/EMA "
            "updates; bare = the network passes the mode needs; medians, timed alternately."
        ),
        "",
        "| mode | bare passes | full step | bare | ratio (median of pairs) |"
        + (
            " convolutions fwd/bwd, full vs bare | optimizer | target/EMA | ratio without them |"
            if args.profile
            else ""
        ),
        "|---|---|---|---|---|" + ("---|---|---|---|" if args.profile else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {PASSES[r['mode']]} | {r['full_s']:.3f} s | {r['bare_s']:.3f} s | "
            f"**{r['ratio']:.3f}** ({r['pair_ratio_median']:.3f}) |"
            + (
                f" {r['conv_full']:.0f}/{r['conv_bwd_full']:.0f} vs {r['conv_bare']:.0f}/"
                f"{r['conv_bwd_bare']:.0f} | {100 * r['optimizer_share']:.1f}% |"
                f" {100 * r['ema_share']:.1f}% |"
                f" {r['ratio'] * (1 - r['optimizer_share'] - r['ema_share']):.3f} |"
                if args.profile
                else ""
            )
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(args.write, "a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
