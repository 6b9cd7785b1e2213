"""Every measured figure of README.md and docs/*.md, written from benchmarks/results/*.json.

    python benchmarks/report.py           # rewrite the marked regions of README.md and docs/*.md, and the plots
    python benchmarks/report.py --check   # change nothing; list the regions that differ (exit 1 if any)

A region is ``<!-- results:KEY -->TEXT<!-- /results -->`` (a block when TEXT starts on a new line, else inline):
only the script writes TEXT, and ``tests/test_docs_results.py`` fails when a region differs from what the results
files give. KEY is one of

- a section of :data:`SECTIONS`: a table, the README's Methods table, a sentence;
- one value, ``FILE:PATH`` or ``FILE:PATH|FORMAT``: ``PATH`` is ``/``-separated keys (list indices may be
  negative) into the ``figures`` of ``benchmarks/results/FILE.json``, ``FORMAT`` a Python format spec (default
  ``.3g``), e.g. ``<!-- results:one_step:curves/disback/-1/1|.2f -->4.48<!-- /results -->``;
- a figure derived from results, ``NAME(ARG,...)`` with ``NAME`` one of :data:`DERIVED`, e.g.
  ``<!-- results:gain_kept(opd,brightness) -->14%<!-- /results -->``.

The benchmark scripts write the results files and then call :func:`write_all`; when results change (a re-run,
a merged part), this one command brings every page up to date. The plots ``docs/*.png`` are rewritten too
(``--check`` does not compare images).
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, plot_bars, plot_curves, _pyplot  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REGION = re.compile(r"<!-- results:(?P<key>[^\n]+?) -->(?P<body>.*?)<!-- /results -->", re.S)
SECTIONS: dict[str, Callable[[], str]] = {}


def pages() -> list[Path]:
    """README.md and docs/*.md: the pages whose regions this script writes."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@functools.lru_cache(maxsize=None)
def record(name: str) -> dict:
    """``benchmarks/results/NAME.json``."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no results file {path.relative_to(ROOT)}: run its benchmark first")
    return json.loads(path.read_text())


def figures(name: str) -> dict:
    return record(name)["figures"]


def section(name: str):
    """Register a function returning the text of region ``name``."""
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        SECTIONS[name] = fn
        return fn
    return register


def value(key: str) -> str:
    """The text of a ``FILE:PATH|FORMAT`` key (see the module docstring)."""
    spec, _, fmt = key.partition("|")
    name, _, path = spec.partition(":")
    node = figures(name)
    for part in path.split("/"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return repr(node) if fmt == "r" else format(node, fmt or ".3g")


def render(key: str) -> str:
    call = re.fullmatch(r"(\w+)\((.*)\)", key)
    if call:
        return DERIVED[call[1]](*[arg.strip() for arg in call[2].split(",") if arg.strip()])
    return SECTIONS[key]() if key in SECTIONS else value(key)


def regenerate(text: str, errors: list[str] | None = None) -> str:
    """``text`` with every region rewritten. A region whose key the results cannot give (a missing file or entry:
    the results changed shape) raises, or, when ``errors`` is a list, keeps its text and is listed there."""
    def fill(match: re.Match) -> str:
        key, body = match["key"], match["body"]
        try:
            new = render(key)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            if errors is None:
                raise
            errors.append(f"{key}: {type(e).__name__}: {e}")
            return match[0]
        return f"<!-- results:{key} -->" + (f"\n{new}\n" if body.startswith("\n") else new) + "<!-- /results -->"
    return REGION.sub(fill, text)


# -- helpers -----------------------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table; ``None`` cells print as an em dash."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("—" if c is None else str(c) for c in row) + " |" for row in rows]
    return lines


def run_stamp(run: dict) -> str:
    """``command`` on device, date, commit: one run's stamp in the docs."""
    return f"`{run['command']}` on **{run['device']}**, {run['date']}, commit `{str(run['commit'])[:12]}`"


def provenance_lines(rec: dict, key: str, names) -> tuple[dict, list[str]]:
    """The run that wrote figure ``key`` of ``rec`` (its provenance, or the record's own stamp) and a line
    for each of the entries ``names`` that another run measured (files assembled with ``common.merge_part``)."""
    stamp = rec.get("provenance", {}).get(key, rec)
    others = {name: run for name, run in stamp.get("entries", {}).items()
              if name in names and run.get("command") != stamp.get("command")}
    return stamp, [f"Row `{name}`: {run_stamp(run)}." for name, run in others.items()]


def stamped_table(name: str, header: list[str], rows: list[list], note: str = "", figure: str | None = None) -> str:
    """A table of results ``name``, stamped with the run that measured it (of ``figures[figure]`` when given,
    plus a line per row, named in column 0, that another run measured)."""
    rec = record(name)
    stamp, others = provenance_lines(rec, figure, [row[0] for row in rows]) if figure else (rec, [])
    lines = [run_stamp(stamp) + (f". {note}" if note else ""), ""] + [line for o in others for line in (o, "")]
    return "\n".join(lines + markdown_table(header, rows))


def device_of(name: str, figure: str | None = None) -> str:
    rec = record(name)
    return (rec.get("provenance", {}).get(figure) or rec)["device"] if figure else rec["device"]


def percent_range(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.0%}" if round(100 * low) == round(100 * high) else f"{low:.0%}-{high:.0%}"


def headroom_gained(task: dict) -> float:
    """Fraction of the reward headroom (max - base) a teacher gained (of its own gain when the max is unknown)."""
    top = task["final"] if task["max"] is None else task["max"]
    return (task["final"] - task["base"]) / max(top - task["base"], 1e-12)


def gain_kept(systems: dict, system: str, task: str) -> float:
    """(system - base) / (teacher - base) on ``task``: how much of the task teacher's gain ``system`` kept."""
    base = systems["base"][task]
    return (systems[system][task] - base) / max(systems[f"teacher/{task}"][task] - base, 1e-12)


# -- figures derived from results, for sentences -------------------------------------------------------------
def _number(spec: str) -> float:
    """A number given as ``FILE:PATH`` (see :func:`value`) or a literal."""
    return float(value(spec + "|r")) if ":" in spec else float(spec)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _ratio(numerator: str, denominator: str) -> str:
    return f"{_number(numerator) / _number(denominator):.1f}x"


def one_step_curve(f: dict, system: str) -> list:
    """The (mean) FID curve of ``system`` in one_step figures ``f``: one of its systems or of its ablations."""
    return f["curves"][system] if system in f["curves"] else f["ablations"][system]["curve"]


def _reach(name: str, system: str, reference: str) -> str:
    """Whether, and at which update, ``system``'s FID curve reaches ``reference``'s final value (either may be
    an ablation of results ``name``)."""
    f = figures(name)
    curve, final = one_step_curve(f, system), one_step_curve(f, reference)[-1][1]
    update = next((u for u, fid in curve if fid <= final), None)
    label = reference.replace('_', '-').title() if reference in f["curves"] else f"`{reference}`"
    what = f"{label}'s final {final:.3g}"
    if update is None:
        return f"never reaches {what}"
    return f"reaches {what} at update {update} of {curve[-1][0]}"


def _speedups(key: str, name: str = "throughput", field: str = "speedup_vs_peer") -> str:
    """The range of ``field`` (default: the speed-up over the peer loop) over the methods of ``figures[key]`` of
    results ``name`` (a throughput file)."""
    values = [m[field] for m in figures(name)[key].values() if m.get(field)]
    return f"{min(values):.1f}-{max(values):.1f}x"


def _ablation_kept(name: str, task: str) -> str:
    """The teacher gain an OPD ablation of ``opd_vs_rl`` kept on ``task``."""
    f = figures("opd_vs_rl")
    return f"{gain_kept({**f['systems'], name: f['ablations'][name]['rewards']}, name, task):.0%}"


def _least_kept_per_seed(system: str) -> str:
    """The smallest teacher gain ``system`` kept on any task in any seed of ``opd_vs_rl``."""
    f = figures("opd_vs_rl")
    return f"{min(gain_kept(f['per_seed'][str(k)], system, t) for k in f['seeds'] for t in f['tasks']):.0%}"


def _value_range(spec: str, fmt: str = ".2f") -> str:
    """``low-high`` of the numbers in the dict or list at ``FILE:PATH``."""
    name, _, path = spec.partition(":")
    node = figures(name)
    for part in path.split("/"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    values = list(node.values()) if isinstance(node, dict) else list(node)
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


DERIVED: dict[str, Callable[..., str]] = {
    "gain_kept": lambda system, task: f"{gain_kept(figures('opd_vs_rl')['systems'], system, task):.0%}",
    "ablation_kept": _ablation_kept,
    "least_kept_per_seed": _least_kept_per_seed,
    "headroom": lambda task: f"{headroom_gained(figures('teacher_rl')['tasks'][task]):.0%}",
    "range": _value_range,
    "seeds": lambda name: str(len(figures(name)["seeds"])),
    "mean_reward": lambda system: f"{_mean(figures('opd_vs_rl')['systems'][system].values()):.3f}",
    "headroom_min": lambda: f"{min(headroom_gained(t) for t in figures('teacher_rl')['tasks'].values()):.0%}",
    "ratio": _ratio,
    "reach": _reach,
    "speedups": _speedups,
    "ddp_efficiency": lambda: f"{figures('throughput')['ddp_scaling']['2'] / (2 * figures('throughput')['ddp_scaling']['1']):.0%}",
}


# -- README ------------------------------------------------------------------------------------------------
@section("methods")
def methods_table() -> str:
    """The README's Methods table: one measured sentence per method, with the device it was measured on."""
    pre, rl, opd, one = figures("pretrain_digits"), figures("teacher_rl"), figures("opd_vs_rl"), figures("one_step")
    tasks = list(rl["tasks"])
    curves, updates = one["curves"], one["generator_updates"]
    kept = [gain_kept(opd["systems"], "opd", t) for t in opd["tasks"]]
    mean = {s: sum(r.values()) / len(r) for s, r in opd["systems"].items()}
    better = "above" if mean["opd"] > mean["multi_reward_rl"] else "below"
    rows = [
        ["base model (flow matching)", "`DiffusionPretrain`", "Lipman et al. 2023; Liu et al. 2023",
         f"{pre['sample_accuracy']:.1%} of class-prompted samples recognised after {pre['steps']} steps, "
         f"{pre['train_seconds']:.0f} s (`benchmarks/pretrain_digits.py`)", device_of("pretrain_digits")],
        ["GRPO / DDPO reward fine-tuning", "`TeacherRL`", "Black et al. 2023 (DDPO); Liu et al. 2025 (Flow-GRPO)",
         f"{percent_range([headroom_gained(rl['tasks'][t]) for t in tasks])} of the reward headroom on each of "
         f"{len(tasks)} tasks in {rl['tasks'][tasks[0]]['steps']:.0f} steps (`benchmarks/teacher_rl.py`)",
         device_of("teacher_rl")],
        ["on-policy multi-teacher distillation", "`OPDStudent`", "DiffusionOPD",
         f"keeps {' / '.join(f'{k:.0%}' for k in kept)} of the {' / '.join(opd['tasks'])} teachers' gains; mean "
         f"reward {mean['opd']:.3f}, {better} the multi-reward RL baseline's {mean['multi_reward_rl']:.3f} "
         "(`benchmarks/opd_vs_rl.py`)", device_of("opd_vs_rl")],
        ["distribution backtracking", "`DisBackStudent`", "Zhang et al. 2024, arXiv 2408.15991",
         f"fid_classifier {curves['disback'][0][1]:.0f} -> {curves['disback'][-1][1]:.2f} in {updates} updates; it "
         f"{_reach('one_step', 'disback', 'diff_instruct')} (`benchmarks/one_step.py`)", device_of("one_step", "curves")],
        ["one-step without distillation", "`NoDistillOneStep`", "arXiv 2502.08005",
         f"teacher init {curves['nodistill_teacher_init'][0][1]:.0f} -> {curves['nodistill_teacher_init'][-1][1]:.2f}, "
         f"random init {curves['nodistill_random_init'][0][1]:.0f} -> {curves['nodistill_random_init'][-1][1]:.0f} "
         f"in {updates} updates (teacher: {one['teacher_fid']:.2f}; `benchmarks/one_step.py`)",
         device_of("one_step", "curves")],
    ]
    return "\n".join(markdown_table(["method", "module", "paper", "what we measured (embedded digits)", "device"],
                                    rows))


@section("quickstart_time")
def quickstart_time() -> str:
    """How long the quickstart took from an empty cache, and how much of that was the base model."""
    rec = record("quickstart")
    f = rec["figures"]
    s, load = f["seconds"], f["load_average"]["before"][0]
    shared = (f" (a shared machine: load average {load:.1f} at the start; the run itself used "
              f"{f['cpu_seconds'] / 60:.0f} CPU-minutes)" if load > 1 else "")
    return (f"took {s['total'] / 60:.1f} minutes on {rec['device']} from an empty cache, {s['base'] / 60:.1f} of "
            f"them for the base model, which later runs reuse{shared}")


@section("ddp_scaling")
def ddp_scaling() -> str:
    f = figures("throughput")
    ips = f["ddp_scaling"]
    return (f"went from {ips['1']:.1f} to {ips['2']:.1f} images/s on 1 -> 2 GPUs ({device_of('throughput', 'ddp_scaling')}) "
            f"under DDP, {ips['2'] / (2 * ips['1']):.0%} efficiency")


# -- docs/benchmarks.md tables -------------------------------------------------------------------------------
@section("teacher_rl")
def teacher_rl_table() -> str:
    f = figures("teacher_rl")
    seeds = f.get("seeds", [0])
    rows = []
    for t, r in f["tasks"].items():
        per = [headroom_gained(f["per_seed"][str(s)][t]) for s in seeds] if "per_seed" in f else []
        rows.append([t, f"{r['base']:.3f}", f"{r['final']:.3f}", f"{r['max']:.3f}" if r["max"] is not None else "-",
                     f"{headroom_gained(r):.0%}" + (f" ({', '.join(f'{v:.0%}' for v in per)})" if per else ""),
                     r["steps"], f"{r['wall_seconds']:.0f}", ", ".join(f"{k} {v:.3f}" for k, v in r["others"].items()),
                     ", ".join(f"{k} {v:.3f}" for k, v in r.get("others_base", {}).items())])
    return stamped_table("teacher_rl", ["task", "base", "final", "max", "headroom gained (per seed)", "steps", "seconds",
                                        "other tasks (teacher)", "other tasks (base)"], rows,
                         note=f"Mean over seeds {seeds}. Rewards on held-out prompts "
                              f"({f.get('eval_samples_per_prompt', 2)} samples each, fixed seeds, 20-step ODE "
                              "sampler). A teacher is trained on its task's prompts only.")


@section("opd_vs_rl")
def opd_vs_rl_table() -> str:
    f = figures("opd_vs_rl")
    tasks, systems, seeds = f["tasks"], f["systems"], f.get("seeds", [0])
    students = [s for s in systems if s != "base" and not s.startswith("teacher/")]
    rows = []
    for s in systems:
        row = [s] + [f"{systems[s][t]:.3f}" for t in tasks] + [f"{_mean(systems[s][t] for t in tasks):.3f}"]
        if s in students:
            per = ["/".join(f"{gain_kept(f['per_seed'][str(k)], s, t):.0%}" for k in seeds) for t in tasks] \
                if "per_seed" in f else []
            row.append(", ".join(f"{gain_kept(systems, s, t):.0%}" for t in tasks)
                       + (f" (per seed: {'; '.join(per)})" if per else ""))
        else:
            row.append("")
        rows.append(row)
    for name, ablation in f.get("ablations", {}).items():
        r = ablation["rewards"]
        rows.append([f"opd [{name}: {json.dumps(ablation['settings'])}]"] + [f"{r[t]:.3f}" for t in tasks]
                    + [f"{_mean(r[t] for t in tasks):.3f}"]
                    + [", ".join(f"{gain_kept({**systems, name: r}, name, t):.0%}" for t in tasks)])
    return stamped_table("opd_vs_rl", ["system", *tasks, "mean", "teacher gain kept"], rows,
                         note=f"Mean over seeds {seeds}; {f['student_updates']} optimiser steps per student; rewards "
                              f"on held-out prompts ({f.get('eval_samples_per_prompt', 2)} samples each). OPD settings: "
                              f"`{json.dumps(f.get('opd_settings', {}))}`. " + f.get("note", ""))


def reach_fraction(curve: list, target: float) -> float | None:
    """The fraction of ``curve``'s updates after which its FID first is <= ``target`` (None: never)."""
    return next((x / curve[-1][0] for x, y in curve if y <= target), None)


def one_step_table(name: str = "one_step") -> str:
    """FID of every system and ablation of one_step results ``name``: start, half-way, final (mean and per seed)."""
    f = figures(name)
    curves, seconds, seeds = f["curves"], f["wall_seconds"], f.get("seeds", [0])
    per_seed = f.get("curves_per_seed", {})
    rows = []

    def row(label: str, c: list, seed_curves: dict, key: str) -> list:
        finals = [seed_curves[str(k)][-1][1] for k in seeds if str(k) in seed_curves]
        return [label, f"{c[0][1]:.2f}", f"{c[len(c) // 2][1]:.2f}", c[-1][0], f"{c[-1][1]:.2f}",
                ", ".join(f"{v:.2f}" for v in finals), seconds.get(key, "")]

    for system, c in curves.items():
        rows.append(row(system, c, {k: v[system] for k, v in per_seed.items() if system in v}, system))
    for ablation, run in f.get("ablations", {}).items():
        rows.append(row(f"{run['system']} [{ablation}: {json.dumps(run['settings'])}]", run["curve"],
                        run.get("curves_per_seed", {}), ablation))
    rows.append([f"teacher, {f['teacher_steps']} ODE steps", "", "", "", f"{f['teacher_fid']:.2f}", "", ""])
    if "real_floor" in f:
        rows.append(["real floor (held-out real images)", "", "", "", f"{f['real_floor']:.2f}", "", ""])
    note = (f"Mean over seeds {seeds}; {f['num_samples']} samples per FID. " + f.get("note", "")
            + " Rows with [brackets] are ablations.")
    if "disback" in curves and "diff_instruct" in curves:
        reach = reach_fraction(curves["disback"], curves["diff_instruct"][-1][1])
        note += (" DisBack never reaches Diff-Instruct's final FID within its generator updates." if reach is None
                 else f" DisBack reaches Diff-Instruct's final FID after {reach:.0%} of its generator updates.")
    return stamped_table(name, ["system", "fid at 0", "fid at half", "updates", "final fid",
                                "final fid per seed", "seconds"], rows, note=note, figure="curves")


section("one_step")(one_step_table)
section("one_step_cpu")(lambda: one_step_table("one_step_cpu"))


@section("pretrain_digits")
def pretrain_digits_table() -> str:
    f = figures("pretrain_digits")
    return stamped_table("pretrain_digits", ["steps", "train seconds", "classifier held-out accuracy",
                                             "sample accuracy", "samples"],
                         [[f["steps"], f["train_seconds"], f"{f['classifier_heldout_accuracy']:.3f}",
                           f"{f['sample_accuracy']:.3f}", f["samples"]]],
                         note=f"Grid: `{f['grid']}` (a row per digit, {f['sampling_steps']} ODE steps).")


@section("pretrain_styles")
def pretrain_styles_table() -> str:
    f = figures("pretrain_digits")
    if "attribute_control" not in f:
        return ("Not measured yet: `benchmarks/results/pretrain_digits.json` predates the style words "
                "(`python benchmarks/pretrain_digits.py` measures them).")
    rows = [[name, f"{c['high_word']} / {c['low_word']}", f"{c['generated_high']:.3f} / {c['generated_low']:.3f}",
             f"{c['real_high']:.3f} / {c['real_low']:.3f}", f"{c['gap_fraction']:.2f}",
             f"{f['velocity_ratio'][c['high_word']]:.2f} / {f['velocity_ratio'][c['low_word']]:.2f}"]
            for name, c in f["attribute_control"].items()]
    return stamped_table("pretrain_digits", ["attribute", "words", "samples (high / low)", "real images (high / low)",
                                             "gap fraction", "velocity ratio (high / low)"], rows,
                         note=f"Grid: `{f['style_grid']}` (a row per style word, a column per digit). Gap fraction: "
                              "the samples' gap between the two words over the real images' gap. Velocity ratio: how "
                              "far a style word moves the velocity, relative to changing the digit word.")


@section("opd_task_confusion")
def opd_task_confusion_table() -> str:
    f = figures("opd_task_confusion")
    rows = [[name, task, f"`{e['example_prompts'][task]}`", round(e["base"][task], 3),
             round(e[f"teacher/{task}"][task], 3), round(e["opd"][task], 3), f"{kept:.0%}"]
            for name, e in f["prompt_sets"].items() for task, kept in e["kept"].items()]
    return stamped_table("opd_task_confusion", ["prompt set", "task", "example prompt", "base", "teacher", "OPD",
                                                "gain kept"], rows,
                         note=f"{f['steps']} steps per teacher and per student. {f['note']}.")


@section("quickstart")
def quickstart_table() -> str:
    f = figures("quickstart")
    rows = [[stage, f"{s:.0f}"] for stage, s in f["seconds"].items()]
    load = f["load_average"]
    return stamped_table("quickstart", ["stage", "wall seconds"], rows,
                         note=f"`lit-distill quickstart` at its default sizes, from an empty cache: "
                              f"{f['cpu_seconds'] / 60:.0f} CPU-minutes, torch threads: {f['threads']}; load average "
                              f"{load['before'][0]:.1f} at the start, {load['after'][0]:.1f} at the end.")


@section("throughput")
def throughput_section() -> str:
    """A table per model (and per ``--variant``), an extra row per method measured with ``--fp32-loop``, the DDP
    scaling."""
    doc = record("throughput")
    f = doc["figures"]
    pct = lambda v: None if v is None else f"{100 * v:.0f}%"  # noqa: E731
    num = lambda v, d=1: None if v is None else f"{v:.{d}f}"  # noqa: E731
    peaks = sorted({round(m["peak_tflops"]) for key in f if key.startswith("methods")
                    for m in (f.get(key) or {}).values() if "peak_tflops" in m} or {round(f.get("peak_tflops", 0))})
    peak_text = f"{peaks[0]}" if len(peaks) == 1 else f"{peaks[0]}-{peaks[-1]}"
    lines = [f"Measured by `benchmarks/throughput.py` (results: `benchmarks/results/throughput.json`; the runs "
             "that wrote each part are listed under `provenance` there). Random-weight denoisers at real size, text "
             "encoders stubbed, one training step = rollout + update, with the method's default settings for a CUDA "
             "run of the version measured (the `compile` column; a variant names what it changed); *vs peer* is the "
             "ratio to the peers' own loop (ddpo-pytorch / Flow-GRPO style for TeacherRL and OPD, a plain bf16 loop "
             "for the others) measured in the same run on the same model and workload (the script's docstring has "
             "both). MFU is relative to the bf16 matmul peak measured in the same run as each row: "
             f"**{peak_text} TFLOP/s**.", ""]
    header = ["method", "images/s", "rollout img/s", "update img/s", "MFU rollout", "MFU update", "peak GiB",
              "peer img/s", "peer GiB", "vs peer", "compile", "warm-up s", "grad. ckpt"]
    for key in sorted((k for k in f if k.startswith("methods")), key=lambda k: (k.startswith("methods_sd3"), len(k))):
        label_key = "model_sd3" if key.startswith("methods_sd3") else "model"
        methods = f.get(key) or {}
        if not methods:
            continue
        prov, others = provenance_lines(doc, key, methods)
        variant = key.removeprefix("methods_sd3").removeprefix("methods").lstrip("_")
        lines += [f"**{f.get(label_key, key)}**{f' — variant `{variant}`' if variant else ''} — {run_stamp(prov)}", ""]
        lines += [line for o in others for line in (o, "")]
        rows = []
        for name, m in methods.items():
            if "error" in m:
                rows.append([name, f"error: {m['error'][:60]}"] + [None] * (len(header) - 2))
                continue
            speedup, compiled = m.get("speedup_vs_peer"), m.get("compile")
            if isinstance(compiled, bool):  # results of earlier versions: compile=True was the whole network
                compiled = "full" if compiled else "off"
            rows.append([name, num(m["images_per_s"]), num(m["rollout_images_per_s"]), num(m["update_images_per_s"]),
                         pct(m["mfu_rollout"]), pct(m["mfu_update"]), num(m["peak_mem_gib"]),
                         num(m.get("peer_images_per_s"), 2), num(m.get("peer_peak_mem_gib")),
                         None if speedup is None else f"{speedup:.2f}x", compiled,
                         num(m.get("compile_warmup_s"), 0), "yes" if m.get("gradient_checkpointing") else "no"])
            fp32 = m.get("fp32_loop_images_per_s") or m.get("naive_images_per_s")  # (earlier versions: "naive")
            if fp32:
                memory = (m.get("fp32_loop") or m.get("naive") or {}).get("peak_mem_gib")
                rows.append([f"{name}: fp32 loop (extra row, not a peer)", num(fp32, 2)] + [None] * 4
                            + [num(memory)] + [None] * 6)
        lines += markdown_table(header, rows) + [""]
    if f.get("ddp_scaling"):
        d = f.get("ddp_details", {})
        prov = doc.get("provenance", {}).get("ddp_scaling", doc)
        lines += [f"**DDP scaling** of `{f.get('ddp_method')}` on the {d.get('model', 'UNet')}, "
                  f"{d.get('per_gpu_images_per_step')} rollouts per GPU — `{prov.get('command', '')}` on "
                  f"{prov.get('device', '')}, {prov.get('date', '')}", ""]
        lines += markdown_table(["GPUs", "images/s", "scaling efficiency"],
                                [[g, num(v), pct(v / (int(g) * f["ddp_scaling"]["1"]))] for g, v in f["ddp_scaling"].items()])
    return "\n".join(lines).strip()


@section("fast_rl")
def fast_rl_table() -> str:
    """TeacherRL on every SDE step against the window of SDE steps: held-out reward against training seconds."""
    if not (RESULTS / "fast_rl.json").is_file():
        return ("Not measured on a GPU yet: `python benchmarks/fast_rl.py --seeds 0 1` (docs/speed.md) writes "
                "`benchmarks/results/fast_rl.json`. The CPU variant (`--cpu`: one seed, a shared 2-core machine) is in "
                "`benchmarks/results/fast_rl_cpu.json`.")
    f = figures("fast_rl")
    fmt = lambda v: "never" if v is None else f"{v:.1f}"  # noqa: E731
    rows = [[name, json.dumps(r["settings"]["sampling"].get("sde_window")) if r["settings"]["sampling"].get("sde_window")
             else "every step", r["settings"]["updates"]["minibatch_size"], f"{r['images_per_s']:.1f}",
             f"{r['base']:.3f}", f"{r['curve'][-1][1]:.3f}", f"{r['max']:.3f}", fmt(f["seconds_to_90"][name])]
            for name, r in f["runs"].items()]
    speedup = f.get("speedup_to_90")
    return stamped_table("fast_rl", ["setting", "SDE steps", "pairs per update", "images/s", "base", "final", "max",
                                     "seconds to 90%"], rows,
                         note=f"Task `{f['task']}`, seeds {f['seeds']}, {f['budget_seconds']:.0f} s of training per "
                              "run (evaluations left out); plot `docs/fast_rl.png`. Time to 90% of the headroom, every "
                              "step over the window: "
                              + ("not reached by both" if speedup is None else f"{speedup:.2f}x") + ".")


@section("scaling")
def scaling_table() -> str:
    if not (RESULTS / "scaling.json").is_file():
        return "Not run yet: no results file `benchmarks/results/scaling.json`."
    f = figures("scaling")
    rows = []
    for p in f["points"]:
        eff = f["efficiency"].get(f"{p['method']}/{p['strategy']}", {}).get(str(p["gpus"]))
        rows.append([p["method"], p["strategy"], p["gpus"], "error" if "error" in p else f"{p['images_per_s']:.2f}",
                     None if eff is None else f"{100 * eff:.0f}%",
                     None if p.get("peak_mem_gib") is None else f"{p['peak_mem_gib']:.1f}"])
    return stamped_table("scaling", ["method", "strategy", "GPUs", "images/s", "efficiency", "peak GiB (rank 0)"],
                         rows, note=f"{f['model']}; plot: `docs/scaling.png`.")


# -- plots ----------------------------------------------------------------------------------------------------
def write_plots() -> list[Path]:
    """The plots of docs/ (PNG), from the same results files."""
    written = []
    for task, r in figures("teacher_rl")["tasks"].items():
        path = ROOT / "docs" / f"teacher_rl_{task}.png"
        plot_curves({task: r["curve"]}, str(path), xlabel="optimiser step",
                    ylabel=f"{task} reward (held-out prompts)", hline=r["max"])
        written.append(path)
    f = figures("opd_vs_rl")
    written.append(ROOT / "docs" / "opd_vs_rl.png")
    plot_bars(f["systems"], f["tasks"], str(written[-1]), ylabel="reward on held-out prompts")
    f = figures("one_step")
    written.append(ROOT / "docs" / "one_step_fid.png")
    plot_curves(f["curves"], str(written[-1]), xlabel="generator updates", ylabel="fid_classifier (log)",
                hline=f["teacher_fid"], hline_label=f"teacher ({f['teacher_steps']} steps)", logy=True)
    if (RESULTS / "fast_rl.json").is_file():
        f = figures("fast_rl")
        written.append(ROOT / "docs" / "fast_rl.png")
        plot_curves({name: r["curve"] for name, r in f["runs"].items()}, str(written[-1]), xlabel="training seconds",
                    ylabel=f"{f['task']} reward (held-out prompts)", hline=f["runs"]["all_steps"]["max"])
    if (RESULTS / "scaling.json").is_file():
        f = figures("scaling")
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        for key, effs in f["efficiency"].items():
            xs = sorted(int(n) for n in effs)
            ax.plot(xs, [effs[str(n)] for n in xs], marker="o", label=key)
        ax.set_xlabel("GPUs"), ax.set_ylabel("scaling efficiency"), ax.set_ylim(0, 1.1), ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(ROOT / "docs" / "scaling.png")
        fig.savefig(written[-1])
        plt.close(fig)
    return written


# -- entry points ---------------------------------------------------------------------------------------------
def stale_regions() -> list[str]:
    """``"page: KEY"`` of every region whose text differs from what the results give, or that they cannot give."""
    stale = []
    for page in pages():
        for match in REGION.finditer(page.read_text()):
            errors: list[str] = []
            if regenerate(match[0], errors) != match[0] or errors:
                stale.append(f"{page.relative_to(ROOT)}: {errors[0] if errors else match['key']}")
    return stale


def write_all(plots: bool = True) -> list[str]:
    """Rewrite every region of README.md and docs/*.md (and the plots) and say what was written; returns the
    regions the results could not give (their text is kept), each ``"page: KEY: why"``."""
    record.cache_clear()
    failed = []
    for page in pages():
        text, errors = page.read_text(), []
        new = regenerate(text, errors)
        failed += [f"{page.relative_to(ROOT)}: {e}" for e in errors]
        if new != text:
            page.write_text(new)
            print(f"[report] wrote {page.relative_to(ROOT)}")
    for path in write_plots() if plots else []:
        print(f"[report] wrote {path.relative_to(ROOT)}")
    for line in failed:
        print(f"[report] NOT written (update the region's key or re-run its benchmark): {line}")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a region is out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_regions()
        print("\n".join(f"out of date: {s}" for s in stale) or "every region matches benchmarks/results/")
        return 1 if stale else 0
    return 1 if write_all() else 0


if __name__ == "__main__":
    raise SystemExit(main())
