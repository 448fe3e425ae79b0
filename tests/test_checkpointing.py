"""Crash and resume: SIGKILL mid-epoch + `--ckpt_path last` reproduces an uninterrupted run exactly; atomic
checkpoint writes; weights_only loads; no silent reuse of a checkpoint directory; trust_remote_code off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from sparsepo_lightning.checkpointing import AtomicCheckpointIO, RunCheckpoint
from sparsepo_lightning.data import PreferenceDataModule
from sparsepo_lightning.masks import LearnedMasker
from sparsepo_lightning.module import PreferenceModule
from tests.cli_zygote import ForkedCommand

ROOT = Path(__file__).resolve().parents[1]


def _fit_cmd(model_dir: str, pairs: str, runs: Path, extra_config: Path, *args: str) -> list[str]:
    """``sparsepo`` arguments of a tiny run (each run is its own process, forked from the ``cli_zygote``)."""
    return ["fit", "--config", "configs/debug/tiny.yaml",
            "--config", str(extra_config), "--model.model", model_dir, "--data.train_file", pairs,
            "--data.val_file", pairs, "--trainer.logger.init_args.save_dir", str(runs), "--trainer.max_steps", "12",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", *args]


def _callbacks_yaml(path: Path, losses: Path, block: tuple[int, Path] | None = None) -> Path:
    lines = ["trainer:", "  callbacks:",
             "    - class_path: sparsepo_lightning.checkpointing.RunCheckpoint",
             "      init_args: {save_last: true, every_n_train_steps: 3}",
             "    - class_path: tests.crash_helpers.LossJSONL",
             f"      init_args: {{path: {json.dumps(str(losses))}}}"]
    if block is not None:
        lines += ["    - class_path: tests.crash_helpers.BlockAtStep",
                  f"      init_args: {{step: {block[0]}, marker: {json.dumps(str(block[1]))}}}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _losses(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait(proc: ForkedCommand) -> None:
    assert proc.wait() == 0, proc.stderr[-4000:]


def test_sigkill_mid_epoch_then_resume_last_matches_an_uninterrupted_run(cli_zygote, tiny_model_dir, pairs_file,
                                                                        tmp_path):
    """16 pairs / batch 2 = 8 batches per epoch, 12 steps, a checkpoint every 3 steps. The crashing run is killed
    with SIGKILL while it waits before step 6 (last.ckpt = step 3, mid-epoch); `--ckpt_path last` (which must find
    it in the previous version directory) resumes at step 4. Per-step losses must equal the uninterrupted run's
    bit for bit: no batch skipped or repeated, across the epoch boundary too. The uninterrupted run goes in
    parallel with the crashing one; each run is its own process, forked from the `cli_zygote` fixture."""
    start = time.monotonic()
    full_log = tmp_path / "full.jsonl"
    full_run = cli_zygote.start(*_fit_cmd(tiny_model_dir, pairs_file, tmp_path / "full",
                                          _callbacks_yaml(tmp_path / "full.yaml", full_log)))

    crash_log, marker, runs = tmp_path / "crash.jsonl", tmp_path / "blocked", tmp_path / "crash"
    cfg = _callbacks_yaml(tmp_path / "crash.yaml", crash_log, block=(5, marker))
    proc = cli_zygote.start(*_fit_cmd(tiny_model_dir, pairs_file, runs, cfg))
    try:
        while not marker.exists():
            assert proc.poll() is None, f"training ended before the kill point: {proc.stderr[-3000:]}"
            assert time.monotonic() - start < 240, "timed out waiting for the kill point"
            time.sleep(0.2)
        last = runs / "debug" / "version_0" / "checkpoints" / "last.ckpt"
        assert last.is_file()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        if sys.exc_info()[0] is not None and full_run.poll() is None:
            full_run.kill()
    assert proc.returncode == -signal.SIGKILL
    killed = _losses(crash_log)
    assert [r["step"] for r in killed] == [1, 2, 3, 4, 5]
    assert torch.load(last, weights_only=True)["global_step"] == 3

    resume_log = tmp_path / "resume.jsonl"
    cfg = _callbacks_yaml(tmp_path / "resume.yaml", resume_log)
    _wait(cli_zygote.start(*_fit_cmd(tiny_model_dir, pairs_file, runs, cfg, "--ckpt_path", "last")))
    _wait(full_run)
    resumed = _losses(resume_log)
    assert [r["step"] for r in resumed] == list(range(4, 13)), "skipped or repeated steps after resume"
    full = _losses(full_log)
    assert [r["step"] for r in full] == list(range(1, 13))
    assert [r["loss"] for r in killed[:3] + resumed] == [r["loss"] for r in full]  # exact, not approx
    assert [r["batch_idx"] for r in resumed] == [r["batch_idx"] for r in full[3:]]
    assert (runs / "debug" / "version_1" / "checkpoints" / "last.ckpt").is_file()  # the resumed run's own dir
    assert not list(runs.rglob("*.tmp"))


def _data(model_dir: str, pairs: str) -> PreferenceDataModule:
    return PreferenceDataModule(tokenizer=model_dir, train_file=pairs, batch_size=2, max_length=32,
                                max_prompt_length=16, val_split=None)


class _Losses(RunCheckpoint):
    """RunCheckpoint that also records the training loss of each step (one callback keeps the test short)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _fit(model_dir, pairs, dirpath, max_steps, ckpt_path=None, masker=LearnedMasker, **ckpt_kwargs) -> _Losses:
    seed_everything(0)
    module = PreferenceModule(model=model_dir, masker=masker(), lr=1e-3, warmup_ratio=0.25)
    callback = _Losses(dirpath=dirpath, **ckpt_kwargs)
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[callback],
                      plugins=[AtomicCheckpointIO()])
    trainer.fit(module, datamodule=_data(model_dir, pairs), ckpt_path=ckpt_path)
    return callback


@pytest.mark.parametrize("save_step", [8, 11], ids=["last-batch-of-epoch", "mid-second-epoch"])
def test_resume_from_step_checkpoints_is_exact_in_process(save_step, tiny_model_dir, pairs_file, tmp_path):
    full = _fit(tiny_model_dir, pairs_file, tmp_path / "full", 13, every_n_train_steps=save_step, save_top_k=-1)
    (ckpt,) = (tmp_path / "full").glob(f"*step={save_step}.ckpt")
    resumed = _fit(tiny_model_dir, pairs_file, tmp_path / "resumed", 13, ckpt_path=str(ckpt))
    assert sorted(resumed.losses) == list(range(save_step + 1, 14))
    assert [resumed.losses[s] for s in sorted(resumed.losses)] == [full.losses[s] for s in range(save_step + 1, 14)]


@pytest.mark.parametrize("control", ["PermutedControl", "BernoulliControl"])
def test_a_control_around_a_sparse_learned_mask_resumes_exactly_in_process(control, tiny_model_dir, pairs_file,
                                                                          tmp_path):
    """A control (its own draw counter) around a learned mask at target sparsity 0.5 (its gate and magnitude nets):
    resumed from the step-5 checkpoint, steps 6-9 repeat the uninterrupted run's losses bit for bit."""
    from sparsepo_lightning.masks import controls

    def masker():
        return getattr(controls, control)(LearnedMasker(target_sparsity=0.5), seed=1)

    full = _fit(tiny_model_dir, pairs_file, tmp_path / "full", 9, masker=masker, every_n_train_steps=5, save_top_k=-1)
    (ckpt,) = (tmp_path / "full").glob("*step=5.ckpt")
    resumed = _fit(tiny_model_dir, pairs_file, tmp_path / "resumed", 9, ckpt_path=str(ckpt), masker=masker)
    assert sorted(resumed.losses) == list(range(6, 10))
    assert [resumed.losses[s] for s in sorted(resumed.losses)] == [full.losses[s] for s in range(6, 10)]


def test_resume_from_an_epoch_end_checkpoint_is_exact_in_process(tiny_model_dir, pairs_file, tmp_path):
    """A checkpoint written in ``on_train_epoch_end`` (RunCheckpoint's epoch saves), training bounded by max_steps:
    Lightning 2.6 alone restarts the finished epoch, trains one batch of the next pass in it and then a pass in the
    order of the pass after (step 9 right, steps 10-13 wrong); ``checkpointing.close_saved_epoch`` fixes it."""
    full = _fit(tiny_model_dir, pairs_file, tmp_path / "full", 13, every_n_epochs=1, save_top_k=-1)
    (ckpt,) = (tmp_path / "full").glob("epoch=0-step=8.ckpt")
    resumed = _fit(tiny_model_dir, pairs_file, tmp_path / "resumed", 13, ckpt_path=str(ckpt))
    assert sorted(resumed.losses) == list(range(9, 14))
    assert [resumed.losses[s] for s in sorted(resumed.losses)] == [full.losses[s] for s in range(9, 14)]


def test_fit_refuses_a_nonempty_checkpoint_directory_unless_resuming_or_overwrite(tiny_model_dir, pairs_file,
                                                                                  tmp_path):
    first = _fit(tiny_model_dir, pairs_file, tmp_path / "ckpts", 2, save_last=True)
    assert (tmp_path / "ckpts" / "last.ckpt").is_file() and first.losses
    before = (tmp_path / "ckpts" / "last.ckpt").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds files .*last.ckpt.*overwrite=true"):
        _fit(tiny_model_dir, pairs_file, tmp_path / "ckpts", 2, save_last=True)
    assert (tmp_path / "ckpts" / "last.ckpt").read_bytes() == before  # nothing was overwritten
    _fit(tiny_model_dir, pairs_file, tmp_path / "ckpts", 3, ckpt_path=str(tmp_path / "ckpts" / "last.ckpt"),
         save_last=True)  # continuing the same run is fine
    _fit(tiny_model_dir, pairs_file, tmp_path / "ckpts", 1, save_last=True, overwrite=True)


def test_checkpoint_write_killed_midway_keeps_the_previous_checkpoint(tmp_path):
    """A child process saves once, then is SIGKILLed halfway through writing the next version of the same file."""
    target = tmp_path / "last.ckpt"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from sparsepo_lightning.checkpointing import AtomicCheckpointIO
        io = AtomicCheckpointIO()
        io.save_checkpoint({{"step": 1, "w": torch.ones(1000)}}, {str(target)!r})
        real_save = torch.save
        def dying_save(obj, f):
            f.write(b"PK" + b"x" * 5000)  # half a zip archive ...
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # ... then the process dies: no cleanup runs
        torch.save = dying_save
        io.save_checkpoint({{"step": 2, "w": torch.zeros(1000)}}, {str(target)!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    loaded = AtomicCheckpointIO().load_checkpoint(target)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(1000))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.") and leftovers[0].endswith(".tmp")


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / "a.ckpt")

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"step": 2}, tmp_path / "a.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]
    assert io.load_checkpoint(tmp_path / "a.ckpt")["step"] == 1


class Payload:
    """A pickled object: weights_only loading must refuse it (it could be any callable)."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoints_load_with_weights_only_by_default(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert "payload" in AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # explicit opt-in only


def test_cli_uses_atomic_io_and_run_checkpoint_by_default(tiny_model_dir, monkeypatch):
    from sparsepo_lightning.cli import SparsePOCLI

    monkeypatch.chdir(ROOT)
    cli = SparsePOCLI(PreferenceModule, PreferenceDataModule, subclass_mode_data=True, run=False,
                      args=["--config", "configs/debug/tiny.yaml", "--model.model", tiny_model_dir],
                      trainer_defaults=__import__("sparsepo_lightning.cli", fromlist=["x"]).TRAINER_DEFAULTS)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, RunCheckpoint)]
    assert callback.save_last and callback._every_n_train_steps == 200
    assert cli.model.hparams.trust_remote_code is False


def test_trust_remote_code_is_off_unless_set(monkeypatch):
    import transformers

    from sparsepo_lightning import model_sources as models

    seen = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(k.get("trust_remote_code")))
    monkeypatch.setattr(models, "resolve_model_path", lambda name: name)
    models.load_causal_lm("some/model")
    models.load_causal_lm("some/model", trust_remote_code=True)
    assert seen == [False, True]


def test_kill_while_last_link_is_repointed_still_resumes(cli_zygote, tiny_model_dir, pairs_file, tmp_path):
    """``save_last: link``, a step checkpoint every step: the run is SIGKILLed after step 2's checkpoint is written
    and before ``last.ckpt`` is re-pointed at it. ``last.ckpt`` must still lead to a complete checkpoint (step 1;
    the old order deleted it first, leaving a broken link that ``--ckpt_path last`` skipped, silently restarting
    from scratch), and ``--ckpt_path last`` resumes from it at step 2."""
    runs, losses = tmp_path / "runs", tmp_path / "resume.jsonl"
    killing = tmp_path / "kill.yaml"
    killing.write_text("trainer:\n  callbacks:\n    - class_path: tests.crash_helpers.KillBeforeRelink\n"
                       "      init_args: {nth: 2, save_last: link, every_n_train_steps: 1}\n")
    done = cli_zygote.run(*_fit_cmd(tiny_model_dir, pairs_file, runs, killing, "--trainer.max_steps", "3"))
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    checkpoints = runs / "debug" / "version_0" / "checkpoints"
    last = checkpoints / "last.ckpt"
    assert last.is_symlink() and last.exists(), sorted(p.name for p in checkpoints.iterdir())
    assert torch.load(last, weights_only=True)["global_step"] == 1
    resume = _callbacks_yaml(tmp_path / "resume.yaml", losses)
    done = cli_zygote.run(*_fit_cmd(tiny_model_dir, pairs_file, runs, resume, "--trainer.max_steps", "3",
                                    "--ckpt_path", "last"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {last}" in done.stdout + done.stderr
    assert [r["step"] for r in _losses(losses)] == [2, 3]


def test_link_is_repointed_before_the_old_checkpoint_is_deleted(tiny_model_dir, pairs_file, tmp_path):
    """In process: every step the link moves to the new step checkpoint, the old one goes, no temporary is left."""
    callback = _fit(tiny_model_dir, pairs_file, tmp_path / "ckpts", 3, save_last="link", every_n_train_steps=1)
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert names == ["epoch=0-step=3.ckpt", "last.ckpt"], names
    assert os.readlink(tmp_path / "ckpts" / "last.ckpt") == "epoch=0-step=3.ckpt" and callback.losses


def test_checkpoints_are_as_readable_as_the_umask_allows(tmp_path):
    """mkstemp creates owner-only files; a checkpoint gets the mode a plain open() would give under the umask."""
    import stat

    previous = os.umask(0o022)
    try:
        for umask, expected in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(umask)
            AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / f"{umask:o}.ckpt")
            assert stat.S_IMODE((tmp_path / f"{umask:o}.ckpt").stat().st_mode) == expected
    finally:
        os.umask(previous)
