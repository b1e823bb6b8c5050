"""`python -m vitnorm.evaluate --workdir W --use_ema` (in-process, the CLI's own flags and main) on a
run trained with an EMA of the weights: its accuracy pass evaluates the EMA weights with the EMA BN
statistics, so its loss and top-1 are the `eval_ema/*` the trainer logged at the last step, not
the live weights' `eval/*`. Tiny BN + FFN-BN ViT on the in-memory `numpy:digits`; the evaluation
uses the trainer's eval batch size, so both passes see the same examples in the same batches."""
import json

import pytest

from test_train_cli import TINY_CONFIG
from vitnorm import workdir as workdir_lib

NUM_STEPS, EVAL_BATCH = 8, 64  # TINY_CONFIG: batch_size 64, accum_steps 1 -> the trainer evaluates at 64

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "tiny.py"
  path.write_text(TINY_CONFIG)
  return str(path)


def test_evaluate_use_ema_reproduces_the_logged_eval_ema_loss(tiny, tmp_path, run_cli):
  workdir = str(tmp_path / "run")
  code, _, err = run_cli("train", f"--config={tiny}", f"--workdir={workdir}", "--config.data.name=numpy:digits",
                         f"--config.num_steps={NUM_STEPS}", "--config.optim.ema_decay=0.7",
                         "--config.eval_every=0", f"--config.checkpoint_every={NUM_STEPS}")
  assert code == 0, err
  last = [r for r in workdir_lib.read_metrics(workdir) if "eval_ema/loss" in r]
  assert [r["step"] for r in last] == [NUM_STEPS]
  logged = last[0]
  # The EMA (decay 0.7 over 8 steps) lags the weights: its loss is measurably not the live one's.
  assert abs(logged["eval_ema/loss"] - logged["eval/loss"]) > 1e-3 * logged["eval/loss"]

  reports = {}
  for use_ema in (True, False):
    out_dir = tmp_path / f"eval_ema_{use_ema}"
    out_dir.mkdir()
    code, _, err = run_cli("evaluate", f"--workdir={workdir}", "--no_throughput",
                           f"--eval_batch_size={EVAL_BATCH}", f"--output_dir={out_dir}",
                           *(["--use_ema"] if use_ema else []))
    assert code in (0, None), err  # absl's app.run ends a main that returns with sys.exit(None)
    reports[use_ema] = json.loads((out_dir / "evaluation.json").read_text())
  report = reports[True]
  assert report["source"]["use_ema"] is True and report["source"]["step"] == NUM_STEPS
  accuracy = report["accuracy"]
  assert accuracy["eval_batch_size"] == EVAL_BATCH
  # evaluate computes at matmul precision 'highest', the trainer at the default: float32 round-off.
  assert accuracy["as_trained"]["loss"] == pytest.approx(logged["eval_ema/loss"], rel=1e-5)
  assert accuracy["as_trained"]["top1"] == pytest.approx(logged["eval_ema/top1"], abs=1e-9)
  assert accuracy["folded"]["loss"] == pytest.approx(logged["eval_ema/loss"], rel=1e-5)
  # Without --use_ema the same command evaluates the live weights: the logged eval/*.
  assert reports[False]["accuracy"]["as_trained"]["loss"] == pytest.approx(logged["eval/loss"], rel=1e-5)
