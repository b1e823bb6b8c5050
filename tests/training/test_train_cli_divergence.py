"""`vitnorm.train` exits with code 3 on divergence: a non-finite step and a loss spike.

The command line runs in-process (the `run_cli` fixture of conftest: vitnorm.train.run(), as the
console script does) on a tiny config file written to a temporary folder, so no extra interpreter
or compilation is paid.
"""
import textwrap

import jax
import numpy as np
import pytest

from vitnorm import workdir as workdir_lib
from vitnorm import checkpoints

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections

# Weight decay with lr * weight_decay = 2.5 > 2: each decoupled decay step multiplies every kernel
# by (1 - 2.5) = -1.5, so the logits and the loss grow geometrically while staying finite -- a
# loss spike, caught at the first step the spike test looks at (step 21, after its 20-step warm-up).
CONFIG = textwrap.dedent("""
    from configs import common

    def get_config():
      c = common.base_config()
      c.model = common.model_config(variant=None, norm="ln", num_classes=10, image_size=8, num_channels=1)
      c.model.update(dict(hidden_size=16, num_layers=1, mlp_dim=32, num_heads=2, patch_size=4))
      c.data = common.data_config(name="digits", image_size=8)
      c.data.update(dict(channels=1, cache=True, inception_crop=False, hflip=False,
                         normalize_mean=(0.5,), normalize_std=(0.5,), eval_crop_fraction=1.0))
      c.batch_size, c.num_steps = 32, 30
      c.optim.update(dict(base_lr=1e-3, min_lr=1e-3, lr_scaling_batch=None, warmup_steps=0,
                          weight_decay=2500.0))
      c.log_every, c.eval_every, c.checkpoint_every, c.diagnostics_every = 5, 0, 2, 0
      c.loss_spike_factor = 2.0
      c.async_checkpoints = False
      c.progress_bar = "off"
      return c
""")


def train(run_cli, *args):
  """(exit code, stderr lines) of `python -m vitnorm.train ARGS` (in-process, see conftest)."""
  code, _, err = run_cli("train", *args)
  return code, err.splitlines()


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "tiny_divergent.py"
  path.write_text(CONFIG)
  return str(path)


def test_nan_gradient_exits_3_and_keeps_the_last_finite_checkpoint(run_cli, config_file, tmp_path):
  workdir = str(tmp_path / "nan")
  # debug.inject_nan_at_step feeds NaN images: the loss and every gradient are non-finite.
  code, err = train(run_cli, "--config", config_file, "--workdir", workdir,
                    "--config.debug.inject_nan_at_step=5")
  assert code == 3
  assert err[-1].startswith("error: training diverged at step 5: non-finite loss (nan) or gradient norm (nan)"), err
  assert err[-1].endswith(f"(status.json in {workdir}; the last good checkpoint is kept)")
  status = workdir_lib.read_status(workdir)
  assert status["status"] == "diverged" and status["step"] == 5
  assert status["last_checkpoint_step"] == 4 and checkpoints.all_steps(workdir) == [2, 4]
  variables, _ = checkpoints.restore_variables(workdir)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(variables))


def test_loss_spike_exits_3_with_the_spike_named(run_cli, config_file, tmp_path):
  workdir = str(tmp_path / "spike")
  code, err = train(run_cli, "--config", config_file, "--workdir", workdir)
  assert code == 3
  assert err[-1].startswith("error: training diverged at step 21: loss spiked to "), err
  assert "(config.loss_spike_factor)" in err[-1]
  status = workdir_lib.read_status(workdir)
  assert status["status"] == "diverged" and status["step"] == 21
  assert "loss spiked" in status["reason"]
  assert np.isfinite(status["metrics"]["train/loss"])
  assert checkpoints.latest_step(workdir) == 20
