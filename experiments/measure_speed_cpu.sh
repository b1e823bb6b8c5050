#!/usr/bin/env bash
# The CPU speed measurements quoted in the closing notes and READMEs, regenerated in one go:
#
#   bash experiments/measure_speed_cpu.sh [OUT_DIR]      (default experiments/results/speed_cpu)
#
# Run it on an idle machine (nothing else heavy running): every figure is a ratio measured within
# one run, but a loaded machine still widens the spread. Each command writes OUT_DIR/<name>.json
# (the command's own JSON output) and OUT_DIR/<name>.txt (what it printed). About 20 minutes on
# the 2-core development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-experiments/results/speed_cpu}"
PY="${PYTHON:-python}"  # e.g. PYTHON=.venv/bin/python
mkdir -p "$OUT"

# MEASURE_ONLY="name1 name2": run only those (e.g. to redo one figure).
run() {  # run NAME COMMAND...: the command's stdout to NAME.txt (and the terminal); its JSON via --output
  local name="$1"; shift
  if [[ -n "${MEASURE_ONLY:-}" && " $MEASURE_ONLY " != *" $name "* ]]; then return 0; fi
  echo "== $name: $*" >&2
  { echo "\$ python ${*:2}"; "$@"; } | tee "$OUT/$name.txt"
}

# Issue 10: the trainer's loop against the same compiled step fed one resident batch.
run loop_quickstart "$PY" -m vitnorm.benchmark --mode=loop --config=configs/quickstart.py \
    --loop_steps=600 --output="$OUT/loop_quickstart.json"
run loop_quickstart_numpy_feed "$PY" -m vitnorm.benchmark --mode=loop --config=configs/quickstart.py \
    --config.data.name=numpy:mnist5k --loop_steps=600 --output="$OUT/loop_quickstart_numpy_feed.json"
run loop_s16 "$PY" -m vitnorm.benchmark --mode=loop --config=configs/quickstart.py \
    --config.model.hidden_size=384 --config.model.num_layers=12 --config.model.mlp_dim=1536 \
    --config.model.num_heads=6 --config.model.patch_size=16 --config.model.image_size=224 \
    --config.model.num_channels=3 --config.data.image_size=224 --config.data.channels=3 \
    "--config.data.normalize_mean=(0.1307,0.1307,0.1307)" "--config.data.normalize_std=(0.3081,0.3081,0.3081)" \
    --config.batch_size=32 --config.log_every=10 --config.diagnostics_every=0 --loop_steps=20 \
    --repeats=1 --output="$OUT/loop_s16.json"

# Issue 10: the train step per norm, interleaved, with its A/A copy and the matmul peak.
run train_quickstart_model "$PY" -m vitnorm.benchmark --mode=train --variant=Ti/16 --hidden_size=64 \
    --num_layers=4 --mlp_dim=128 --num_heads=4 --patch_size=7 --image_size=28 --num_channels=1 \
    --num_classes=10 --batch_sizes=64 --output="$OUT/train_quickstart_model.json"
# S/16 on this CPU: about 10 s per train step at batch 32, so one timed call per model per round,
# jit and float32 only, to fit the time (the quickstart-size run above covers pmap and bfloat16).
run train_s16 "$PY" -m vitnorm.benchmark --mode=train --variant=S/16 --image_size=224 --batch_sizes=32 \
    --parallelism=jit --dtypes=float32 --warmup=1 --iterations=1 --repeats=3 --output="$OUT/train_s16.json"

# Issue 9: the cost of the integrity manifest (SHA-256 of every file) on an S/16-size train state.
run checkpoint_hashing "$PY" -m experiments.checkpoint_hashing --variant=S/16 --repeats=5

# Issue 11: the per-step shared preemption flag, 2 processes x 2 CPU devices on localhost.
JAX_PLATFORMS=cpu run preemption_cost "$PY" -m experiments.preemption_cost --processes 2 --devices 2 \
    --steps 200 --rounds 5
