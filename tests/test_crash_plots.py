"""experiments.crash_plots: the crash study's figures, for finished sweeps and for sweeps in progress."""
import os

from experiments import crash_plots


def _run(name, status, loss=None):
  return {"name": name, "status": status, "final": {} if loss is None else {"train/loss": loss}}


def test_loss_vs_lr_draws_the_finished_seeds_and_nothing_while_none_has_finished(tmp_path):
  # A sweep that has just started: its runs are preempted / incomplete, none has a final loss.
  started = [_run("ln_fp16_d8_lr1e-4_seed0", "preempted"), _run("ln_fp16_d8_lr3e-4_seed0", "incomplete")]
  path = str(tmp_path / "started.png")
  assert crash_plots.plot_loss_vs_lr(started, path, "in progress") is False
  assert not os.path.exists(path)
  # One finished run (and one crashed) later, the figure is drawn.
  finished = started + [_run("ln_fp16_d8_lr1e-3_seed0", "completed", 0.4), _run("bn_fp16_d8_lr1e-1_seed0", "diverged")]
  path = str(tmp_path / "finished.png")
  assert crash_plots.plot_loss_vs_lr(finished, path, "finished") is True
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
