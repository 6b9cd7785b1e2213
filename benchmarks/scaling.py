"""Multi-GPU scaling of the on-policy training steps: TeacherRL and OPDStudent on the SD-1.5-size UNet under DDP
and FSDP on 1, 2, 4 (and 8) GPUs with the same per-GPU batch.

Each (method, strategy, GPUs) point is a fresh process group launched by Lightning (``strategy`` ddp: Lightning's
DDP through :func:`lit_distill.distributed.ddp_strategy`; fsdp: :func:`lit_distill.distributed.fsdp_strategy`, FSDP2
sharding the student per diffusers block, teachers replicated). The workload and timing are
``benchmarks/throughput.py``'s (its ``build_module``, ``make_loader`` and CUDA-event ``StepTimer``): per GPU 4
prompts x 8 rollouts = 32 images, 10 SDE steps, every (sample, step) pair trained in minibatches of 32.
``images_per_s`` = GPUs x 32 / median step time of rank 0; efficiency(N) = images/s(N) / (N x images/s(1)) for
the same method and strategy. Peak memory is rank 0's ``torch.cuda.max_memory_allocated``.

    python benchmarks/scaling.py                          # every GPU count up to the machine's, DDP and FSDP
    python benchmarks/scaling.py --gpus 1 2 4 --strategies ddp
    python benchmarks/scaling.py --tiny --gpus 1 2        # CPU smoke test on gloo (tiny UNet, fp32)
    python benchmarks/report.py                           # table and plot from the JSON (every page)

It measures the training command of the README's multi-GPU section, e.g.
``lit-distill fit --config configs/teacher_rl/sd_local.yaml --trainer.devices 4 --trainer.strategy ddp``, with the
text encoder stubbed and random weights. Results: ``benchmarks/results/scaling.json`` (``figures.points``, one
entry per method/strategy/GPUs; ``figures.efficiency``), the ``scaling`` section of docs/benchmarks.md and
``docs/scaling.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, write_results  # noqa: E402

import report  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "scaling.json"
METHODS = ("teacher_rl", "opd")
STRATEGIES = ("ddp", "fsdp")


def worker(args) -> None:
    """One point: fit ``warmup + steps`` batches on ``--devices`` GPUs; rank 0 writes ``--result``."""
    import torch

    import throughput as tp
    from lit_distill.distributed import ddp_strategy, fsdp_strategy

    cuda = not args.tiny
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    spec = tp.model_specs(args.tiny)["unet"]
    runtime = {**tp.parse_runtime(args.runtime), "gradient_checkpointing": args.gradient_checkpointing}
    module = tp.build_module(args.method, spec, device, runtime=runtime, tiny=args.tiny)
    timer = tp.StepTimer(module, tp.Clock(cuda))
    strategy = "auto"
    if args.devices > 1 or args.strategy == "fsdp":
        strategy = ddp_strategy() if args.strategy == "ddp" else fsdp_strategy()
    precision = args.precision or ("32-true" if args.tiny else "bf16-mixed")
    trainer = tp.make_trainer(device, precision, args.warmup + args.steps, [timer], args.devices, strategy)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(module, tp.make_loader(args.method, spec, args.warmup + args.steps, world=args.devices))
    if trainer.global_rank == 0:
        out = timer.result(args.warmup)
        out["images_per_s"] = args.devices * spec.rollout_batch / out["step_s"]
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        Path(args.result).write_text(json.dumps(out))


def run_point(method: str, strategy: str, devices: int, work_dir: Path, *, tiny: bool, warmup: int, steps: int,
              gradient_checkpointing: bool = False, precision: str | None = None,
              runtime: dict | None = None) -> dict:
    """Launch :func:`worker` for one (method, strategy, devices) point in a fresh process (Lightning starts the
    other ranks) and return rank 0's figures; raises ``RuntimeError`` if the worker fails. ``runtime``: settings of
    the methods' ``runtime`` group (the defaults for the others)."""
    result = Path(work_dir) / f".scaling_{method}_{strategy}_{devices}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--method", method, "--strategy", strategy,
               "--devices", str(devices), "--result", str(result), "--warmup", str(warmup), "--steps", str(steps)]
    command += ["--tiny"] if tiny else []
    command += ["--gradient-checkpointing"] if gradient_checkpointing else []
    command += ["--runtime", *(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in runtime.items())] \
        if runtime else []
    command += ["--precision", precision] if precision else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                       ("NVSHMEM_DISABLE_NVLS", "1")):  # NVLink multicast stays off (not needed here)
        env.setdefault(key, value)
    result.unlink(missing_ok=True)
    code = subprocess.run(command, env=env).returncode
    if code != 0 or not result.is_file():
        raise RuntimeError(f"worker exited with {code}")
    out = json.loads(result.read_text())
    result.unlink()
    return out


def measure(args) -> dict:
    import torch

    import throughput as tp

    available = torch.cuda.device_count()
    if not args.tiny and available < 1:
        raise SystemExit("no CUDA device: run on GPUs, or pass --tiny for the CPU smoke test")
    gpus = args.gpus or [n for n in (1, 2, 4, 8) if n <= available]
    if not args.tiny and max(gpus) > available:
        raise SystemExit(f"--gpus {gpus}: this machine has {available} GPUs")
    points, started = [], time.time()
    for method in args.methods:
        for strategy in args.strategies:
            for n in gpus:
                print(f"[scaling] {method} {strategy} on {n} device(s)", flush=True)
                point = {"method": method, "strategy": strategy, "gpus": n}
                try:
                    point.update(run_point(method, strategy, n, Path(args.out).parent, tiny=args.tiny,
                                           warmup=args.warmup, steps=args.steps,
                                           gradient_checkpointing=args.gradient_checkpointing,
                                           precision=args.precision, runtime=tp.parse_runtime(args.runtime)))
                except RuntimeError as error:
                    points.append({**point, "error": str(error)})
                    continue
                points.append(point)
                print(f"[scaling]   {point['images_per_s']:.2f} images/s, peak {point['peak_mem_gib'] or 0:.1f} GiB",
                      flush=True)
    return {"points": points, "efficiency": efficiency(points), "per_gpu_images_per_step": 32 if not args.tiny else None,
            "model": "UNet2DConditionModel sd15-size" if not args.tiny else "tiny UNet (CPU, gloo)",
            "wall_seconds": round(time.time() - started, 1)}


def efficiency(points: list[dict]) -> dict:
    """``{"method/strategy": {"N": images/s(N) / (N x images/s(1))}}`` over the points that ran."""
    out = {}
    for p in points:
        one = next((q for q in points if q["method"] == p["method"] and q["strategy"] == p["strategy"]
                    and q["gpus"] == 1 and "error" not in q), None)
        if one is not None and "error" not in p:
            out.setdefault(f"{p['method']}/{p['strategy']}", {})[str(p["gpus"])] = \
                p["images_per_s"] / (p["gpus"] * one["images_per_s"])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=None, help="GPU counts (default 1, 2, 4, 8 up to the machine's)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps (compilation happens there)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--runtime", nargs="*", default=[], metavar="NAME=VALUE",
                   help="runtime settings of the methods (default: theirs, e.g. regional compilation on CUDA)")
    p.add_argument("--precision", default=None, help="default bf16-mixed (32-true with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny UNet on CPU processes over gloo (smoke test)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="teacher_rl", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out or str(DEFAULT_OUT.with_name("scaling_tiny.json") if args.tiny else DEFAULT_OUT)
    if args.worker:
        worker(args)
        return
    write_results("scaling", measure(args), args.out)
    if not args.tiny:
        report.write_all()


if __name__ == "__main__":
    main()
