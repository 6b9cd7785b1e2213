"""Checkpoints survive a full disk, a SIGKILL in the middle of a save and a SIGTERM (pre-emption): the previous
``last.ckpt`` stays loadable, a pre-empted run saves and exits with the requeue code, and ``--ckpt_path last``
continues exactly (the real CLI, in subprocesses)."""
import errno
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_distill.callbacks import DurableCheckpoint
from lit_distill.data import PromptDataModule
from lit_distill.methods import DisBackStudent, TeacherRL
from lit_distill.utils.checkpoint_files import (SIDE_FILE, CheckpointWriteError, atomic_save, read_checkpoint,
                                                temporary_files_of)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32}


def tiny_rl():
    return TeacherRL("embedded", "brightness", {**TINY, "seed": 0},
                     sampling={"num_steps": 4, "rollouts_per_prompt": 2, "eval_steps": 4},
                     updates={"minibatch_size": 16}, optim={"lr": 1e-3})


def fit(module, max_steps, callbacks=(), ckpt_path=None):
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
    trainer.fit(module, PromptDataModule("embedded:digits_brightness", batch_size=2, repeat=50), ckpt_path=ckpt_path)
    return trainer


def test_atomic_save_that_fails_halfway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_save({"step": 1, "w": torch.ones(1000)}, target)
    real_fdopen = os.fdopen

    class HalfFull:  # a disk that fills after 2 kB: the write fails halfway with ENOSPC
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 2048:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfFull(real_fdopen(fd, mode)))
    with pytest.raises(CheckpointWriteError, match=r"writing .*last\.ckpt failed \(No space left on device\); the "
                                                   r"previous last\.ckpt, if any, is intact.*--ckpt_path last"):
        atomic_save({"step": 2, "w": torch.zeros(1000)}, target)
    monkeypatch.undo()
    assert read_checkpoint(target)["step"] == 1
    assert not temporary_files_of(target) and os.listdir(tmp_path) == ["last.ckpt"]


class FillDiskAfter(L.Callback):
    """After the first checkpoint, limit file sizes to half of it (RLIMIT_FSIZE): the kernel fails the next save's
    writes halfway with EFBIG, as a full disk fails them with ENOSPC."""

    def __init__(self, path):
        self.path, self.limited = path, False

    def on_train_batch_end(self, trainer, *args):
        if not self.limited and self.path.is_file():
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.path.stat().st_size // 2, resource.RLIM_INFINITY))
            self.limited = True


def test_a_disk_that_fills_during_a_save_stops_the_run_and_last_ckpt_still_resumes(tmp_path):
    last = tmp_path / "ckpts" / "last.ckpt"
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal that would kill us
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        with pytest.raises(CheckpointWriteError, match=r"last\.ckpt failed \(File too large\)"):
            fit(tiny_rl(), 10, [DurableCheckpoint(tmp_path / "ckpts", every_n_train_steps=1), FillDiskAfter(last)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert read_checkpoint(last)["global_step"] == 1 and not temporary_files_of(last)
    trainer = fit(tiny_rl(), 3, ckpt_path=last)
    assert trainer.global_step == 3


KILLED_SAVE = textwrap.dedent('''
    import sys, time, torch, lightning as L
    from lit_distill.callbacks import DurableCheckpoint
    from lit_distill.data import PromptDataModule
    from lit_distill.methods import TeacherRL
    import lit_distill.utils.checkpoint_files as files

    real_save, saves = torch.save, []
    def save_then_hang_halfway(obj, f):  # the third checkpoint: half of it written, then SIGKILL
        saves.append(1)
        if len(saves) == 3:
            f.write(b"PK" + b"\\0" * 4096)
            f.flush()
            open(sys.argv[2], "w").close()
            time.sleep(600)
        real_save(obj, f)
    files.torch.save = save_then_hang_halfway
    torch.set_num_threads(1)
    module = TeacherRL("embedded", "brightness", {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32,
                       "seed": 0}, sampling={"num_steps": 4, "rollouts_per_prompt": 2, "eval_steps": 4},
                       updates={"minibatch_size": 16}, optim={"lr": 1e-3})
    L.Trainer(max_steps=100, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              callbacks=[DurableCheckpoint(sys.argv[1], every_n_train_steps=1)]).fit(
        module, PromptDataModule("embedded:digits_brightness", batch_size=2, repeat=50))
''')


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_last_ckpt_loadable(tmp_path):
    script, ckpts, hanging = tmp_path / "train.py", tmp_path / "ckpts", tmp_path / "hanging"
    script.write_text(KILLED_SAVE)
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, str(script), str(ckpts), str(hanging)], stdout=subprocess.DEVNULL,
                            stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 300
        while not hanging.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert hanging.exists(), (tmp_path / "stderr.txt").read_text()[-2000:]
    finally:
        proc.kill()
        proc.wait()
        log.close()
    last = ckpts / "last.ckpt"
    assert len(temporary_files_of(last)) == 1  # the half-written file never took last.ckpt's name
    assert read_checkpoint(last)["global_step"] == 2
    trainer = fit(tiny_rl(), 4, [DurableCheckpoint(ckpts, every_n_train_steps=1)], ckpt_path=last)
    assert trainer.global_step == 4 and not temporary_files_of(last)
    assert read_checkpoint(last)["global_step"] == 4


def test_disback_path_is_kept_in_side_files_written_once(tmp_path):
    from lit_distill.data import ImageDataModule

    def fit_disback(max_steps, ckpt_path=None):
        module = DisBackStudent("embedded", TINY, stages={"num_checkpoints": 3, "degradation_interval": 1,
                                                          "max_recording_updates": 3, "iterations_per_stage": 1},
                                optim={"lr": 1e-3})
        L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=0, callbacks=[DurableCheckpoint(tmp_path, every_n_train_steps=1)]).fit(
            module, ImageDataModule("embedded:digits", resolution=8, batch_size=8, val_fraction=0.0),
            ckpt_path=ckpt_path)
        return module

    fit_disback(3)  # records candidates after fake-score updates 1, 2, 3: the path c_1..c_3; then targets c_2
    side_files = sorted(tmp_path.glob("disback_degradation_*.pt"))
    assert [f.name[:26] for f in side_files] == [f"disback_degradation_00000{i}" for i in (1, 2, 3)]
    stamps = [f.stat().st_mtime_ns for f in side_files]
    checkpoint = read_checkpoint(tmp_path / "last.ckpt")
    path = checkpoint["disback"]["path"]
    assert [entry[SIDE_FILE] for entry in path] == [f.name for f in side_files] and "state" not in path[0]
    inline = {**checkpoint, "disback": {**checkpoint["disback"], "path": [torch.load(f) for f in side_files]}}
    torch.save(inline, tmp_path / "inline.pt")  # what the checkpoint would weigh with the path inside
    saved = (tmp_path / "inline.pt").stat().st_size - (tmp_path / "last.ckpt").stat().st_size
    assert saved > 0.9 * sum(f.stat().st_size for f in side_files)

    module = fit_disback(4, ckpt_path=tmp_path / "last.ckpt")  # one generator update: on to stage 2, target c_1
    assert module.stage_schedule.stage == 2 and [f.stat().st_mtime_ns for f in side_files] == stamps  # written once
    c_1 = torch.load(side_files[0])
    assert all(torch.equal(v, c_1[k]) for k, v in module.real_score.net.state_dict().items())  # read back

    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "last.ckpt").rename(moved / "last.ckpt")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for f in side_files:
        f.rename(hidden / f.name)
    with pytest.raises(FileNotFoundError, match="disback_degradation_000001_.*missing.*restore them"):
        fit_disback(5, ckpt_path=moved / "last.ckpt")
    for f in side_files:
        (hidden / f.name).rename(moved / f.name)
    assert fit_disback(5, ckpt_path=moved / "last.ckpt").stage_schedule.stage == 3  # moved as a whole: resolves


SIGTERM_AT = textwrap.dedent('''
    """A callback that sends this process SIGTERM at the start of step $SIGTERM_AT_STEP, as a scheduler would."""
    import os, signal
    import lightning as L

    class SigtermAt(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == int(os.environ.get("SIGTERM_AT_STEP", -1)):
                os.kill(os.getpid(), signal.SIGTERM)
''')

CONFIG = textwrap.dedent('''
    seed_everything: 0
    trainer:
      max_steps: 6
      accelerator: cpu
      logger: false
      enable_progress_bar: false
      enable_model_summary: false
      limit_val_batches: 0
      callbacks:
        - class_path: lit_distill.callbacks.DurableCheckpoint
          init_args: {dirpath: ckpts, every_n_train_steps: null, every_n_minutes: null}
        - class_path: sigterm_at.SigtermAt
    model:
      class_path: lit_distill.methods.TeacherRL
      init_args:
        model: embedded
        model_kwargs: {resolution: 8, block_channels: [16, 32], text_hidden: 32}
        reward: {name: brightness, target: 0.6}
        sampling: {num_steps: 4, rollouts_per_prompt: 2, eval_steps: 4}
        updates: {minibatch_size: 16}
        optim: {lr: 0.001}
    data:
      class_path: lit_distill.data.PromptDataModule
      init_args: {train: "embedded:digits_brightness", batch_size: 2, repeat: 50}
''')


def test_sigterm_saves_exits_for_requeue_and_ckpt_path_last_continues_exactly(tmp_path):
    (tmp_path / "sigterm_at.py").write_text(SIGTERM_AT)
    (tmp_path / "run.yaml").write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SIGTERM_AT_STEP", None)

    def cli(workdir, *extra, **extra_env):  # returns the process and a function that reads its stderr
        workdir.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "lit_distill.cli", "--import", "sigterm_at", "fit", "--config",
                   str(tmp_path / "run.yaml"), *extra]
        log = workdir / f"stderr{len(extra)}.txt"
        with open(log, "w") as f:
            proc = subprocess.Popen(command, cwd=workdir, env={**env, "PYTHONPATH": f"{ROOT}:{tmp_path}", **extra_env},
                                    stdout=subprocess.DEVNULL, stderr=f)
        return proc, log.read_text

    (straight, straight_log), (preempted, errors) = cli(tmp_path / "straight"), cli(tmp_path / "preempted",
                                                                                   SIGTERM_AT_STEP="3")
    preempted.wait(timeout=400)
    assert preempted.returncode == 143, errors()[-3000:]
    last = tmp_path / "preempted" / "ckpts" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 4  # the step running when SIGTERM came was finished and saved
    assert "exiting with code 143" in errors()
    resumed, errors = cli(tmp_path / "preempted", "--ckpt_path", "last")
    assert resumed.wait(timeout=400) == 0, errors()[-3000:]
    assert "Restoring states from the checkpoint path at" in errors()
    assert straight.wait(timeout=400) == 0, straight_log()[-3000:]
    a = read_checkpoint(tmp_path / "straight" / "ckpts" / "last.ckpt")
    b = read_checkpoint(last)
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_saves_follow_the_step_and_time_rules(tmp_path, monkeypatch):
    import lit_distill.callbacks.checkpoint as checkpoint

    class Recorded(DurableCheckpoint):
        def _save_last(self, trainer):
            self.saved_at = getattr(self, "saved_at", []) + [trainer.global_step]
            super()._save_last(trainer)

    by_steps = Recorded(tmp_path / "steps", every_n_train_steps=2, every_n_minutes=None)
    fit(tiny_rl(), 3, [by_steps])
    assert by_steps.saved_at == [2, 3]  # every 2 steps, and when training ends
    clock = iter(range(0, 10**12, 61))  # each reading of the clock is 61 s later
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: next(clock))
    by_minutes = Recorded(tmp_path / "minutes", every_n_train_steps=None, every_n_minutes=1)
    fit(tiny_rl(), 3, [by_minutes])
    assert by_minutes.saved_at == [1, 2, 3, 3]  # every minute; the end-of-training save finds step 3 saved
    assert read_checkpoint(tmp_path / "minutes" / "last.ckpt")["global_step"] == 3


def test_sigterm_during_validation_saves_from_on_exception_and_resumes_exactly(tmp_path):
    from lit_distill.data import ImageDataModule
    from lit_distill.methods import DiffusionPretrain

    class SigtermInValidation(L.Callback):
        def on_validation_batch_start(self, trainer, *args):
            if trainer.global_step == 3:  # after this step's on_train_batch_end check: on_exception must save
                os.kill(os.getpid(), signal.SIGTERM)

    def run(directory, callbacks=(), ckpt_path=None):
        torch.manual_seed(0)
        module = DiffusionPretrain("embedded", {**TINY, "seed": 0}, optim={"lr": 1e-3})
        trainer = L.Trainer(max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            val_check_interval=1, limit_val_batches=2, num_sanity_val_steps=0,
                            callbacks=[DurableCheckpoint(directory, every_n_minutes=None), *callbacks])
        trainer.fit(module, ImageDataModule("embedded:digits", resolution=8, batch_size=16), ckpt_path=ckpt_path)
        return module

    straight = run(tmp_path / "straight")
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "preempted", [SigtermInValidation()])
    assert exit_info.value.code == 143
    assert read_checkpoint(tmp_path / "preempted" / "last.ckpt")["global_step"] == 3
    resumed = run(tmp_path / "preempted", ckpt_path=tmp_path / "preempted" / "last.ckpt")
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
