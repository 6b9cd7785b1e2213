"""A run killed with SIGKILL in the middle of training resumes from its last checkpoint, and no checkpoint
file on disk is corrupt (Lightning writes local checkpoints through an fsspec transaction: a temporary
file moved into place)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import lightning as L
import torch

SCRIPT = textwrap.dedent('''
    import sys, torch, lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lit_distill.data import PromptDataModule
    from lit_distill.methods import TeacherRL

    torch.set_num_threads(1)
    module = TeacherRL("embedded", "brightness", {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32},
                       num_steps=4, group_size=4, minibatch_size=16, eval_steps=4, lr=1e-3)
    data = PromptDataModule("embedded:digits_brightness", batch_size=2, repeat=100)
    checkpoints = ModelCheckpoint(dirpath=sys.argv[1], every_n_train_steps=2, save_last=True, save_top_k=-1)
    L.Trainer(max_steps=10_000, logger=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[checkpoints]).fit(module, data)
''')


def test_sigkill_mid_training_leaves_resumable_checkpoints(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    ckpt_dir = tmp_path / "ckpts"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt_dir)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(ckpt_dir.glob("*.ckpt"))) < 3:
            time.sleep(0.2)
        assert len(list(ckpt_dir.glob("*.ckpt"))) >= 3, "the training subprocess wrote no checkpoints in time"
        time.sleep(0.3)  # kill it somewhere in the next steps (possibly mid-write)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for path in ckpt_dir.glob("*.ckpt"):  # every file that carries the name is complete
        assert torch.load(path, map_location="cpu", weights_only=False)["lit_distill_method"] == "teacher_rl"

    from lit_distill.data import PromptDataModule
    from lit_distill.methods import TeacherRL

    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    module = TeacherRL("embedded", "brightness", {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32},
                       num_steps=4, group_size=4, minibatch_size=16, eval_steps=4, lr=1e-3)
    trainer = L.Trainer(max_steps=last["global_step"] + 2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, PromptDataModule("embedded:digits_brightness", batch_size=2, repeat=100),
                ckpt_path=ckpt_dir / "last.ckpt")
    assert trainer.global_step == last["global_step"] + 2
