"""The disk an install takes: the virtual environment of this Python (``du -sh .venv``) and its largest parts.

    python benchmarks/install_size.py       # run with the venv's Python after pip install -e ".[dev]"
"""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

import report  # noqa: E402

#: The parts that make the install large: CUDA libraries, Triton, torch itself.
PARTS = {"nvidia": ("nvidia", "cuda", "cuda_bindings"), "triton": ("triton",), "torch": ("torch",)}


def disk_gib(path: Path) -> float:
    """Disk used by the files under ``path``, in GiB (what ``du -sh`` prints as G)."""
    blocks = sum(os.lstat(os.path.join(root, name)).st_blocks for root, dirs, files in os.walk(path)
                 for name in files + dirs)
    return blocks * 512 / 2**30


def main() -> None:
    if sys.prefix == sys.base_prefix:
        raise SystemExit("run this with the Python of the virtual environment to measure (.venv/bin/python)")
    site = Path(sysconfig.get_paths()["purelib"])
    from importlib.metadata import version

    figures = {"venv_gib": round(disk_gib(Path(sys.prefix)), 2),
               "parts_gib": {name: round(sum(disk_gib(site / d) for d in dirs if (site / d).is_dir()), 2)
                            for name, dirs in PARTS.items()},
               "torch": version("torch"), "python": sys.version.split()[0]}
    write_results("install", figures)
    report.write_all()


if __name__ == "__main__":
    main()
