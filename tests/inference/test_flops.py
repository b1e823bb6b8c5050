"""The analytic ViT FLOP count agrees with XLA's cost analysis on CPU, where it counts matmuls."""
import numpy as np
import pytest

from configs import common
from vitnorm.inference import comparison, flops, throughput
from vitnorm.model import vit


@pytest.mark.parametrize("overrides", [
    dict(),  # ViT-S/16 width at 224 px (197 tokens: attention is ~8% of a block), one block
    dict(classifier="gap", representation_size=256, num_layers=2, norm="batch", ffn_norm="batch"),
])
def test_analytic_count_matches_cost_analysis(overrides):
  cfg = common.model_config(variant="S/16", num_classes=1000, image_size=224)
  cfg.update(dict(dict(num_layers=1), **overrides))
  cfg = cfg.to_dict()
  model = vit.build_model(cfg)
  variables = comparison.random_variables(model, cfg, seed=0)
  compiled = throughput.compile_forward(throughput.model_forward(model), variables, 8, (224, 224, 3),
                                        throughput.local_mesh())
  analytic = flops.vit_forward_flops(cfg)
  # Cost analysis also counts norms, softmax, GELU and adds: ~1% on top of the matmuls here.
  assert 1.0 <= compiled.flops_per_image / analytic < 1.03, (compiled.flops_per_image, analytic)


def test_vit_s16_at_224px():
  cfg = common.model_config(variant="S/16", num_classes=1000, image_size=224).to_dict()
  t, d = 197, 384
  block = 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * 1536
  expected = 2 * 196 * 768 * d + 12 * block + 2 * d * 1000
  assert flops.vit_forward_flops(cfg) == expected
  assert np.isclose(expected / 1e9, 9.198, atol=1e-3)
