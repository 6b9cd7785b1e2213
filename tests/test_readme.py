"""Every command of README.md runs as written, at smoke-test size (``LIT_DISTILL_TINY=1``: a tiny base model, a
few steps, small evaluations; nothing else of a config changes, so a failing default still fails).

The commands run in order in one fresh Python process through the console script's entry point
(``lit_distill.cli.main``), in an empty folder where ``configs/`` is the repository's: what one stage writes
(``runs/teacher_*/model``) the next reads. Each must exit 0, say what it produced, and print none of the
third-party messages that ``lit_distill.quiet`` silences.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from lit_distill.data.mnist import CACHE_NAME
from lit_distill.pipeline import TASK_REWARDS
from lit_distill.utils import default_cache_dir

ROOT = Path(__file__).resolve().parents[1]

#: Commands shown in the README that this test does not run, and why.
NOT_RUN = {
    "python3 -m venv": "the install: the test runs inside the installed environment",
    ". .venv/bin/activate": "the install",
    "pip install": "the install",
    "python -m pytest": "the test suite itself",
    "lit-distill fit --config configs/teacher_rl/sd_local.yaml": "needs 2 GPUs and a Stable Diffusion model on disk",
    "lit-distill fit --config configs/opd/sd_local.yaml": "needs 4 GPUs and a Stable Diffusion model on disk",
}
#: Output that no command may print (silenced at its source or filtered by lit_distill.quiet).
NOISE = ["Tip: For seamless cloud", "LeafSpec", "but have no `validation_step`", "module(s) in eval mode",
         "`weights_only` was not set", "Writing model shards", "Loading weights", "args parameter is intended",
         "smaller than the logging interval"]

DRIVER = """
import json, sys, traceback
from lit_distill.cli import main
for argv in json.loads(sys.argv[1]):
    print("@@ " + json.dumps(argv), flush=True)
    sys.argv = ["lit-distill", *argv]  # as the console script sees it
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    print("@@ exit " + str(code), flush=True)
"""


def readme_commands() -> list[str]:
    """The commands of the README's ```bash blocks: one per line (comments dropped), split at ``&&``."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [part.strip() for line in lines if line for part in line.split("&&")]


def test_every_readme_command_is_run_or_skipped_for_a_reason():
    for command in readme_commands():
        assert command.startswith("lit-distill ") or any(command.startswith(p) for p in NOT_RUN), command
    assert all(any(c.startswith(p) for c in readme_commands()) for p in NOT_RUN), "a stale NOT_RUN entry"


def test_readme_commands_run_as_written(tmp_path):
    commands = [c for c in readme_commands() if not any(c.startswith(p) for p in NOT_RUN)]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    mnist = default_cache_dir() / "data" / CACHE_NAME
    if mnist.is_file():  # the MNIST digits, fetched once from PyPI: reuse them rather than fetch them again
        (tmp_path / "cache" / "data").mkdir(parents=True)
        (tmp_path / "cache" / "data" / CACHE_NAME).symlink_to(mnist)
    env = {**os.environ, "LIT_DISTILL_TINY": "1", "LIT_DISTILL_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    argvs = [shlex.split(c)[1:] for c in commands]
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    runs = re.split(r"^@@ (\[.*\])$", result.stdout, flags=re.M)[1:]
    assert len(runs) == 2 * len(commands), output[-3000:]
    for command, (argv, text) in zip(commands, zip(runs[::2], runs[1::2])):
        assert text.rstrip().endswith("@@ exit 0"), f"{command}\n{text[-3000:]}\n{result.stderr[-3000:]}"
        if argv.startswith('["fit"'):
            assert "[lit-distill] fit ended" in text and "exported model:" in text, command
            exported = re.search(r"exported model:\s+(\S+)", text)[1]
            assert (tmp_path / exported / "model_index.json").is_file(), command
    for noise in NOISE:
        assert noise not in output, noise
    # the quickstart: stages named as they start, the table, labelled grids that differ from stage to stage
    quickstart, tasks = runs[runs.index('["quickstart"]') + 1], list(TASK_REWARDS)
    stages = len(tasks) + 4  # base, its evaluation, a teacher per task, OPD, one-step
    assert re.search(rf"^\[1/{stages}\] base model", quickstart, re.M)
    assert f"[3/{stages}] teacher '{tasks[0]}'" in quickstart
    assert "best possible" in quickstart and "opd: teacher gain kept" in quickstart
    order = [quickstart.index(f"  {task} ") for task in tasks]  # the task legend, in the tasks' order
    assert order == sorted(order)
    summary = json.loads((tmp_path / "outputs/quickstart/summary.json").read_text())
    grids = [tmp_path / g for g in summary["grids"]]
    assert {g.parts[-3] for g in grids} == {"base", *(f"teacher_{t}" for t in tasks), "opd", "one_step"}
    assert len({g.read_bytes() for g in grids}) == len(grids)  # no stage re-writes another's grid
    assert summary["seconds"]["total"] > 0 and (tmp_path / "outputs/quickstart/opd/tensorboard").is_dir()
    # one base model, shared by the quickstart and every config naming embedded:base
    bases = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("base_") and p.is_dir()
             and not p.name.endswith(".logs")]
    assert len(bases) == 1, bases


def test_readme_python_block_imports_exist():
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
    compile(block, "README.md", "exec")
    imports = "\n".join(line for line in block.splitlines() if line.startswith(("import ", "from ")))
    exec(imports, {})  # noqa: S102 - the README's own import lines
