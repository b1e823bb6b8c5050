"""The trainer's command line as a user meets it, in-process (vitnorm.train.main with an argv):
--help, --print_config, one-line errors, None for optional fields, exit codes (0 completed /
already completed, 2 bad input with the workdir untouched, 75 preempted), the start header,
re-run rules, init_from a vitnorm workdir. One subprocess checks that nothing but our lines print."""
import io
import json
import os
import subprocess
import sys
import textwrap
import threading

import jax
import numpy as np
import pytest

from vitnorm import cli, train
from vitnorm import workdir as run_files
from vitnorm import checkpoints

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny digits run of tests/training/test_loop.py (same model, optimizer and length, so one
# pytest process compiles its steps once) as a config file with the real :args.
TINY_CONFIG = textwrap.dedent('''
    # python -m vitnorm.train --config tiny.py --workdir DIR   (test config)
    from configs import common

    def get_config(arg=None):
      args = common.parse_args(arg, dict(variant=None, norm=None, ffn_norm=None, width=32))
      c = common.base_config()
      c.model = common.model_config(variant=None, num_classes=10, image_size=8, num_channels=1)
      common.apply_variant(c.model, common.variant_norms(args, "bn_ffnbn"))
      c.model.update(dict(hidden_size=args["width"], num_layers=2, mlp_dim=64, num_heads=2, patch_size=4))
      c.data = common.data_config(name="digits", image_size=8)
      c.data.update(dict(channels=1, cache=True, inception_crop=False, hflip=False,
                         normalize_mean=(0.5,), normalize_std=(0.5,), eval_crop_fraction=1.0))
      c.batch_size = 64
      c.num_steps = 24
      c.optim.update(dict(base_lr=3e-3, lr_scaling_batch=None, warmup_steps=3, grad_clip_norm=1.0))
      c.log_every, c.eval_every, c.checkpoint_every, c.diagnostics_every = 4, 12, 8, 6
      c.progress_bar = "off"
      c.async_checkpoints = False
      return c
''')


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "tiny.py"
  path.write_text(TINY_CONFIG)
  return str(path)


class _ThisThreadOnly(io.TextIOBase):
  """A stream that keeps what the calling thread writes and passes other threads' writes through.

  A full test run leaves background threads of earlier tests alive (checkpoint writers, loggers);
  a line one of them logs while a command runs here is not the command's output.
  """

  def __init__(self, passthrough):
    super().__init__()
    self.buffer_, self.passthrough, self.thread = io.StringIO(), passthrough, threading.get_ident()

  def write(self, text):
    if threading.get_ident() == self.thread:
      return self.buffer_.write(text)
    return self.passthrough.write(text)

  def getvalue(self):
    return self.buffer_.getvalue()


def _main(*args):
  """(exit code, stdout, stderr) of `python -m vitnorm.train ARGS`, in-process: what this thread wrote."""
  from contextlib import redirect_stderr, redirect_stdout  # pylint: disable=import-outside-toplevel
  out, err = _ThisThreadOnly(sys.stdout), _ThisThreadOnly(sys.stderr)
  with redirect_stdout(out), redirect_stderr(err):
    try:
      code = train.main(["vitnorm.train", *args])
    except SystemExit as e:
      code = e.code
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def completed(tiny, tmp_path_factory):
  """(workdir, stdout) of one completed 24-step run of the default variant (bn_ffnbn)."""
  workdir = tmp_path_factory.mktemp("completed") / "run"
  code, out, err = _main(f"--config={tiny}", f"--workdir={workdir}")
  assert code == cli.EXIT_COMPLETED, err
  return workdir, out


def _snapshot(workdir):
  """Every file under workdir with its bytes (what 'changes nothing' compares)."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


def test_help_exits_0_with_the_command_forms_configs_and_their_args():
  from configs import cifar, deit, quickstart  # pylint: disable=import-outside-toplevel
  code, out, err = _main("--help")
  assert code == 0 and not err
  assert "python -m vitnorm.train --config configs/FILE.py[:ARGS] --workdir DIR" in out
  assert "--print_config" in out and "configs/common.py" in out and "75 preempted" in out
  assert "--config.FIELD=None" in out
  for module, name in ((quickstart, "quickstart"), (cifar, "cifar"), (deit, "deit")):
    line = next(l for l in out.splitlines() if f"configs/{name}.py" in l)
    assert all(key in line for key in module.ARGS), (name, line)  # every :arg is listed


@pytest.mark.parametrize("module", ["evaluate", "benchmark"])
def test_evaluate_and_benchmark_help_exit_0(module, run_cli):
  # run_cli restores the variables the command's quiet start sets and removes the flags it defined:
  # the two CLIs share flag names (--batch_sizes).
  code, out, _ = run_cli(module, "--help")
  assert code == 0
  assert f"python -m vitnorm.{module} --" in out and "Exit codes" in out and "--batch_sizes" in out


@pytest.mark.parametrize("override, line", [
    ("--config.num_step=20", "error: config.num_step: no such config field; did you mean "
     "config.num_steps? (fields and their comments: configs/common.py)"),
    ("--config.data.cache=maybe", "error: config.data.cache: 'maybe' is not a boolean; use true or false"),
    ("--config.optim.base_lr=abc", "error: config.optim.base_lr: 'abc' is not a number; give a float "
     "(or None where the field may be None)"),
    ("--config.seed=None", "error: config.seed: cannot be None (it needs a value of type int); give a "
     "value (fields that may be None say so in configs/common.py)"),
    ("--config.num_steps=-3", "error: num_steps: must be a positive integer, got -3"),
])
def test_bad_input_is_one_clean_line_exit_2_and_no_workdir(tiny, tmp_path, override, line):
  workdir = tmp_path / "run"
  code, out, err = _main(f"--config={tiny}", f"--workdir={workdir}", override)
  assert code == 2 and err.splitlines() == [line], err
  assert "\\" not in err and "('" not in err
  assert not workdir.exists()


def test_config_file_without_get_config_says_so_in_one_line(tmp_path):
  config_file = tmp_path / "no_get_config.py"
  config_file.write_text("X = 1\n")
  code, _, err = _main(f"--config={config_file}", f"--workdir={tmp_path / 'run'}")
  assert code == 2 and err == (f"error: --config: {config_file} defines no get_config(); add `def "
                               "get_config(arg=None)` returning an ml_collections.ConfigDict (see "
                               "configs/quickstart.py)\n"), err
  assert not (tmp_path / "run").exists()


def test_variant_and_norm_together_is_refused_in_one_line(tiny, tmp_path):
  code, _, err = _main(f"--config={tiny}:variant=ln,norm=bn", f"--workdir={tmp_path / 'run'}")
  assert code == 2 and err.count("\n") == 1
  assert err.startswith("error: --config: config argument variant=ln together with norm=/ffn_norm=")
  assert not (tmp_path / "run").exists()


def test_print_config_shows_the_resolved_config_and_header_and_touches_nothing(tiny, tmp_path):
  workdir = tmp_path / "run"
  code, out, err = _main(f"--config={tiny}:norm=ln", f"--workdir={workdir}", "--print_config",
                         "--config.optim.grad_clip_norm=None", "--config.data.data_dir=none")
  assert code == 0 and not err, err
  assert "grad_clip_norm: null" in out and "data_dir: null" in out and "norm: layer" in out
  header = out.split("\n\n")[-1].splitlines()
  assert header[0] == "variant    ln (norm=layer, ffn_norm=none)"  # a bare norm=ln: no FFN norm
  assert header[1].startswith("model      2 blocks, width 32, 2 heads, patch 4, 8 px, 10 classes: ")
  assert header[2] == f"devices    {jax.device_count()} x cpu in 1 process, parallelism jit"
  assert header[3] == f"batch      global 64, per device {64 // jax.device_count()}; eval 64"
  assert header[4].startswith("length     24 steps = ")
  assert header[5] == ("lr         peak 0.003, linear warm-up 3 steps, cosine to 1e-05 at step 24; "
                       "AdamW wd 0.05, clip off")
  assert header[6] == f"workdir    {workdir} (new run)"
  assert not workdir.exists()


def test_completed_run_rerun_changes_nothing_and_extending_it_is_refused(tiny, completed, tmp_path):
  workdir, out = completed
  args = (f"--config={tiny}", f"--workdir={workdir}")
  lines = out.splitlines()
  assert lines[0] == "variant    bn_ffnbn (norm=batch, ffn_norm=batch pre_act)"  # the header comes first
  assert lines[6] == f"workdir    {workdir} (new run)"
  assert run_files.read_status(str(workdir))["status"] == "completed"
  (event_file,) = os.listdir(workdir / "tensorboard")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tags = {v.tag: v for e in tf.compat.v1.train.summary_iterator(str(workdir / "tensorboard" / event_file))
          for v in e.summary.value}
  assert "_hparams_/session_start_info" in tags  # TensorBoard's hparams tab
  assert "ffn_norm: batch" in tags["config/text_summary"].tensor.string_val[0].decode()  # the config as text
  before = _snapshot(workdir)
  code, out, err = _main(*args)
  assert code == 0 and not err
  assert out.splitlines()[0] == (f"Run already completed at step 24; nothing changed (to train longer on "
                                 f"purpose: a new --workdir with --config.init_from={workdir}).")
  assert _snapshot(workdir) == before  # no second eval row, no second TensorBoard file
  code, out, err = _main(*args, "--config.num_steps=30")
  assert code == 2 and err.count("\n") == 1
  assert err.startswith(f"error: num_steps: {workdir} finished its 24 steps; training it on to 30 would "
                        "restart its lr schedule near the peak")
  assert f"--config.init_from={workdir}" in err
  code, _, err = _main(*args, "--config.num_steps=3")
  assert code == 2 and err.startswith("error: num_steps: 3 is below step 24 of the latest checkpoint")
  assert _snapshot(workdir) == before

  # A model that does not fit the init_from weights is refused before checkpoints/ exists.
  bad = tmp_path / "bad"
  code, _, err = _main(f"--config={tiny}:width=16", f"--workdir={bad}", f"--config.init_from={workdir}")
  assert code == 2 and err.startswith("error: pretrained parameter") and err.count("\n") == 1
  assert not (bad / "checkpoints").exists()
  code, _, err = _main(f"--config={tiny}", f"--workdir={tmp_path / 'x'}",
                       f"--config.init_from={tmp_path}")
  assert code == 2 and err.startswith(f"error: init_from: {tmp_path} is a folder but not a vitnorm workdir")
  assert not (tmp_path / "x").exists()


def test_init_from_a_workdir_checkpoint_resizes_posemb_and_keeps_bn_statistics(tiny, completed):
  from vitnorm.model import vit  # pylint: disable=import-outside-toplevel
  from vitnorm.training import plan as plan_lib, state as state_lib  # pylint: disable=import-outside-toplevel
  source = completed[0]
  config, _, _, _ = train.parse(["t", f"--config={tiny}", "--workdir=unused", "--config.model.image_size=16",
                                 "--config.data.image_size=16", f"--config.init_from={source}/checkpoints/16"])
  plan = plan_lib.prepare(config)
  state = state_lib.create_train_state(plan, jax.random.key(1))
  loaded = state_lib.load_pretrained(state, config.init_from, vit.build_model(plan.config.model))
  saved, step = checkpoints.restore_variables(str(source), 16)
  assert step == 16
  kernel = lambda t: t["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"]  # noqa: E731
  np.testing.assert_array_equal(kernel(loaded.params), kernel(saved["params"]))
  assert loaded.params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 17, 32)
  jax.tree.map(np.testing.assert_array_equal, loaded.batch_stats, saved["batch_stats"])
  assert not all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(loaded.batch_stats))


def test_preempted_run_exits_75_and_says_how_to_resume(tiny, tmp_path):
  workdir = tmp_path / "run"
  code, out, _ = _main(f"--config={tiny}", f"--workdir={workdir}", "--config.debug.preempt_at_step=4")
  assert code == cli.EXIT_PREEMPTED == 75
  assert "SIGTERM received: saved a checkpoint at step 4; run the same command again to resume" in out
  assert run_files.read_status(str(workdir))["status"] == "preempted"
  code, out, _ = _main(f"--config={tiny}", f"--workdir={workdir}", "--print_config")
  assert code == 0 and f"workdir    {workdir} (resuming from step 4 of 24)" in out.splitlines()


def test_nothing_prints_before_our_own_lines_and_tensorflow_starts_without_keras(tmp_path):
  """A fresh `python -m vitnorm.data` prints only what we wrote (no TensorFlow / absl / tfds lines),
  and its TensorFlow import leaves Keras (and scikit-learn, pandas, matplotlib) out (subprocess)."""
  env = dict(os.environ, PYTHONPATH=REPO)
  for key in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "TF_USE_LEGACY_KERAS"):
    env.pop(key, None)
  loaded = tmp_path / "loaded.json"
  script = textwrap.dedent(f'''
      import json, runpy, sys
      sys.argv = ["vitnorm.data", "--data_dir", {str(tmp_path)!r}, "digits"]
      try:
        runpy.run_module("vitnorm.data", run_name="__main__", alter_sys=True)  # python -m vitnorm.data
      finally:
        json.dump(sorted({{m.split(".")[0] for m in sys.modules}}), open({str(loaded)!r}, "w"))
  ''')
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.splitlines() == [
      f"preparing digits (offline, 1,797 8x8 digits) in {tmp_path}/digits/1.0.0 ..."]
  assert proc.stdout.splitlines() == [f"digits: train 1437, test 360 examples in {tmp_path}/digits/1.0.0"]
  modules = set(json.loads(loaded.read_text()))
  assert "tensorflow" in modules and not modules & {"keras", "sklearn", "pandas", "matplotlib"}, modules


def test_training_and_evaluate_on_a_numpy_feed_never_import_tensorflow(tiny, tmp_path):
  """TensorFlow only builds tfds datasets: a run on an in-memory feed (the quickstart's default)
  trains, logs TensorBoard events and evaluates without importing it (subprocess)."""
  workdir = tmp_path / "run"
  script = textwrap.dedent(f'''
      import runpy, sys
      def run(module, *argv):
        sys.argv = [module, *argv]
        try:
          runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
          assert not e.code, (module, e.code)
      run("vitnorm.train", "--config={tiny}", "--workdir={workdir}", "--config.num_steps=4",
          "--config.data.name=numpy:digits")
      run("vitnorm.evaluate", "--workdir={workdir}", "--batch_sizes=8", "--iterations=1", "--repeats=1")
      print("loaded:", sorted({{m.split(".")[0] for m in sys.modules
                               if m.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu")}}))
  ''')
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines()[-1] == "loaded: []"
  assert os.listdir(workdir / "tensorboard") and (workdir / "evaluation.json").exists()


def test_keras_is_skipped_only_where_nothing_else_is_asked_for(monkeypatch):
  """vitnorm.cli.skip_keras_at_tensorflow_import leaves a user's TF_USE_LEGACY_KERAS, and an
  installed tf_keras (which the variable would make tf.keras), alone."""
  monkeypatch.setenv("TF_USE_LEGACY_KERAS", "0")
  assert not cli.skip_keras_at_tensorflow_import() and os.environ["TF_USE_LEGACY_KERAS"] == "0"
  monkeypatch.delenv("TF_USE_LEGACY_KERAS")
  monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object() if name == "tf_keras" else None)
  assert not cli.skip_keras_at_tensorflow_import() and "TF_USE_LEGACY_KERAS" not in os.environ
  monkeypatch.undo()
  monkeypatch.delenv("TF_USE_LEGACY_KERAS")
  monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
  assert cli.skip_keras_at_tensorflow_import() and os.environ["TF_USE_LEGACY_KERAS"] == "1"
