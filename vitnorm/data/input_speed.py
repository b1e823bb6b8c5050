"""Host speed of the training input pipeline: `python -m vitnorm.benchmark --mode input`.

What is timed: `vitnorm.data.pipeline.train_dataset` itself, the trainer's feed (decode -> crop ->
flip -> RandAugment -> normalize -> erasing -> Mixup/CutMix + label smoothing -> batch), iterated
as numpy batches exactly as the trainer takes them, over JPEGs at ImageNet sizes and quality
(`vitnorm.data.imagenet_like`, written once into a temporary or given directory). The recipe is
configs/deit.py's data config (the DeiT recipe) at --image_size.

Variants: the full recipe, an A/A copy of it (the same pipeline built again: the ratio of the two
is the noise of the measurement), and the recipe with one stage switched off at a time:
  no_crop         the inception crop replaced by resize-shorter-side + centre crop (eval style;
                  decoding must still produce an image_size crop)
  no_flip, no_randaugment, no_erasing
  no_mix          Mixup, CutMix and label smoothing off (one-hot targets)
  decode_crop     every augmentation off: decode + inception crop + normalize + batch, the floor
                  of the tf.data feed
  deit_device     the tf.data feed with data.augment_on_device: the host stops after decode + crop +
                  RandAugment and ships uint8; flip, normalization, erasing and mixing run on the
                  accelerator
  grain           the Grain feed (data.reader='grain', vitnorm.data.grain_feed) on the same JPEGs
                  as ArrayRecord, same recipe: the host's whole share there is decode + inception
                  crop + RandAugment (PIL) + batch (uint8); flip, erasing, normalization, Mixup /
                  CutMix and label smoothing run on the accelerator
  grain_no_randaugment  the same without RandAugment: decode + crop, the Grain feed's floor
Normalization and batching cannot be switched off (they make the batch); their cost is inside
decode_crop. Each stage's cost is cost(full) - cost(full without it), in core-milliseconds per image.

Threads: each value of `threads` is one group. tf.data runs the group's pipelines on a private
thread pool of that many threads (`threading.private_threadpool_size`; 1 = one core) and no op
uses intra-op parallelism, so threads=1 gives the per-core rate and threads=cpu_count the whole
host; the Grain feed reads with that many threads (`grain.ReadOptions(num_threads=...)`; PIL
releases the GIL while decoding and resizing). Per core = images/s / threads.

Rounds: within a group the variants are timed interleaved (A B C ... A B C ...), `repeats` rounds,
so machine drift hits all alike. Each timing builds a fresh iterator (no variant profits from
batches another left buffered), discards `warmup` batches (start-up, tf.data autotuning), then
times `iterations` batches: the producer is the bottleneck, so its prefetch buffer stays empty and
the clock measures the pipeline's steady rate.
"""
import contextlib
import gc
import os
import statistics
import tempfile
import time
from typing import Callable, Optional, Sequence

from vitnorm.errors import ConfigError

FULL, AA_COPY = "deit", "deit_aa"
# variant -> data config overrides of the DeiT recipe
VARIANTS = {
    FULL: {},
    AA_COPY: {},
    "no_crop": dict(inception_crop=False),
    "no_flip": dict(hflip=False),
    "no_randaugment": dict(randaugment_layers=0),
    "no_erasing": dict(random_erasing_prob=0.0),
    "no_mix": dict(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0),
    "decode_crop": dict(hflip=False, randaugment_layers=0, random_erasing_prob=0.0, mixup_alpha=0.0,
                        cutmix_alpha=0.0, label_smoothing=0.0),
    "deit_device": dict(augment_on_device=True),
    "grain": dict(reader="grain"),
    "grain_no_randaugment": dict(reader="grain", randaugment_layers=0),
}
GRAIN = "grain"
NUM_CLASSES = 1000  # ImageNet's: the width of the mixed targets


def deit_data_config(name: str, data_dir: str, image_size: int, **overrides):
  """configs/deit.py's data config on another dataset and image size."""
  from configs import deit  # pylint: disable=import-outside-toplevel
  data = deit.get_config().data
  data.name, data.data_dir, data.image_size, data.train_split = name, data_dir, image_size, "train"
  data.update(overrides)
  return data


def parse_threads(values: Sequence[str]) -> list:
  """'1', '4', 'all' -> thread counts ('all' = os.cpu_count())."""
  out = []
  for value in values:
    value = str(value).strip()
    if value == "all":
      out.append(os.cpu_count() or 1)
      continue
    try:
      count = int(value)
    except ValueError:
      count = 0
    if count < 1:
      raise ConfigError("--input_threads", f"{value!r} is not a positive integer or 'all'")
    out.append(count)
  if not out:
    raise ConfigError("--input_threads", "is empty; e.g. 1,all")
  return list(dict.fromkeys(out))


def _check_variants(names):
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise ConfigError("--models", f"unknown input variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
  if not names:
    raise ConfigError("--models", "is empty; name at least one input variant")
  return list(names)


@contextlib.contextmanager
def _dataset_dir(data_dir: Optional[str]):
  if data_dir:
    yield data_dir
  else:
    with tempfile.TemporaryDirectory(prefix="vitnorm_input_") as tmp:
      yield tmp


def _iterator(data_cfg, threads, batch_size, seed):
  if data_cfg.reader == GRAIN:
    from vitnorm.data import grain_feed  # pylint: disable=import-outside-toplevel
    return grain_feed.train_batches(data_cfg, global_batch_size=batch_size, seed=seed,
                                    process_index=0, process_count=1, read_threads=threads)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from vitnorm.data import pipeline  # pylint: disable=import-outside-toplevel
  ds = pipeline.train_dataset(data_cfg, global_batch_size=batch_size, seed=seed,
                              num_classes=NUM_CLASSES, process_index=0, process_count=1)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  return ds.with_options(options).as_numpy_iterator()


def _time_variant(data_cfg, threads, batch_size, warmup, iterations, seed) -> float:
  """Seconds for `iterations` batches of a fresh iterator after `warmup` untimed ones."""
  iterator = _iterator(data_cfg, threads, batch_size, seed)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(iterations):
    next(iterator)
  seconds = time.perf_counter() - start
  if hasattr(iterator, "close"):  # Grain's iterators stop their reader threads (and workers)
    iterator.close()
  del iterator
  gc.collect()  # the iterator's threads stop before the next variant starts
  return seconds


def run_input_benchmark(*, image_size: int = 224, batch_size: int = 64, threads: Sequence[int] = (1,),
                        variants: Optional[Sequence[str]] = None, dataset: str = "bench",
                        data_dir: Optional[str] = None, warmup: int = 2, iterations: int = 5,
                        repeats: int = 3, seed: int = 0, log: Callable[[str], None] = print) -> dict:
  """Images/s of each variant for each thread count; see the module docstring."""
  from vitnorm.data import imagenet_like  # pylint: disable=import-outside-toplevel
  names = _check_variants(list(variants or VARIANTS))
  if iterations < 1 or repeats < 1 or warmup < 0:
    raise ConfigError("--iterations", f"need iterations >= 1, repeats >= 1, warmup >= 0; got "
                      f"{iterations}, {repeats}, {warmup}")
  if batch_size < 1:
    raise ConfigError("--batch_sizes", f"must be positive, got {batch_size}")
  if dataset not in {c.name for c in imagenet_like.ImagenetLike.BUILDER_CONFIGS}:
    raise ConfigError("--input_dataset", f"unknown imagenet_like config {dataset!r}; known: "
                      + ", ".join(c.name for c in imagenet_like.ImagenetLike.BUILDER_CONFIGS))
  groups = []
  with _dataset_dir(data_dir) as root:
    log(f"input: writing/reading imagenet_like/{dataset} in {root}")
    builder = imagenet_like.prepare(dataset, root)
    name = f"imagenet_like/{dataset}"
    # The Grain feed reads the same JPEGs written as ArrayRecord, in a data_dir of its own.
    grain_root = os.path.join(root, "array_record")
    if any(VARIANTS[v].get("reader") == GRAIN for v in names):
      imagenet_like.prepare(dataset, grain_root, file_format="array_record")
    configs = {v: deit_data_config(name, grain_root if VARIANTS[v].get("reader") == GRAIN else root,
                                   image_size, **VARIANTS[v]) for v in names}
    recipe = deit_data_config(name, root, image_size).to_dict()
    for count in threads:
      seconds = {v: [] for v in names}
      for r in range(repeats):
        for v in names:
          seconds[v].append(_time_variant(configs[v], count, batch_size, warmup, iterations, seed))
        log(f"input: threads {count} round {r + 1}/{repeats}: " + ", ".join(
            f"{v} {batch_size * iterations / seconds[v][-1]:.1f} img/s" for v in names))
      groups.append(dict(threads=count, results=[_result(v, s, count, batch_size, iterations)
                                                  for v, s in seconds.items()]))
    info = dict(examples=builder.info.splits["train"].num_examples,
                mean_jpeg_bytes=_mean_file_bytes(builder))
  return dict(mode="input", dataset=f"imagenet_like/{dataset}", dataset_info=info,
              image_size=image_size, batch_size=batch_size, cpu_count=os.cpu_count(),
              warmup=warmup, iterations=iterations, repeats=repeats, recipe=recipe,
              variants={v: VARIANTS[v] for v in names}, groups=groups)


def _mean_file_bytes(builder) -> float:
  """Average stored bytes per example (JPEG plus a few bytes of label and framing)."""
  split = builder.info.splits["train"]
  return split.num_bytes / max(split.num_examples, 1)


def _result(variant, seconds, threads, batch_size, iterations) -> dict:
  rates = [batch_size * iterations / s for s in seconds]
  median = statistics.median(rates)
  return dict(variant=variant, disabled=VARIANTS[variant], images_per_s=median,
              images_per_s_min=min(rates), images_per_s_max=max(rates), per_round=rates,
              images_per_s_per_core=median / threads,
              core_ms_per_image=1000.0 * threads / median)


def per_core_rate(report: dict, variant: str = FULL) -> float:
  """The recipe's images/s per core: from the threads=1 group if there is one, else the group with
  the fewest threads (its images/s / threads)."""
  group = min(report["groups"], key=lambda g: g["threads"])
  for result in group["results"]:
    if result["variant"] == variant:
      return float(result["images_per_s_per_core"])
  raise KeyError(f"the input benchmark has no {variant!r} result")


def format_input_report(report: dict) -> str:
  info = report["dataset_info"]
  lines = [f"Input pipeline, host images/s: DeiT recipe at {report['image_size']} px, batch "
           f"{report['batch_size']}, {report['dataset']} ({info['examples']} JPEGs, "
           f"{info['mean_jpeg_bytes'] / 1000:.0f} KB each on average), {report['cpu_count']} CPUs; "
           f"median of {report['repeats']} interleaved rounds of {report['iterations']} batches."]
  for group in report["groups"]:
    results = {r["variant"]: r for r in group["results"]}
    full = results.get(FULL)
    lines += ["", f"threads = {group['threads']}", "",
              "| variant | images/s (min-max) | per core | core-ms / image | stage cost, core-ms / image |",
              "|---|---|---|---|---|"]
    for r in group["results"]:
      cost = "-"
      if full and r["variant"] not in (FULL, AA_COPY):
        cost = f"{full['core_ms_per_image'] - r['core_ms_per_image']:+.2f}"
      lines.append(f"| {r['variant']} | {r['images_per_s']:.1f} ({r['images_per_s_min']:.1f}-"
                   f"{r['images_per_s_max']:.1f}) | {r['images_per_s_per_core']:.1f} | "
                   f"{r['core_ms_per_image']:.2f} | {cost} |")
    if full and GRAIN in results:
      lines.append(f"\nGrain feed (threads {group['threads']}): "
                   f"{results[GRAIN]['images_per_s'] / full['images_per_s']:.2f}x the images/s of the "
                   f"tf.data DeiT recipe (host work: decode + crop + RandAugment; the rest on the accelerator).")
    if full and AA_COPY in results:
      ratio = results[AA_COPY]["images_per_s"] / full["images_per_s"]
      lines.append(f"\nA/A (threads {group['threads']}): {AA_COPY} and {FULL} are the same pipeline; "
                   f"their ratio {ratio:.3f} is the noise of this measurement.")
  lines.append("\nStage cost = core-ms per image of the full recipe minus that of the recipe "
               "without the stage (no_mix: Mixup, CutMix and label smoothing; decode_crop: all "
               "augmentations; grain: what the Grain feed saves the host, whose whole share there is "
               "decode + crop + RandAugment).")
  return "\n".join(lines)
