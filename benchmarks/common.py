"""Shared by the benchmark scripts: the results file (schema: shared/design/RESULTS.md), parallel units, seed means
and plots.

``write_results`` writes ``benchmarks/results/NAME.json`` = ``{"benchmark", "command", "device", "date",
"commit", "figures"}``; with ``merge=True`` the new figures are merged into the file's (each top-level key
replaced; with ``merge_depth=2`` dicts are merged one level further, e.g. ``figures["methods"]`` method by
method), so parts of one benchmark measured by separate runs (one GPU, then two) end up in one file, and
``provenance[key]`` keeps the command, device, date and commit of the run that wrote each top-level key
(:func:`merged_record`; ``merge_part`` merges a results file written elsewhere the same way).
``benchmarks/report.py`` writes README.md and docs/ from the results files."""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def utc_now() -> str:
    """The current UTC time, ISO 8601 with a ``Z`` (``2026-11-23T10:00:00Z``)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def deep_merge(old, new, depth: int | None = None):
    """``new`` merged into ``old``: dicts key by key, down to ``depth`` levels of dicts (None: all the way),
    anything else (and dicts below ``depth``) replaced by ``new``. ``depth=1`` replaces each top-level value."""
    if isinstance(old, dict) and isinstance(new, dict) and depth != 0:
        out = dict(old)
        for key, value in new.items():
            out[key] = deep_merge(old.get(key), value, None if depth is None else depth - 1)
        return out
    return new


def git_commit() -> str:
    """HEAD (``-dirty`` with uncommitted changes to tracked files); ``$LIT_DISTILL_COMMIT`` when set, for runs
    on a copy of the tree without ``.git`` (the GPU machine)."""
    if os.environ.get("LIT_DISTILL_COMMIT"):
        return os.environ["LIT_DISTILL_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LIT_DISTILL_COMMIT", "unknown")


def write_results(name: str, figures: dict, out: str | os.PathLike | None = None, merge: bool = False,
                  merge_depth: int = 1) -> Path:
    """Write ``benchmarks/results/NAME.json`` with command, device, date, commit and ``figures``
    (``merge=True`` merges the figures into those of an existing file of the same benchmark: each top-level
    key is replaced with ``merge_depth=1``; ``merge_depth=2`` merges the dicts one level down too, e.g.
    ``figures["methods"]`` method by method; the run that wrote each top-level key goes under ``provenance``)."""
    path = Path(out or ROOT / "benchmarks" / "results" / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    run = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "device": device_name(),
           "date": utc_now(), "commit": git_commit()}
    record = {"benchmark": name, **run, "figures": figures}
    old = json.loads(path.read_text()) if merge and path.is_file() else {}
    if old.get("benchmark") == name:  # a file of another benchmark is overwritten
        record = merged_record(old, record, merge_depth)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"[{name}] wrote {path}")
    return path


def merged_record(old: dict, new: dict, merge_depth: int = 2) -> dict:
    """The results record ``new`` merged into ``old`` (records of the same benchmark): figures deep-merged down to ``merge_depth``,
    and ``new``'s command / device / date / commit recorded under ``provenance`` for each top-level figure it
    wrote (and, for figures merged entry by entry, e.g. one per method, under ``provenance[key]["entries"]``),
    so a file assembled from several runs says which run measured what. The top-level stamp becomes ``new``'s."""
    run = {key: new[key] for key in ("command", "device", "date", "commit")}
    provenance = old.get("provenance") or {key: {k: old[k] for k in run} for key in old.get("figures", {})}
    for key, value in new["figures"].items():
        stamp = dict(run)
        if merge_depth >= 2 and isinstance(value, dict) and value:  # merged entry by entry: stamp each entry
            stamp["entries"] = {**(provenance.get(key) or {}).get("entries", {}), **{name: run for name in value}}
        provenance[key] = stamp
    return {"benchmark": new["benchmark"], **run,
            "figures": deep_merge(old.get("figures", {}), new["figures"], merge_depth), "provenance": provenance}


def merge_part(path: str | os.PathLike, part: str | os.PathLike, merge_depth: int = 2) -> Path:
    """Merge the results file ``part`` (written by another run, e.g. on the GPU machine) into ``path``
    (:func:`merged_record`; ``path`` is created if it does not exist yet)."""
    path, new = Path(path), json.loads(Path(part).read_text())
    old = json.loads(path.read_text()) if path.is_file() else {"benchmark": new["benchmark"]}
    if old.get("benchmark") != new.get("benchmark"):
        raise ValueError(f"{part} is a {new.get('benchmark')!r} result; {path} is {old.get('benchmark')!r}")
    record = merged_record(old, new, merge_depth)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[{new['benchmark']}] merged {part} into {path}")
    return path


def run_jobs(jobs: list[list[str]], parallel: int, log_dir: str | os.PathLike) -> None:
    """Run each argument list of ``jobs`` as ``python ARGS`` (at most ``parallel`` at once), each with its
    output in ``log_dir/job_K.log``; raise naming the log of the first job that failed. Independent units of
    a benchmark (seeds, systems, tasks) share one GPU this way: the embedded models are far too small to
    fill it alone."""
    import time

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    waiting, running, failed = list(enumerate(jobs)), [], []
    while waiting or running:
        while waiting and len(running) < max(1, parallel):
            k, args = waiting.pop(0)
            log = open(log_dir / f"job_{k}.log", "w")
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            running.append((k, subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env),
                            log))
            print(f"[jobs] start {k}: {' '.join(args)}", flush=True)
        time.sleep(1)
        for entry in list(running):
            k, proc, log = entry
            if proc.poll() is not None:
                running.remove(entry)
                log.close()
                print(f"[jobs] done {k} (exit {proc.returncode})", flush=True)
                if proc.returncode != 0:
                    failed.append(log_dir / f"job_{k}.log")
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) failed; see {', '.join(map(str, failed))}")


def seed_mean(per_seed: dict[str, dict]):
    """The mean over seeds of ``{seed: figures}``, figure by figure: numbers are averaged, dicts recursed into,
    lists of ``[x, y]`` points averaged point by point (the seeds must share the x values); other values are
    taken from the first seed."""
    values = list(per_seed.values())
    first = values[0]
    if isinstance(first, bool) or not isinstance(first, (int, float, dict, list)):
        return first
    if isinstance(first, (int, float)):
        if all(isinstance(v, int) and v == first for v in values):
            return first  # a count every seed shares (e.g. steps) stays an int
        return sum(values) / len(values)
    if isinstance(first, dict):
        return {k: seed_mean({s: v[k] for s, v in per_seed.items()}) for k in first if all(k in v for v in values)}
    if all(isinstance(p, list) and len(p) == 2 for p in first):
        length = min(len(v) for v in values)
        return [[first[i][0], sum(v[i][1] for v in values) / len(values)] for i in range(length)]
    return first












def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list], path: str, xlabel: str, ylabel: str, hline: float | None = None,
                hline_label: str = "max",
                logy: bool = False) -> None:
    """Line plot of ``{label: [[x, y], ...]}`` saved as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for label, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=1, label=hline_label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_bars(systems: dict[str, dict], tasks: list[str], path: str, ylabel: str) -> None:
    """One panel per task, a bar per system (rewards have different scales per task)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.3 * len(tasks), 3.4), dpi=120)
    for ax, task in zip(axes if len(tasks) > 1 else [axes], tasks):
        names = list(systems)
        values = [systems[s][task] for s in names]
        ax.bar(range(len(names)), values, color=["#888"] + ["#4a7"] * (len(names) - 4) + ["#36c", "#c63", "#a5c"][: min(3, len(names) - 1)])
        lo, hi = min(values), max(values)
        ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(task, fontsize=9)
    axes_list = axes if len(tasks) > 1 else [axes]
    axes_list[0].set_ylabel(ylabel, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":  # python benchmarks/common.py merge RESULTS.json PART.json [PART.json ...]
    if len(sys.argv) < 4 or sys.argv[1] != "merge":
        raise SystemExit("usage: python benchmarks/common.py merge RESULTS.json PART.json [PART.json ...]")
    for part in sys.argv[3:]:
        merge_part(sys.argv[2], part)
