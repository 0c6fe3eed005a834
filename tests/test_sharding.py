"""Partition rules and mesh shapes (single device; the sharded runs are in tests/multidevice)."""

import os
import subprocess
import sys

import jax
import pytest
from conftest import ROOT, SideRun
from flax import nnx
from jax.sharding import PartitionSpec as P

from ppo_jax import sharding as shd
from ppo_jax.models import CausalLM, ModelConfig, RewardModel, ScalarHead, ValueModel

CONFIGS = {
  "gpt2": ModelConfig.gpt2(
    vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=32
  ),
  "llama": ModelConfig.llama(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    tie_word_embeddings=False,
  ),
  "qwen2": ModelConfig.llama(
    vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, qkv_bias=True
  ).replace(model_type="qwen2"),
  "qwen3": ModelConfig.llama(
    vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2
  ).replace(model_type="qwen3"),
}


def _abstract(build):
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(build)))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_parameter_of_every_model_has_a_rule(family):
  cfg = CONFIGS[family]
  params = {
    "policy": _abstract(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))),
    "value": _abstract(lambda: ValueModel(cfg, rngs=nnx.Rngs(0))),
    "head": _abstract(lambda: ScalarHead(cfg.hidden_size, rngs=nnx.Rngs(0))),
    "reward": _abstract(lambda: RewardModel(cfg, rngs=nnx.Rngs(0))),
  }
  mesh = shd.make_mesh((1, 1, 1))
  specs = {
    shd.path_string(p): shd.spec_for(shd.path_string(p), x.shape, mesh)
    for p, x in jax.tree_util.tree_leaves_with_path(params)
  }
  q = next(v for k, v in specs.items() if k.endswith("layers/0/attn/q/kernel"))
  assert q == P("fsdp", "tensor")
  assert next(v for k, v in specs.items() if k.endswith("trunk/embed/embedding")) == P(
    "tensor", "fsdp"
  )
  assert all(v == P() for k, v in specs.items() if "norm" in k)


def test_unmatched_parameter_is_an_error():
  with pytest.raises(ValueError, match=r"no partition rule matches parameter 'policy/adapter/w'"):
    shd.param_shardings(
      {"policy": {"adapter": {"w": jax.ShapeDtypeStruct((4, 4), "float32")}}},
      shd.make_mesh((1, 1, 1)),
    )


def test_mesh_shapes():
  assert shd.resolve_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert shd.resolve_shape((2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match=r"mesh.shape \(2, 2, 2\) needs 8 devices, but there are 1"):
    shd.make_mesh((2, 2, 2))
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    shd.resolve_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match="3 entries"):
    shd.resolve_shape((8, 1), 8)


def test_mesh_that_does_not_fit_is_a_one_line_cli_error(tmp_path):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ppo_jax.main",
      f"--config={ROOT / 'experiments' / 'default.py'}",
      f"--workdir={tmp_path}",
      "--config.mesh.shape=(2,2,2)",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 1
  err = proc.stderr.strip()
  assert err.count("\n") == 0 and "mesh.shape (2, 2, 2) needs 8 devices, but there are 1" in err


def test_multidevice_suite():
  """tests/multidevice on 8 simulated CPU devices: started by conftest when collection selected
  this test (see ``SideRun``), so it has been running beside the tests before it."""
  passed, out = SideRun.start("multidevice").passed()
  assert passed >= 8 and "skipped" not in out, out[-2000:]
