"""How long ``lit-distill quickstart`` takes at its default sizes, from an empty cache (the base model trained
too); the README quotes its time from here. Besides the wall time per stage it records the process's CPU time
and the load average before and after, since on a shared machine the wall time says as much about the others.

    python benchmarks/quickstart.py            # on the CPU, as the README describes
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

import report  # noqa: E402

from lit_distill.pipeline import QuickstartConfig, quickstart  # noqa: E402
from lit_distill.quiet import quiet_third_party  # noqa: E402

DEFAULT_OUT = "benchmarks/results/quickstart.json"


def cpu_seconds() -> float:
    """User + system CPU time of this process (and its children) so far."""
    return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    quiet_third_party()  # as lit-distill quickstart does
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:  # an empty cache: the base model and classifier are trained
        # the outputs go where `lit-distill quickstart` puts them (python3 ../shared/tools/claims.py quickstart reads
        # outputs/quickstart/summary.json)
        summary = quickstart(QuickstartConfig(cache_dir=f"{work}/cache"))
    figures = {"seconds": summary["seconds"], "rewards": summary["rewards"], "one_step": summary["one_step"]["fid_classifier"],
               "config": {k: v for k, v in summary["config"].items() if k not in ("out_dir", "cache_dir")},
               "base_recipe": summary["base_recipe"], "cpu_seconds": round(cpu_seconds(), 1),
               "threads": torch.get_num_threads(),
               "load_average": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in os.getloadavg()]}}
    write_results("quickstart", figures, args.out)
    if args.out == DEFAULT_OUT:
        report.write_all()


if __name__ == "__main__":
    main()
