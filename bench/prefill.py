"""Prefill: attention over the prompt's own keys against attention over the whole KV cache.

The sampler's prefill writes the ``P`` prompt tokens at slot 0 of a ``P + N``-slot cache. A query
there may only see prompt keys, so the trunk attends over those ``P`` (a static ``cache_index``
of 0); a traced ``cache_index`` takes the decode path, which scores every query against all
``P + N`` slots, empty past the prompt. This times both, alternately in one process, on GPT-2
L4 d256 V512 (random weights, fp32), checks that their logits and caches are equal, and prints
the ratio per prompt / response length.

  python bench/prefill.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
from flax import nnx
from timing import alternate, summary

import ppo_jax as pj
from ppo_jax.models.transformer import positions_from_mask

CASES = ((16, 32, 16), (96, 32, 16), (64, 192, 16), (256, 768, 4))  # (P, N, batch)


def prefills(P: int, N: int, B: int):
  """The jitted prefill (last logits, cache), waited for, with a static and a traced slot 0."""
  cfg = pj.models.ModelConfig.gpt2(
    num_layers=4,
    hidden_size=256,
    num_heads=4,
    vocab_size=512,
    max_position_embeddings=max(128, P + N),
  )
  graphdef, params = nnx.split(pj.models.CausalLM(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(params)
  ids = jax.random.randint(jax.random.key(1), (B, P), 4, cfg.vocab_size)
  mask = jnp.ones((B, P), jnp.int32)
  kv_mask = jnp.concatenate([mask, jnp.ones((B, N), jnp.int32)], axis=1)

  def prefill(params, ids, cache_index):
    model = nnx.merge(graphdef, params)
    hidden, cache = model.trunk(
      ids,
      positions_BxT=positions_from_mask(mask),
      kv_mask_BxS=kv_mask,
      cache=model.trunk.init_cache(B, P + N),
      cache_index=cache_index,
    )
    return model.unembed(hidden[:, -1]), cache

  prompt_only = jax.jit(lambda p, i: prefill(p, i, 0))
  whole_cache = jax.jit(lambda p, i: prefill(p, i, jnp.int32(0)))
  return (
    lambda: jax.block_until_ready(prompt_only(params, ids)),
    lambda: jax.block_until_ready(whole_cache(params, ids)),
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--repeats", type=int, default=15)
  args = ap.parse_args()
  print(f"jax {jax.__version__} ({jax.devices()[0].platform})")
  for P, N, B in CASES:
    prompt_only, whole_cache = prefills(P, N, B)
    a, b = prompt_only(), whole_cache()
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    if not all(bool(jnp.array_equal(x, y)) for x, y in pairs):
      raise SystemExit(f"P {P} N {N}: the two prefills differ")
    contenders = {"prompt keys": prompt_only, "whole cache": whole_cache}
    times = alternate(contenders, repeats=args.repeats, warmup=2)
    label = f"B {B} P {P} N {N}"
    for name, t in times.items():
      print(f"{label}: {name}: {summary(t)}")
    ratio = statistics.median(times["whole cache"]) / statistics.median(times["prompt keys"])
    print(f"{label}: whole cache / prompt keys = {ratio:.2f}x (logits and cache equal)")


if __name__ == "__main__":
  main()
