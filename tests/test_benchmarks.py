"""The GPU benchmark scripts run end to end on the CPU in their ``--tiny`` mode (tiny models, fp32, gloo), so a
broken script is found here rather than on a lent GPU machine: ``pytest -m slow tests/test_benchmarks.py`` before
a GPU run (they take minutes on 2 cores, so the default suite leaves them out)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, cwd=ROOT, timeout=600)


#: the keys of every method entry of the ``throughput`` results (shared/design/RESULTS.md)
THROUGHPUT_KEYS = {"rollout_images_per_s", "update_images_per_s", "mfu_rollout", "mfu_update", "peak_mem_gib",
                   "peer_images_per_s", "images_per_s", "speedup_vs_peer", "compile_warmup_s"}


@pytest.mark.slow
def test_throughput_tiny_times_ours_and_the_peer_loop(tmp_path):
    out = tmp_path / "throughput.json"
    run("throughput.py", "--tiny", "--model", "unet", "--methods", "teacher_rl", "--fp32-loop", "--out", str(out))
    record = json.loads(out.read_text())
    entry = record["figures"]["methods"]["teacher_rl"]
    assert THROUGHPUT_KEYS <= set(entry)
    assert entry["images_per_s"] > 0 and entry["peer_images_per_s"] > 0 and entry["fp32_loop_images_per_s"] > 0
    assert entry["speedup_vs_peer"] == entry["images_per_s"] / entry["peer_images_per_s"]
    assert entry["compile"] == "off" and entry["compile_warmup_s"] == 0  # CPU: nothing compiles
    assert entry["peer"]["optimizer_steps_per_step"] == 1  # the peers accumulate over every timestep of a batch
    assert entry["rollout_s"] < entry["step_s"] and entry["tflop_per_step"]["update"] > 0
    assert {"command", "device", "date", "commit"} <= set(record)


@pytest.mark.slow
def test_scaling_tiny_runs_ddp_on_one_and_two_processes(tmp_path):
    out = tmp_path / "scaling.json"
    run("scaling.py", "--tiny", "--gpus", "1", "2", "--methods", "teacher_rl", "--strategies", "ddp", "--out", str(out))
    figures = json.loads(out.read_text())["figures"]
    assert [(p["gpus"], "error" in p) for p in figures["points"]] == [(1, False), (2, False)]
    assert set(figures["efficiency"]["teacher_rl/ddp"]) == {"1", "2"}


def test_merge_part_keeps_each_entry_and_says_which_run_measured_it(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import merge_part

    def part(name, command, curves):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"benchmark": "one_step", "command": command, "device": "gpu", "date": "d",
                                    "commit": "c", "figures": {"curves": curves, "teacher_fid": 2.0}}))
        return path

    merged = tmp_path / "one_step.json"
    merge_part(merged, part("a", "run a", {"disback": [[0, 9.0]], "nodistill": [[0, 8.0]]}))
    merge_part(merged, part("b", "run b", {"nodistill": [[0, 7.0]]}))
    record = json.loads(merged.read_text())
    assert record["figures"]["curves"] == {"disback": [[0, 9.0]], "nodistill": [[0, 7.0]]}
    entries = record["provenance"]["curves"]["entries"]
    assert entries["disback"]["command"] == "run a" and entries["nodistill"]["command"] == "run b"
    assert record["provenance"]["teacher_fid"]["command"] == "run b"


def test_compile_warmup_and_time_to_ninety_percent():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fast_rl import parse, seconds_to_fraction, settings_of
    from throughput import compile_warmup_seconds

    # steps of 40 s and 9 s compile, then full speed (1 s, and 1.1 s within the tolerance)
    assert compile_warmup_seconds([40.0, 9.0, 1.1, 1.0, 1.0], 1.0) == 49.0
    assert compile_warmup_seconds([1.0, 1.0], 1.0) == 0.0
    curve = [[0.0, -0.5], [10.0, -0.4], [20.0, -0.2], [30.0, -0.1]]
    assert seconds_to_fraction(curve, -0.5, 0.0, 0.5) == 17.5  # -0.25: three quarters of the way from 10 s to 20 s
    assert seconds_to_fraction(curve, -0.5, 0.0, 0.95) is None
    args = parse(["--cpu"])
    every, fast = settings_of("all_steps", args), settings_of("fast", args)
    assert fast["sampling"]["sde_window"] == {"size": 2, "mode": "random", "range": [0, 5]}
    updates = lambda s, steps: math.ceil(4 * 8 * steps / s["updates"]["minibatch_size"])  # noqa: E731
    assert updates(every, 10) == updates(fast, 2) == 5  # the same optimiser updates per training step
