"""The GPU benchmark scripts run end to end on the CPU in their ``--tiny`` mode (tiny models, fp32, gloo), so a
broken script is found here rather than on a lent GPU machine: ``pytest -m slow tests/test_benchmarks.py`` before
a GPU run (they take minutes on 2 cores, so the default suite leaves them out)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_throughput_tiny_times_ours_and_the_naive_loop(tmp_path):
    out = tmp_path / "throughput.json"
    run("throughput.py", "--tiny", "--model", "unet", "--methods", "teacher_rl", "--out", str(out))
    record = json.loads(out.read_text())
    entry = record["figures"]["methods"]["teacher_rl"]
    assert entry["images_per_s"] > 0 and entry["naive_images_per_s"] > 0
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
