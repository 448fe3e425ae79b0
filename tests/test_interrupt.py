"""SIGTERM, SIGINT and SIGUSR1 end a ``sparsepo fit`` run after the current optimizer step with a checkpoint and the
run summary, exit with 128 + the signal number, and ``--ckpt_path last`` continues step-exact. Each run is a
process forked from the ``cli_zygote``."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import torch

from tests.test_checkpointing import _fit_cmd, _losses


def _callbacks(path: Path, losses: Path, pause: tuple[int, Path] | None = None) -> Path:
    lines = ["trainer:", "  callbacks:",
             "    - class_path: sparsepo_lightning.checkpointing.RunCheckpoint",
             "      init_args: {save_last: link, every_n_train_steps: 200}",  # the CLI's default: no periodic save
             "    - class_path: tests.crash_helpers.LossJSONL", f"      init_args: {{path: {json.dumps(str(losses))}}}"]
    if pause is not None:
        lines += ["    - class_path: tests.crash_helpers.PauseAtStep",
                  f"      init_args: {{step: {pause[0]}, marker: {json.dumps(str(pause[1]))}}}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_signals_checkpoint_and_resume_step_exact(cli_zygote, tiny_model_dir, pairs_file, tmp_path):
    """12 steps over 8 batches per epoch. SIGTERM arrives before step 3, SIGINT (resumed run) before step 6, SIGUSR1
    before step 9: each run finishes that step, writes last.ckpt and summary.json, exits 143/130/138; a last resume
    runs to step 12. The per-step losses equal those of an uninterrupted run bit for bit."""
    full_log, runs = tmp_path / "full.jsonl", tmp_path / "runs"
    full = cli_zygote.start(*_fit_cmd(tiny_model_dir, pairs_file, tmp_path / "full",
                                      _callbacks(tmp_path / "full.yaml", full_log)))
    pieces = []
    for version, (signum, before, resume) in enumerate(((signal.SIGTERM, 2, []), (signal.SIGINT, 5, ["last"]),
                                                        (signal.SIGUSR1, 8, ["last"]))):
        log, marker = tmp_path / f"piece{version}.jsonl", tmp_path / f"pause{version}"
        config = _callbacks(tmp_path / f"piece{version}.yaml", log, (before, marker))
        proc = cli_zygote.start(*_fit_cmd(tiny_model_dir, pairs_file, runs, config,
                                          *(["--ckpt_path", *resume] if resume else [])))
        start = time.monotonic()
        while not marker.exists():
            assert proc.poll() is None, proc.stderr[-3000:]
            assert time.monotonic() - start < 240, "timed out waiting for the pause"
            time.sleep(0.1)
        proc.send_signal(signum)
        time.sleep(0.2)
        marker.unlink()
        assert proc.wait() == 128 + signum, proc.stderr[-3000:]
        stopped = before + 1
        assert f"Received {signal.Signals(signum).name}: finishing the current optimizer step" in proc.stderr
        assert f"Interrupted by {signal.Signals(signum).name} at step {stopped}" in proc.stderr
        version_dir = runs / "debug" / f"version_{version}"
        umask = os.umask(0o022)
        os.umask(umask)  # the forked run's umask: its checkpoint is as readable as that allows
        assert stat.S_IMODE((version_dir / "checkpoints" / "last.ckpt").stat().st_mode) == 0o666 & ~umask
        assert torch.load(version_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == stopped
        assert json.loads((version_dir / "summary.json").read_text())["global_step"] == stopped
        pieces += _losses(log)
    last_log = tmp_path / "last.jsonl"
    done = cli_zygote.run(*_fit_cmd(tiny_model_dir, pairs_file, runs, _callbacks(tmp_path / "last.yaml", last_log),
                                    "--ckpt_path", "last"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert full.wait() == 0, full.stderr[-3000:]
    pieces += _losses(last_log)
    assert [r["step"] for r in pieces] == list(range(1, 13))
    assert [r["loss"] for r in pieces] == [r["loss"] for r in _losses(full_log)]  # exact, not approx


def test_resume_keeps_the_epoch_label_and_validation_schedule(cli_zygote, tiny_model_dir, pairs_file, tmp_path):
    """A run stopped by max_steps=4 (mid-epoch: 8 batches per epoch) under --trainer.max_time, resumed to step 10
    without it, validates at the steps of an uninterrupted 10-step run (batches 3 and 6 of epoch 0 with
    val_check_interval 3; a resume counted as a new epoch validated at 7 and 10), names
    its checkpoint epoch=1-step=10 like it (epoch=2 when the resume counted as a new epoch), and prints no
    Lightning warning (changed dirpath, missing Timer)."""
    common = ["fit", "--config", "configs/debug/tiny.yaml", "--model.model", tiny_model_dir, "--data.train_file",
              pairs_file, "--data.val_file", pairs_file, "--trainer.val_check_interval", "3",
              "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
              "--trainer.enable_progress_bar", "false"]
    full = cli_zygote.start(*common, "--trainer.logger.init_args.save_dir", str(tmp_path / "full"),
                            "--trainer.max_steps", "10")
    runs = ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    first = cli_zygote.run(*common, *runs, "--trainer.max_steps", "4", "--trainer.max_time", "00:00:30:00")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = cli_zygote.run(*common, *runs, "--trainer.max_steps", "10", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert full.wait() == 0, full.stderr[-3000:]
    assert "dirpath has changed" not in resumed.stderr and "Please add the following callbacks" not in resumed.stderr
    steps = [[v["step"] for v in json.loads((folder / "summary.json").read_text())["validations"]]
             for folder in (tmp_path / "full" / "debug" / "version_0", tmp_path / "runs" / "debug" / "version_1")]
    assert steps[0] == [3, 6] and steps[1] == [3, 6]  # the resumed run's summary keeps the first run's rows
    for folder in (tmp_path / "full" / "debug" / "version_0", tmp_path / "runs" / "debug" / "version_1"):
        assert (folder / "checkpoints" / "epoch=1-step=10.ckpt").is_file(), list((folder / "checkpoints").iterdir())


def test_an_in_process_fit_leaves_the_signal_handlers_as_it_found_them(tiny_model_dir, pairs_file, tmp_path,
                                                                       monkeypatch):
    """After ``fit`` returns, SIGINT/SIGTERM/SIGUSR1 have the handlers they had before (Lightning restores its own
    at teardown; re-installing Lightning's handler afterwards kept the trainer and its models alive for the rest of
    the process: every in-process fit of a notebook or a test worker leaked them), and the model is collectable (the
    CLI runs in a copy of the context: jsonargparse leaves a context variable pointing at its parser, which reaches
    the CLI)."""
    import gc
    import weakref

    from sparsepo_lightning.cli import run as main
    from sparsepo_lightning.interrupt import SIGNALS

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    before = {signum: signal.getsignal(signum) for signum in SIGNALS}
    cli = main(["fit", "--config", "configs/debug/tiny.yaml", "--model.model", tiny_model_dir,
                "--data.train_file", pairs_file, "--data.val_file", pairs_file, "--trainer.max_steps", "1",
                "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.trainer.global_step == 1
    assert {signum: signal.getsignal(signum) for signum in SIGNALS} == before
    model = weakref.ref(cli.model)
    del cli
    gc.collect()
    assert model() is None


def _wait_for(paths: list[Path], proc, deadline: float) -> None:
    """Until every path exists; fails if the run ends first or at ``deadline`` (``time.monotonic``)."""
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.stderr[-6000:]
        assert time.monotonic() < deadline, f"timed out waiting for {[str(p) for p in paths]}\n{proc.stderr[-6000:]}"
        time.sleep(0.05)


def _ended(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie awaiting its parent counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
