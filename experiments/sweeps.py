"""The paper's ablations as named sweeps, each at two scales.

A sweep is a named list of runs; a run is (name, config file with its `:args`, `--config.x=y`
overrides). The runner (`experiments.run_sweep`) trains each run in `ROOT/<sweep>/<run>` with

    python -m vitnorm.train --config CONFIG --workdir ROOT/<sweep>/<run> [--config.num_steps=N] OVERRIDES

Every ablation exists at two scales, named `<ablation>_cpu` and `<ablation>_imagenet`:

  cpu       configs/quickstart.py on the offline `mnist5k` digits: minutes per run on a 2-core CPU.
  imagenet  configs/deit.py (the DeiT recipe, 300 epochs on imagenet2012): for GPU/TPU hosts.

The ablations (Yao et al. 2021, "Leveraging Batch Normalization for Vision Transformers"):

  norm_variants    LN; BN everywhere (the paper: training crashes); BN + FFN-BN (the paper's fix);
                   LN + FFN-BN; RMSNorm; no norm at all; DyT (norm-free Dynamic Tanh); PRepBN
                   (SLAB's progressive LN -> RepBN, folds at inference); BN + QK-norm (is it the
                   attention logits that blow up without LN?).
  ffn_position     where the FFN BN sits: after the first Dense (pre_act, before GELU) or after GELU.
  bn_sync          BN statistics over the whole global batch (synchronised across devices) vs ghost
                   batches (per-device statistics, as PyTorch DDP without SyncBN) of smaller sizes.
  bn_momentum      decay of the running averages used at inference (Flax convention: 0.9 = PyTorch 0.1).
  bn_epsilon       the BN epsilon.
  bn_cls           the CLS token inside vs outside the BN statistics.
  lr_stress        LN vs BN vs BN + FFN-BN under 4x the learning rate and no gradient clipping.
  inference_speed  `python -m vitnorm.benchmark`: LN vs BN folded vs BN unfolded vs no-norm (and
                   DyT, PRepBN folded), img/s, at several batch sizes, with an A/A pair (two
                   identical programs) as the noise floor.
  stability        a map of where each variant fails: peak learning rate x variant x seed, short runs
                   (ImageNet only; at CPU scale the crash study below replaces it).
  stability_harsh  the same map under a recipe built to provoke the paper's crash: 12 blocks, no
                   warm-up, no gradient clipping, larger learning rates (ImageNet only).

The crash study (CPU only, `crash_*`, see CRASH STUDY below and experiments/README.md):
learning-rate sensitivity sweeps (kind 'sensitivity') over {LN, BN} x {FFN-BN} x {QK-norm} in
fp32, LN / BN / BN + FFN-BN / BN + QK-norm in fp16 as under autocast, and 4 / 8 / 12 blocks in
fp16; then `crash_accuracy_cpu` (kind 'accuracy'): each fp32 variant at its own best lr.

Seeds are a sweep dimension: a sweep may declare its own (`Sweep.seeds`) and `run_sweep --seeds 0,1,2`
sets them; every run is then repeated once per seed as `<run>_seed<k>` (its `group` is `<run>`),
and the report aggregates each group (mean, standard deviation, n, 95% interval of the mean).

The BN knob sweeps vary one knob of the paper's model (BN + FFN-BN, pre_act) and keep the rest.
This module only describes commands; it imports nothing heavy (no JAX).
"""
import dataclasses
import math
import re
from typing import Optional, Tuple

from vitnorm.errors import UserError

SCALES = ("cpu", "imagenet")

# Config file (with its `:args` prefix) for each scale; `{norm}` / `{ffn_norm}` are the short
# names the configs accept (ln | bn | rms | none | dyt | prepbn).
CONFIG_TEMPLATES = {
    # feed=tfds: the CPU tables in experiments/results were trained through tf.data (the
    # quickstart's default feed is now the in-memory one); these commands reproduce them.
    "cpu": "configs/quickstart.py:norm={norm},ffn_norm={ffn_norm},feed=tfds",
    # DeiT-Ti is the size of the public reproduction (LN 71.89, BN 68.70, BN + FFN-BN 69.04).
    "imagenet": "configs/deit.py:variant=Ti/16,norm={norm},ffn_norm={ffn_norm}",
}

# Arguments of `python -m vitnorm.evaluate --workdir D` after training (runner's --evaluate).
EVALUATE_ARGS = {
    "cpu": ("--batch_sizes=64",),
    "imagenet": ("--batch_sizes=64,256",),
}


# How often the short CPU runs log, evaluate and record the per-block diagnostics, so the report's
# curves have points: about 50 train-loss points, 10 evaluations and 50 diagnostics per run.
# Without --num_steps the quickstart's own length applies (100 epochs of 4,000 images at batch 64:
# 6,250 steps); the intervals are then set for that length.
_CPU_DEFAULT_STEPS = 6250


def logging_overrides(scale: str, num_steps: Optional[int]) -> Tuple[Tuple[str, str], ...]:
  """(field, value) overrides of log_every / eval_every / diagnostics_every for a run's length.

  The imagenet configs keep their own intervals.
  """
  if scale != "cpu":
    return ()
  n = num_steps or _CPU_DEFAULT_STEPS
  return (("log_every", str(max(1, min(25, n // 50)))),
          ("eval_every", str(max(1, n // 10))),
          ("diagnostics_every", str(max(1, n // 50))))


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep."""

  name: str  # Directory name under ROOT/<sweep>/ and the row label in the report.
  config: str  # Config file with its :args, e.g. 'configs/quickstart.py:norm=bn,ffn_norm=bn'.
  overrides: Tuple[Tuple[str, str], ...] = ()  # (field, value) pairs -> --config.field=value.
  note: str = ""  # What this run stands for in the sweep's question.
  group: str = ""  # The variant this run is a seed of ('' = the run is its own group).
  seed: Optional[int] = None  # config.seed of this run (None: the config's own seed).

  @property
  def variant(self) -> str:
    """The row label the report aggregates over seeds: the group, else the run's name."""
    return self.group or self.name

  def override_flags(self):
    """The overrides as command-line flags: ['--config.model.bn_momentum=0.99', ...]."""
    return [f"--config.{field}={value}" for field, value in self.overrides]


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A named ablation: the question it asks and the runs that answer it."""

  name: str  # '<ablation>_<scale>', e.g. 'norm_variants_cpu'.
  scale: str  # 'cpu' or 'imagenet'.
  question: str  # What the sweep asks, one sentence (shown by --dry_run and the report).
  runs: Tuple[Run, ...] = ()  # Training runs (empty for a benchmark sweep).
  benchmark_args: Optional[Tuple[str, ...]] = None  # Set: a `python -m vitnorm.benchmark` sweep.
  evaluate_args: Tuple[str, ...] = ()  # Arguments of the optional evaluate command.
  seeds: Tuple[int, ...] = ()  # Declared seeds: each run is repeated per seed (run_sweep --seeds overrides).
  num_steps: Optional[int] = None  # Default training steps of every run (run_sweep --num_steps overrides).
  kind: str = "table"  # 'table': a row per variant; 'sensitivity' / 'accuracy': the crash study
  #                      (CRASH STUDY below; an 'accuracy' sweep's runs come from its best lrs).
  reference: str = "ln"  # The row a seeded table's paired differences are taken against.

  @property
  def is_benchmark(self) -> bool:
    return self.benchmark_args is not None


def _config(scale, norm, ffn_norm):
  return CONFIG_TEMPLATES[scale].format(norm=norm, ffn_norm=ffn_norm)


def _run(scale, name, norm, ffn_norm, overrides=(), note=""):
  return Run(name, _config(scale, norm, ffn_norm), tuple((k, str(v)) for k, v in overrides), note)


# The paper's model: BN everywhere plus a BN inside the FFN (pre_act: after Dense_0, before GELU).
def _paper_model(scale, name, overrides=(), note=""):
  return _run(scale, name, "bn", "bn", overrides, note)


# The normalization variants the study compares: name -> (norm, ffn_norm, extra overrides, note).
VARIANTS = {
    "ln": ("ln", "none", (), "the standard ViT"),
    "bn": ("bn", "none", (), "BN replaces every LN (the paper: crashes)"),
    "bn_ffnbn": ("bn", "bn", (), "the paper's fix: BN + a BN inside the FFN"),
    "ln_ffnbn": ("ln", "bn", (), "LN + a BN inside the FFN"),
    "rms": ("rms", "none", (), "RMSNorm everywhere"),
    "none": ("none", "none", (), "no norm at all"),
    "dyt": ("dyt", "none", (), "Dynamic Tanh in place of every LN (Zhu et al. 2025)"),
    "prepbn": ("prepbn", "none", (), "SLAB: LN progressively replaced by RepBN (lam 1 -> 0 by the end), folded at inference"),
    "bn_qknorm": ("bn", "none", (("model.qk_norm", "layer"),),
                  "BN everywhere + LayerNorm on queries and keys (ViT-22B's QK-norm)"),
}


# The CPU tables (norm variants and the BN knobs): 3 seeds of 2,000 steps (32 epochs), so a
# difference between rows comes with its interval; ImageNet keeps one run of the config's length.
_TABLE_SEEDS = {"cpu": (0, 1, 2), "imagenet": ()}
_TABLE_STEPS = {"cpu": 2000, "imagenet": None}


def _table(scale):
  """The seeds and length of a CPU table sweep (Sweep keyword arguments)."""
  return dict(seeds=_TABLE_SEEDS[scale], num_steps=_TABLE_STEPS[scale], evaluate_args=EVALUATE_ARGS[scale])


def _variant_run(scale, name, overrides=(), note_suffix=""):
  norm, ffn_norm, extra, note = VARIANTS[name]
  return _run(scale, name, norm, ffn_norm, tuple(extra) + tuple(overrides), note + note_suffix)


def _norm_variants(scale):
  return Sweep(
      f"norm_variants_{scale}", scale,
      "Does BN everywhere crash, does a BN inside the FFN fix it, and how do the BN models compare "
      "with LN, RMSNorm, no norm, DyT, PRepBN and BN + QK-norm?",
      tuple(_variant_run(scale, name) for name in VARIANTS),
      # CPU: sized for 45 minutes on an idle 2-core machine (the quickstart trains at about 1,900
      # img/s there, experiments/results/speed_cpu/); the machine time a sweep really took is in
      # its results' summary.json ("wall_minutes").
      **_table(scale))


# The stability maps (the criterion is fixed before the runs and printed in the report):
#   crashed          the trainer stopped the run as diverged: a non-finite loss or gradient, or the
#                    loss-spike detector (config.loss_spike_factor) fired;
#   failed to learn  the run completed but its final eval top-1 is below FAILED_TO_LEARN_TOP1;
#   trained          otherwise.
FAILED_TO_LEARN_TOP1 = 0.5
STABILITY_LRS = {"cpu": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2), "imagenet": (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)}
HARSH_LRS = {"cpu": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "imagenet": (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)}
# The harsh map's rows: the paper's three, SLAB's PRepBN, and QK-norm (does normalizing the
# attention logits keep BN-only alive?). 5 x 5 x 2 runs of 12 blocks, sized like norm_variants above.
HARSH_VARIANTS = ("ln", "bn", "bn_ffnbn", "prepbn", "bn_qknorm")
# Short runs: the map asks whether a variant trains at a learning rate, not how well it ends.
# ImageNet: 30 epochs (15 for the harsh map) of DeiT's batch 1024 instead of 300; a crash in
# the paper's sense comes early, and 90 runs of 300 epochs would cost as much as 90 DeiT papers.
IMAGENET_TRAIN_IMAGES = 1_281_167  # imagenet2012 'train' split
IMAGENET_BATCH = 1024  # configs/deit.py's default global batch


def imagenet_steps(epochs: float) -> int:
  return math.ceil(epochs * IMAGENET_TRAIN_IMAGES / IMAGENET_BATCH)


_STABILITY_STEPS = {"cpu": 400, "imagenet": imagenet_steps(30)}
_HARSH_STEPS = {"cpu": 250, "imagenet": imagenet_steps(15)}


def _lr_name(lr: float) -> str:
  """3e-4 -> 'lr3e-4', 2.5e-4 -> 'lr2.5e-4'."""
  mantissa, exponent = f"{lr:e}".split("e")
  return f"lr{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _stability(scale):
  runs = tuple(dataclasses.replace(
      _variant_run(scale, name, (("optim.base_lr", lr),), f", peak lr {lr:g}"),
      name=f"{name}_{_lr_name(lr)}", group="") for name in VARIANTS for lr in STABILITY_LRS[scale])
  return Sweep(f"stability_{scale}", scale,
               "Where does each variant fail? Peak learning rate x variant x seed, with the failure "
               "criterion fixed before the runs.", runs, seeds=(0, 1),
               num_steps=_STABILITY_STEPS[scale], kind="stability")


# The harsh recipe: 12 blocks, no warm-up, no gradient clipping (grad_clip_norm=None removes the
# clipping transform), and learning rates up to 50x the quickstart's.
_HARSH = (("model.num_layers", 12), ("optim.warmup_steps", 0), ("optim.grad_clip_norm", None))
# 12 blocks cost 3x a step: evaluate 5 times and record the diagnostics 25 times per 250-step run.
_HARSH_LOGGING = {"cpu": (("eval_every", 50), ("diagnostics_every", 10)), "imagenet": ()}


def _stability_harsh(scale):
  pairs = [(name, lr) for name in HARSH_VARIANTS for lr in HARSH_LRS[scale]]
  runs = tuple(dataclasses.replace(
      _variant_run(scale, name, _HARSH + _HARSH_LOGGING[scale] + (("optim.base_lr", lr),),
                   f", harsh recipe, peak lr {lr:g}"), name=f"{name}_{_lr_name(lr)}")
      for name, lr in pairs)
  return Sweep(f"stability_harsh_{scale}", scale,
               "Under a recipe built to provoke the paper's crash (12 blocks, no warm-up, no gradient "
               "clipping, large learning rates), does BN everywhere crash, and do FFN-BN, PRepBN or "
               "QK-norm move the boundary?", runs, seeds=(0, 1), num_steps=_HARSH_STEPS[scale],
               kind="stability")


def stability_lr(run: Run) -> Optional[float]:
  """The peak learning rate a stability run was given (None for other runs)."""
  for field, value in run.overrides:
    if field == "optim.base_lr":
      return float(value)
  return None


def with_seeds(sweep: Sweep, seeds: Optional[Tuple[int, ...]] = None) -> Sweep:
  """The sweep with every run repeated once per seed (`seeds`, else the sweep's declared ones).

  Run k of seed s is named '<run>_seed<s>', its group is '<run>' and it gets --config.seed=s.
  No seeds at all: the sweep as it is (each run trains with its config's own seed).
  """
  seeds = tuple(sweep.seeds if seeds is None else seeds)
  if not seeds or sweep.is_benchmark:
    return sweep
  if len(set(seeds)) != len(seeds) or any(int(s) < 0 for s in seeds):
    raise UserError(f"--seeds: {','.join(map(str, seeds))} must be distinct non-negative integers")
  runs = tuple(dataclasses.replace(run, name=f"{run.name}_seed{s}", group=run.name, seed=int(s),
                                   overrides=tuple(run.overrides) + (("seed", str(int(s))),))
               for run in sweep.runs for s in seeds)
  return dataclasses.replace(sweep, runs=runs, seeds=seeds)


def _ffn_position(scale):
  runs = []
  for norm in ("bn", "ln"):
    for position in ("pre_act", "post_act"):
      runs.append(_run(scale, f"{norm}_ffnbn_{position}", norm, "bn",
                       [("model.ffn_norm_position", position)],
                       note=f"{norm.upper()} + FFN BN {'before' if position == 'pre_act' else 'after'} GELU"))
  return Sweep(f"ffn_position_{scale}", scale,
               "Should the FFN BN sit after the first Dense (before GELU) or after GELU?",
               tuple(runs), reference="bn_ffnbn_pre_act", **_table(scale))


# Ghost-batch sizes: the per-device batch of a typical multi-device run, and a smaller one.
# cpu: quickstart batch 64 on 2 CPU devices (32 each); imagenet: DeiT's 1024 over 8 GPUs (128 each).
_GHOST_SIZES = {"cpu": (32, 8), "imagenet": (128, 32)}
_MOMENTA = {"cpu": (0.5, 0.9, 0.99), "imagenet": (0.9, 0.99, 0.999)}
_EPSILONS = (1e-5, 1e-3, 1e-1)


def _bn_sync(scale):
  runs = [_paper_model(scale, "global", note="statistics over the whole global batch (synced)")]
  for size in _GHOST_SIZES[scale]:
    runs.append(_paper_model(scale, f"ghost_{size}", [("model.bn_group_size", size)],
                             note=f"ghost batches of {size} examples (per-device statistics)"))
  return Sweep(f"bn_sync_{scale}", scale,
               "Do BN statistics need cross-device synchronisation, or do per-device ghost batches do "
               "as well (or better)?", tuple(runs), reference="global", **_table(scale))


def _bn_momentum(scale):
  runs = tuple(_paper_model(scale, f"momentum_{m:g}", [("model.bn_momentum", m)],
                            note=f"running averages decay {m:g} per step")
               for m in _MOMENTA[scale])
  return Sweep(f"bn_momentum_{scale}", scale,
               "How much does the BN running-average momentum (the inference statistics) matter?",
               runs, reference="momentum_0.9", **_table(scale))  # configs/common.py's default


def _bn_epsilon(scale):
  runs = tuple(_paper_model(scale, f"epsilon_{e:g}", [("model.bn_epsilon", e)],
                            note=f"BN epsilon {e:g}") for e in _EPSILONS)
  return Sweep(f"bn_epsilon_{scale}", scale, "Does the BN epsilon change stability or accuracy?",
               runs, reference="epsilon_1e-05", **_table(scale))  # configs/common.py's default


def _bn_cls(scale):
  token = ("model.classifier", "token")  # the CLS knob needs a CLS token
  runs = (
      _paper_model(scale, "cls_in", [token, ("model.bn_include_cls", True)],
                   note="CLS token inside the BN statistics (the reproduction's choice)"),
      _paper_model(scale, "cls_out", [token, ("model.bn_include_cls", False)],
                   note="CLS token normalized with the patch tokens' statistics only"),
  )
  return Sweep(f"bn_cls_{scale}", scale,
               "Should the CLS token take part in the BN statistics?", runs, reference="cls_in",
               **_table(scale))


# A harsher recipe than the config's: 4x its peak learning rate and no gradient clipping (a clip
# norm of 1e9 never triggers), where an un-normalized FFN has the most room to blow up.
_STRESS_LR = {"cpu": 8e-3, "imagenet": 2e-3}  # quickstart 2e-3; DeiT 5e-4 per 512 images


def _lr_stress(scale):
  harsh = (("optim.base_lr", _STRESS_LR[scale]), ("optim.grad_clip_norm", None))
  return Sweep(
      f"lr_stress_{scale}", scale,
      "Under a harsher recipe (4x the peak learning rate, no gradient clipping), does BN everywhere "
      "crash where LN and BN + FFN-BN keep training?",
      (
          _run(scale, "ln", "ln", "none", harsh, note="LN, harsh recipe"),
          _run(scale, "bn", "bn", "none", harsh, note="BN everywhere, harsh recipe"),
          _run(scale, "bn_ffnbn", "bn", "bn", harsh, note="BN + FFN-BN, harsh recipe"),
      ),
      evaluate_args=EVALUATE_ARGS[scale])


# `python -m vitnorm.benchmark`: the paper's inference comparison (LN, BN folded / unfolded,
# BN + FFN-BN folded, no norm, DyT, PRepBN folded), measured interleaved in one process, plus
# `none_aa`, a second copy of the no-norm program: its ratio to `none` is the A/A line, the
# noise floor of the measurement.
_BENCHMARK_MODELS = ("--models=ln,bn_folded,bn_unfolded,bn_ffnbn_folded,none,dyt,prepbn_folded,"
                     "none_aa")
_BENCHMARK_ARGS = {
    # Three batch sizes: on this CPU LN's cost grows with the batch as activations leave the cache.
    "cpu": ("--variant=S/16", "--image_size=224", "--batch_sizes=8,64,128", "--iterations=3",
            "--repeats=5", _BENCHMARK_MODELS),
    "imagenet": ("--variant=S/16", "--image_size=224", "--batch_sizes=64,256", "--iterations=50",
                 "--repeats=5", _BENCHMARK_MODELS),
}


def _inference_speed(scale):
  return Sweep(f"inference_speed_{scale}", scale,
               "Is a BN ViT with BN folded into the Dense layers faster at inference than the LN ViT "
               "(the paper: about 20%), and does it reach the no-norm floor?",
               benchmark_args=_BENCHMARK_ARGS[scale])


# ----------------------------------------------------------------------------------------------
# CRASH STUDY (issue 21): why did the BN-only ViT crash in the paper? Learning-rate sensitivity in
# the style of Wortsman et al. 2023 across precision, depth and the FFN-BN x QK-norm factorial,
# then accuracy at each variant's own best learning rate. CPU scale only: configs/quickstart.py
# on mnist5k through the NumPy feed. The outcome criterion, the sensitivity number and the
# accuracy statistics are fixed before the runs in experiments.study.
# ----------------------------------------------------------------------------------------------

# name -> (norm, ffn_norm, qk_norm): the {LN, BN} x {FFN-BN off, on} x {QK-norm off, on} factorial.
CRASH_VARIANTS = {
    "ln": ("ln", "none", "none"),
    "bn": ("bn", "none", "none"),
    "ln_ffnbn": ("ln", "bn", "none"),
    "bn_ffnbn": ("bn", "bn", "none"),
    "ln_qknorm": ("ln", "none", "layer"),
    "bn_qknorm": ("bn", "none", "layer"),
    "ln_ffnbn_qknorm": ("ln", "bn", "layer"),
    "bn_ffnbn_qknorm": ("bn", "bn", "layer"),
}
# Peak learning rates: 7 values, half a decade apart, 1e-4 to 1e-1.
SENSITIVITY_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SENSITIVITY_STEPS = 1500  # 24 epochs (the old maps: 250-400 steps), so the slow edge has time to train
SENSITIVITY_SEEDS = (0, 1)
ACCURACY_SEEDS = (0, 1, 2, 3, 4)
# DeiT's head dimension, 64 (the unscaled q.k that must fit float16 grows with it; the quickstart's
# is 16): width 64 in one head, the quickstart's cost. FFN width 2x as in the quickstart.
CRASH_MODEL = (("model.hidden_size", 64), ("model.num_heads", 1), ("model.mlp_dim", 128))
# Seeds of the depth arm's 8- and 12-block runs: one, so that the whole study fits its 4-hour
# budget (experiments/README.md, "The crash study"); its 4-block point has the factorial's two.
DEPTH_SEEDS = (0,)
# No clipping (Wortsman et al.), no loss-spike detector (the criterion reads the loss itself), the
# quickstart's warm-up (2 epochs = 125 steps) and cosine schedule. One CPU device per run, so
# every run computes the same way whether it trains alone or beside another sweep's run on the
# other core (experiments/crash_study.py); 5 evaluations (with the BN batch-statistics twin).
CRASH_RECIPE = (("optim.grad_clip_norm", None), ("loss_spike_factor", 0), ("num_cpu_devices", 1),
                ("eval_every", SENSITIVITY_STEPS // 5))
# Both precisions compute the attention as timm's 2021 Attention under autocast: q.k in the
# compute dtype, 1/sqrt(head_dim) applied to the product; float32 vs float16 is the only difference.
PRECISIONS = {
    "fp32": (("model.dtype", "float32"), ("model.attention_logits", "compute"),
             ("model.attention_scale", "product")),
    "fp16": (("model.dtype", "float16"), ("model.attention_logits", "compute"),
             ("model.attention_scale", "product")),
}
CRASH_CONFIG = "configs/quickstart.py:norm={norm},ffn_norm={ffn_norm},feed=numpy"
_ARM_NAME = re.compile(r"^(?P<variant>[a-z_]+?)_(?P<precision>fp16|fp32)_d(?P<depth>\d+)$")


def crash_arm(variant: str, precision: str, depth: int) -> str:
  """The label of one model configuration of the study: 'bn_ffnbn_fp16_d8'."""
  return f"{variant}_{precision}_d{depth}"


def parse_crash_arm(label: str) -> Optional[dict]:
  """'bn_ffnbn_fp16_d8' -> {variant: 'bn_ffnbn', precision: 'fp16', depth: 8}; None otherwise.
  A run name ('..._lr1e-3') or a seed's name ('..._lr1e-3_seed0') gives its arm and `lr` too."""
  label = re.sub(r"_seed\d+$", "", label)
  base, sep, lr = label.rpartition("_lr")
  m = _ARM_NAME.match(base if sep else label)
  if not m or m.group("variant") not in CRASH_VARIANTS:
    return None
  out = dict(variant=m.group("variant"), precision=m.group("precision"), depth=int(m.group("depth")),
             arm=m.group(0))
  if sep:
    try:
      out["lr"] = float(lr)
    except ValueError:
      return None
  return out


def crash_run(variant: str, precision: str, depth: int, lr: float) -> Run:
  """One run of the crash study: the variant in that precision and depth at peak lr `lr`."""
  norm, ffn_norm, qk_norm = CRASH_VARIANTS[variant]
  overrides = (CRASH_MODEL + (("model.num_layers", depth), ("model.qk_norm", qk_norm))
               + PRECISIONS[precision] + CRASH_RECIPE + (("optim.base_lr", lr),))
  return Run(f"{crash_arm(variant, precision, depth)}_{_lr_name(lr)}",
             CRASH_CONFIG.format(norm=norm, ffn_norm=ffn_norm),
             tuple((k, str(v)) for k, v in overrides),
             note=f"{variant}, {precision}, {depth} blocks, peak lr {lr:g}")


def _sensitivity(name, question, arms):
  """A learning-rate sensitivity sweep over (variant, precision, depth) arms."""
  runs = tuple(crash_run(v, p, d, lr) for v, p, d in arms for lr in SENSITIVITY_LRS)
  seeds = DEPTH_SEEDS if all(d != 4 for _, _, d in arms) else SENSITIVITY_SEEDS
  return Sweep(name, "cpu", question, runs, seeds=seeds, num_steps=SENSITIVITY_STEPS,
               kind="sensitivity")


_NO_QK = ("ln", "bn", "ln_ffnbn", "bn_ffnbn")
_QK = ("ln_qknorm", "bn_qknorm", "ln_ffnbn_qknorm", "bn_ffnbn_qknorm")

# The sensitivity sweeps, in the order to run them (most decisive first); each resumes on its own
# and is sized to <= 90 minutes of a quiet 2-core machine by the pilot-based estimate in
# experiments/README.md ("The crash study"), which also gives each one's estimate.
SENSITIVITY_SWEEPS = (
    ("crash_fp16_cpu",
     "fp16 as under autocast (q.k and the FFN in float16, scale on the product, dynamic loss "
     "scale), 4 blocks: does BN everywhere crash where LN does not?",
     [(v, "fp16", 4) for v in ("ln", "bn")]),
    ("crash_fp16_fixes_cpu",
     "fp16, 4 blocks: do an FFN BN or QK-norm keep BN everywhere from crashing?",
     [(v, "fp16", 4) for v in ("bn_ffnbn", "bn_qknorm")]),
    ("crash_fp32_cpu",
     "fp32, 4 blocks: final train loss against peak lr for LN, BN, LN + FFN-BN, BN + FFN-BN (the "
     "factorial without QK-norm; the fp32 counterparts of the fp16 sweeps)",
     [(v, "fp32", 4) for v in _NO_QK]),
    ("crash_fp32_qknorm_cpu",
     "fp32, 4 blocks: the same with QK-norm (LN + QK-norm is the control Wortsman et al. call for)",
     [(v, "fp32", 4) for v in _QK]),
    ("crash_depth8_fp16_cpu", "fp16, 8 blocks, LN and BN: does the BN-vs-LN gap grow with depth?",
     [(v, "fp16", 8) for v in ("ln", "bn")]),
    ("crash_depth8_ffnbn_fp16_cpu", "fp16, 8 blocks, BN + FFN-BN", [("bn_ffnbn", "fp16", 8)]),
    ("crash_depth12_ln_fp16_cpu", "fp16, 12 blocks, LN", [("ln", "fp16", 12)]),
    ("crash_depth12_bn_fp16_cpu", "fp16, 12 blocks, BN", [("bn", "fp16", 12)]),
    ("crash_depth12_ffnbn_fp16_cpu", "fp16, 12 blocks, BN + FFN-BN", [("bn_ffnbn", "fp16", 12)]),
)

# The accuracy sweep: every fp32 variant of the factorial at its own best lr (the lowest mean
# final train loss among the lrs where every seed trained, read from the sensitivity sweeps'
# generated summary.json), 5 seeds of the same length.
ACCURACY_SWEEP = "crash_accuracy_cpu"
ACCURACY_ARMS = tuple(crash_arm(v, "fp32", 4) for v in CRASH_VARIANTS)
ACCURACY_SOURCES = ("crash_fp32_cpu", "crash_fp32_qknorm_cpu")  # where their best lrs come from
BEST_LRS = "best_lrs.json"  # ROOT/crash_accuracy_cpu/best_lrs.json: the lrs the sweep was started with


def accuracy_runs(best_lrs: dict) -> Tuple[Run, ...]:
  """The accuracy sweep's runs, given {arm: best lr} (every arm of ACCURACY_ARMS)."""
  missing = [a for a in ACCURACY_ARMS if best_lrs.get(a) is None]
  if missing:
    raise UserError(f"--best_lrs: no best learning rate for {', '.join(missing)}: every seed of some "
                    "lr of each must have trained in its sensitivity sweep (see the report)")
  runs = []
  for arm in ACCURACY_ARMS:
    a = parse_crash_arm(arm)
    run = crash_run(a["variant"], a["precision"], a["depth"], float(best_lrs[arm]))
    runs.append(dataclasses.replace(run, name=arm, note=run.note + " (its best lr)"))
  return tuple(runs)


def _crash_study():
  for name, question, arms in SENSITIVITY_SWEEPS:
    yield _sensitivity(name, question, arms)
  yield Sweep(ACCURACY_SWEEP, "cpu",
              "Each fp32 variant at its own best learning rate, 5 seeds: is it non-inferior to LN "
              "(margin experiments.study.NONINFERIORITY_MARGIN)?", (), seeds=ACCURACY_SEEDS,
              num_steps=SENSITIVITY_STEPS, evaluate_args=EVALUATE_ARGS["cpu"], kind="accuracy")


_ABLATIONS = (_norm_variants, _ffn_position, _bn_sync, _bn_momentum, _bn_epsilon, _bn_cls,
              _lr_stress, _inference_speed)
# The stability maps judged runs by top-1 after 250-400 steps (speed, not stability) and ran in
# fp32 only; at CPU scale the crash study replaces them. The ImageNet maps stay as commands.
_IMAGENET_ONLY = (_stability, _stability_harsh)

SWEEPS = {s.name: s for s in (make(scale) for scale in SCALES for make in _ABLATIONS)}
SWEEPS.update((s.name, s) for s in (make("imagenet") for make in _IMAGENET_ONLY))
SWEEPS.update((s.name, s) for s in _crash_study())


def get_sweep(name: str) -> Sweep:
  """The sweep called `name`; a UserError listing the valid names otherwise."""
  if name not in SWEEPS:
    raise UserError(f"--sweep: unknown sweep {name!r}; choose one of {', '.join(SWEEPS)}")
  return SWEEPS[name]
