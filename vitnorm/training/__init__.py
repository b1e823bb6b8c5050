"""Training: config validation (plan), train state and step, placement (jit / pmap), the loop,
the optimizer, checkpoints and the accuracy pass over an eval split."""
