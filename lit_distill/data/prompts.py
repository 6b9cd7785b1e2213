"""Prompt sets with task tags: ``read_prompt_file``, ``collate_prompts`` and ``PromptDataModule``.

A row is ``{"prompt": str, "task": str, **extra}``; a batch is ``{"prompt": list[str], "task": list[str],
**extra}`` where numeric extra fields become tensors ``[B]`` and all others stay lists.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lit_distill.data.embedded import PROMPTS_DIR, embedded_prompt_sets, split_indices
from lit_distill.data.loader import ResumableDataLoader
from lit_distill.utils.resume import changed_settings, log_changes

PROMPT_EXTENSIONS = (".txt", ".csv", ".jsonl")


def resolve_prompt_source(source: str) -> Path:
    """``"embedded:NAME"`` -> the shipped ``assets/prompts/NAME.jsonl``; anything else -> ``Path(source)``."""
    if source.startswith("embedded:"):
        name = source.split(":", 1)[1]
        path = PROMPTS_DIR / f"{name}.jsonl"
        if not path.is_file():
            raise ValueError(f"{source!r}: no embedded prompt set named {name!r}; shipped sets: "
                             f"{['embedded:' + n for n in embedded_prompt_sets()]}")
        return path
    return Path(source).expanduser()


def _csv_value(v: str) -> Any:
    """CSV cells are strings: turn "7" into 7 and "0.5" into 0.5, keep other text."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _check_row(row: dict, path: Path, lineno: int, default_task: str | None) -> dict:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{path}:{lineno}: field 'prompt' is missing or empty; every row needs a non-empty "
                         "'prompt' string (fix or delete this row)")
    task = row.get("task")
    if task is None or (isinstance(task, str) and not task.strip()):
        if default_task is None:
            raise ValueError(f"{path}:{lineno}: field 'task' is missing; add a 'task' to every row, or pass "
                             "default_task= (PromptDataModule(default_task=...)) to use one task for all rows")
        task = default_task
    return {**row, "prompt": prompt.strip(), "task": str(task).strip()}


def read_text(path: Path) -> str:
    """The text of a prompt file: UTF-8 (with or without a byte-order mark) or UTF-16 with one. Anything else
    raises a ``ValueError`` naming the file, the line and the fix."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    if b"\0" in data:
        line = data[:data.index(b"\0")].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: the file contains NUL bytes (UTF-16 without a byte-order mark?); save it as "
                         "UTF-8 (or UTF-16 with a BOM)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}; saved as Windows-1252/Latin-1?); "
                         f"save the file as UTF-8, e.g. iconv -f cp1252 -t utf-8 {path.name} > utf8_{path.name}") from e


def text_lines(text: str) -> list[str]:
    """Lines split at ``\n`` only (a ``\r`` before it dropped): ``str.splitlines`` would also split at U+2028,
    U+0085 and other characters that may sit inside a JSON string or a prompt."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def check_extra_fields(rows: Sequence[dict], lines: Sequence[int], path: Path) -> None:
    """An extra field (e.g. ``digit``) given in some rows of a task must be given in every row of that task (a
    reward of that task receives it for the whole batch), with one kind of value (numbers, strings, booleans)
    in all rows. Raises a ``ValueError`` naming the file, line and field."""
    def kind(v: Any) -> str:
        return "a boolean" if isinstance(v, bool) else "a number" if isinstance(v, (int, float)) else \
            "a string" if isinstance(v, str) else "null" if v is None else f"a {type(v).__name__}"

    first: dict[tuple, int] = {}  # (field,) and (field, task) -> index of the first row that gives it
    for i, row in enumerate(rows):
        for field in row:
            if field not in ("prompt", "task"):
                first.setdefault((field,), i)
                first.setdefault((field, row["task"]), i)
    for i, (row, line) in enumerate(zip(rows, lines)):
        for (field, *task), j in first.items():
            if task and task[0] == row["task"] and field not in row:
                raise ValueError(f"{path}:{line}: field {field!r} is missing, but line {lines[j]} gives it for task "
                                 f"{row['task']!r}; give {field!r} in every row of that task (or in none)")
            if not task and field in row and kind(row[field]) != kind(rows[j][field]):
                value = row[field]
                hint = f"; write {value} without quotes" if isinstance(value, str) and _csv_value(value) is not value \
                    else ""
                raise ValueError(f"{path}:{line}: field {field!r} is {kind(value)} ({value!r}) but "
                                 f"{kind(rows[j][field])} at line {lines[j]}; use one kind of value throughout{hint}")


def write_prompt_file(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` (``{"prompt", "task", **extra}``) as a ``.jsonl`` prompt set that ``read_prompt_file``
    reads back; returns the path."""
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_prompt_file(path: str | Path, default_task: str | None = None) -> list[dict]:
    """Read a prompt set; returns its rows ``[{"prompt": str, "task": str, **extra}, ...]`` in file order.

    Formats, chosen by extension:
      ``.txt``: one prompt per line (blank lines and lines starting with ``#`` skipped); every row
      gets ``default_task``. ``.csv``: a header with ``prompt`` and (unless ``default_task``) ``task``;
      other columns are extras, numbers parsed. ``.jsonl``: one JSON object per line.
    ``path`` may also be ``"embedded:NAME"`` for a shipped set (``embedded_prompt_sets()``).
    Text is UTF-8 (or UTF-16 with a byte-order mark); lines end at ``\n`` only. Extra fields must be given in
    every row or none, with one kind of value (``check_extra_fields``).
    Raises ``FileNotFoundError``, or ``ValueError`` naming the file, line and field, for an empty file, text that is
    not UTF-8, a row without ``prompt``, a row without ``task`` when no ``default_task`` is given, an extra field
    missing or of another kind in some rows, or an unknown extension.
    """
    path = resolve_prompt_source(str(path))
    ext = path.suffix.lower()
    if ext not in PROMPT_EXTENSIONS:
        raise ValueError(f"{path}: unknown prompt file extension {ext!r}; use one of {list(PROMPT_EXTENSIONS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    text = read_text(path)
    rows: list[dict] = []
    lines: list[int] = []
    if ext == ".txt":
        if default_task is None:
            raise ValueError(f"{path}:1: field 'task': a .txt prompt file has no task column; pass default_task=")
        for lineno, line in enumerate(text_lines(text), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append(_check_row({"prompt": line}, path, lineno, default_task))
                lines.append(lineno)
    elif ext == ".jsonl":
        for lineno, line in enumerate(text_lines(text), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object like "
                                 '{"prompt": "...", "task": "..."}')
            rows.append(_check_row(row, path, lineno, default_task))
            lines.append(lineno)
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is not None and "prompt" not in reader.fieldnames:
            raise ValueError(f"{path}:1: field 'prompt': the CSV header {reader.fieldnames} has no 'prompt' column")
        for row in reader:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue
            extra = {k: _csv_value(v) for k, v in row.items()
                     if k and k not in ("prompt", "task") and v not in (None, "")}
            clean = {"prompt": row.get("prompt"), "task": row.get("task") or None, **extra}
            rows.append(_check_row(clean, path, reader.line_num, default_task))
            lines.append(reader.line_num)
    if not rows:
        raise ValueError(f"{path}:1: the prompt file is empty (no rows with a 'prompt'); add at least one prompt")
    check_extra_fields(rows, lines, path)
    return rows


def tasks_in(rows: Sequence[dict]) -> list[str]:
    """Sorted distinct ``task`` values of ``rows``."""
    return sorted({r["task"] for r in rows})


def collate_prompts(rows: Sequence[dict]) -> dict[str, Any]:
    """Rows -> batch. ``prompt``/``task`` and non-numeric fields become lists; a field whose values are
    all ints becomes a long tensor ``[B]``, all numbers a float32 tensor, all bools a bool tensor.
    A field missing from some rows is a list with ``None`` there.
    """
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    batch: dict[str, Any] = {}
    for k in keys:
        vals = [r.get(k) for r in rows]
        if k in ("prompt", "task"):
            batch[k] = list(vals)
        elif all(isinstance(v, bool) for v in vals):
            batch[k] = torch.tensor(vals, dtype=torch.bool)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            batch[k] = torch.tensor(vals, dtype=torch.long)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            batch[k] = torch.tensor(vals, dtype=torch.float32)
        else:
            batch[k] = list(vals)
    return batch


class PromptDataset(Dataset):
    """A list of prompt rows, repeated ``repeat`` times."""

    def __init__(self, rows: Sequence[dict], repeat: int = 1):
        self.rows, self.repeat = list(rows), repeat

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def __getitem__(self, i: int) -> dict:
        return self.rows[i % len(self.rows)]


class PromptDataModule(L.LightningDataModule):
    """Prompt batches ``{"prompt": list[str], "task": list[str], **extra}`` for RL and distillation.

    Args:
        train: a ``.txt``/``.csv``/``.jsonl`` prompt file or ``"embedded:NAME"`` (e.g.
            ``"embedded:digits_multitask"``); see ``read_prompt_file``.
        val: a second prompt source for validation; if None, a deterministic ``val_fraction`` of
            ``train`` (stratified by task) is held out (none when ``val_fraction`` is 0).
        batch_size: prompts per batch (per device under DDP).
        tasks: keep only rows whose task is listed; a listed task absent from the file is an error.
        default_task: the task of rows that carry none (required for ``.txt`` files).
        shuffle: shuffle training prompts each epoch (seeded by ``seed``).
        repeat: repeat the training rows this many times per epoch.
    After ``setup()``: ``train_rows``, ``val_rows``, ``train_dataset``, ``val_dataset`` and ``tasks_present``.

    The held-out rows are for evaluation callbacks (``RewardCallback(prompts=dm.val_rows)``); the module has no
    ``val_dataloader``, because no method has a ``validation_step`` for Lightning's validation loop to run
    (``held_out_dataloader`` batches them for code of your own).
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        batch_size: int = 8,
        tasks: list[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        repeat: int = 1,
        val_fraction: float = 0.1,
        default_task: str | None = None,
    ):
        super().__init__()
        if batch_size < 1 or repeat < 1:
            raise ValueError(f"batch_size and repeat: must be >= 1, got {batch_size} and {repeat}")
        self.train, self.val, self.batch_size, self.tasks = train, val, batch_size, list(tasks) if tasks else None
        self.shuffle, self.seed, self.num_workers, self.repeat = shuffle, seed, num_workers, repeat
        self.val_fraction, self.default_task = val_fraction, default_task
        self.train_rows: list[dict] | None = None
        self.val_rows: list[dict] = []
        self.train_dataset: PromptDataset | None = None
        self.val_dataset: PromptDataset | None = None

    def _filter(self, rows: list[dict], source: str) -> list[dict]:
        if self.tasks is None:
            return rows
        missing = [t for t in self.tasks if t not in tasks_in(rows)]
        if missing:
            raise ValueError(f"tasks: {missing} do not occur in {source!r}, whose tasks are {tasks_in(rows)}; "
                             "fix the task names or the prompt file")
        return [r for r in rows if r["task"] in self.tasks]

    def setup(self, stage: str | None = None) -> None:
        """Read, filter and split the prompt rows (idempotent)."""
        if self.train_rows is not None:
            return
        rows = self._filter(read_prompt_file(self.train, self.default_task), self.train)
        if self.val is not None:
            self.train_rows = rows
            val_rows = read_prompt_file(self.val, self.default_task)
            self.val_rows = [r for r in val_rows if self.tasks is None or r["task"] in self.tasks]
        elif self.val_fraction > 0:
            task_ids = [tasks_in(rows).index(r["task"]) for r in rows]
            split = split_indices(len(rows), self.val_fraction, self.seed, labels=task_ids)
            self.train_rows = [rows[i] for i in split.train]
            self.val_rows = [rows[i] for i in split.val]
        else:
            self.train_rows = rows
        self.train_dataset = PromptDataset(self.train_rows, self.repeat)
        self.val_dataset = PromptDataset(self.val_rows)

    @property
    def tasks_present(self) -> list[str]:
        """Sorted tasks of the training rows (after filtering); calls ``setup()`` if needed."""
        self.setup()
        return tasks_in(self.train_rows)

    def settings(self) -> dict[str, Any]:
        """The arguments that decide which prompts come in which batches (compared when a run resumes)."""
        return dict(train=self.train, val=self.val, batch_size=self.batch_size, tasks=self.tasks, shuffle=self.shuffle,
                    seed=self.seed, repeat=self.repeat, val_fraction=self.val_fraction, default_task=self.default_task)

    def state_dict(self) -> dict:
        return {"settings": self.settings()}

    def load_state_dict(self, state: dict) -> None:
        """Log the settings that changed since the checkpoint; they take effect (the loader keeps the position
        in samples, or restarts the epoch when the order changed)."""
        log_changes(changed_settings(state.get("settings", {}), self.settings()), "the prompts (PromptDataModule)")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return ResumableDataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=self.shuffle, seed=self.seed,
                                   num_workers=self.num_workers, collate_fn=collate_prompts)

    def held_out_dataloader(self) -> DataLoader | list:
        """The held-out prompts in file order, or ``[]`` when there are none."""
        self.setup()
        if not len(self.val_dataset):
            return []
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_prompts)
