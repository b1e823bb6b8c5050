"""Long benchmark phases say where they are: a line before each compile and one per timing round
with the time per call of every model and an estimate of what is left (python -m vitnorm.benchmark)."""
import re

import jax
import jax.numpy as jnp

from vitnorm import parallel
from vitnorm.inference import throughput


def test_measure_logs_each_compile_and_each_round_with_an_estimate():
  cands = [throughput.Candidate(n, lambda v, x: x.reshape(x.shape[0], -1) @ v["w"],
                                {"w": jnp.ones((4 * 4 * 3, 5))}) for n in ("A", "B")]
  lines = []
  throughput.measure(cands, 4, (4, 4, 3), warmup=1, iterations=2, repeats=3,
                     mesh=parallel.data_mesh(jax.local_devices()[:1]), log=lines.append)
  assert lines[0] == "A @ batch 4: compiling and warming up (1 calls) ..."
  assert lines[1].startswith("A @ batch 4: compiled in ")
  rounds = [l for l in lines if " round " in l]
  assert len(rounds) == 3
  for i, line in enumerate(rounds, 1):
    assert re.fullmatch(rf"batch 4: round {i}/3 timed in [\d.]+s \(A [\d.]+ ms/call, B [\d.]+ ms/call\); "
                        r"about \d+s left", line), line
  assert rounds[-1].endswith("about 0s left")
