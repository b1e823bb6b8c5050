"""Inference: throughput measurement, accuracy and folding checks of a trained run, the
interleaved inference-speed comparison of the norm variants."""
