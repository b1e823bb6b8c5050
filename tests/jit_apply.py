"""jit_apply(model, variables, *args, **kwargs): model.apply(...) compiled as one program.

Calling model.apply outside jit runs the model op by op, and JAX compiles each operation for each
new shape on first use: a tiny ViT's forward pass is ~150 small programs, several times the
compile time of the same pass as one program. Tests that only need a forward pass's values use this.
Keyword arguments are fixed at trace time (train, mutable, capture_intermediates, rngs are
closed over); positional arguments are traced.
"""
import functools

import jax


def jit_apply(model, variables, *args, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, *args)
