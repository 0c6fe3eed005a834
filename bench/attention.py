"""Attention alone, forward + backward at the 1B train step's shapes: ppo_jax's ``attend`` (XLA,
float32 scores) against ``jax.nn.dot_product_attention`` with XLA and with cuDNN's fused flash
attention (GPU only), on the same bf16 inputs and the same causal + left-padding mask.

  python bench/attention.py                 # B 32, T 512, 32 heads over 8 KV heads, D 64
  python bench/attention.py --preset tiny   # on the CPU: cuDNN is reported as unavailable

The train step runs this once per layer (16 for the 1B): the per-layer milliseconds × 16 against
the step's time says how much a fused kernel could give. Prints each implementation's median
time (alternating, after a warm-up), its speed relative to ``attend``, and the largest
difference of its output and input gradients from ``attend``'s on the rows a loss reads.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
from timing import alternate

from ppo_jax.models.layers import attend

PRESETS = {
  "1b": dict(batch=32, seq=512, heads=32, kv_heads=8, head_dim=64, prompt=256),
  "tiny": dict(batch=4, seq=32, heads=4, kv_heads=2, head_dim=16, prompt=16),
}


def inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, prompt: int):
  """q [B, T, H, D], k and v [B, T, H_kv, D] in bf16; ``allowed`` [B, T, T] causal over the
  non-padding tokens (prompts left-padded by 0 to prompt / 2 tokens); ``rows`` [B, T] the query
  positions that hold a token."""
  rng = np.random.default_rng(0)
  q, k, v = (
    jnp.asarray(rng.normal(size=(batch, seq, h, head_dim)), jnp.bfloat16)
    for h in (heads, kv_heads, kv_heads)
  )
  pad = rng.integers(0, prompt // 2 + 1, batch)
  rows = np.arange(seq)[None, :] >= pad[:, None]
  causal = np.tril(np.ones((seq, seq), bool))
  allowed = causal[None] & rows[:, None, :]
  return q, k, v, jnp.asarray(allowed), jnp.asarray(rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args()
  pre = PRESETS[args.preset]
  q, k, v, allowed, rows = inputs(**pre)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.bfloat16)
  row_w = rows[:, :, None, None].astype(jnp.float32)  # padding rows: read by no loss

  impls = {
    "ppo_jax attend": lambda q, k, v, allowed: attend(q, k, v, allowed, heads_major=False),
    "jax.nn xla": lambda q, k, v, allowed: jax.nn.dot_product_attention(
      q, k, v, mask=allowed[:, None], implementation="xla"
    ),
    "jax.nn cudnn": lambda q, k, v, allowed: jax.nn.dot_product_attention(
      q, k, v, mask=allowed[:, None], implementation="cudnn"
    ),
  }

  def fwd_bwd(fn):
    # Mask, cotangent and row weights are arguments, not constants folded into the program.
    def loss(q, k, v, allowed, cot, row_w):
      out = fn(q, k, v, allowed).astype(jnp.float32)
      return jnp.sum(out * cot.astype(jnp.float32) * row_w), out

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

  operands = (q, k, v, allowed, cot, row_w)
  dev = jax.devices()[0]
  print(
    f"jax {jax.__version__} on {dev.device_kind} ({dev.platform}); attention forward + backward, "
    f"B {pre['batch']}, T {pre['seq']}, {pre['heads']} heads over {pre['kv_heads']} KV heads, "
    f"D {pre['head_dim']}, bf16, causal + left padding",
    flush=True,
  )
  results, runners = {}, {}
  for name, fn in impls.items():
    f = fwd_bwd(fn)
    try:
      results[name] = jax.block_until_ready(f(*operands))
    except Exception as e:  # cuDNN off the GPU, or a shape/mask it does not support
      print(f"{name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
      continue
    runners[name] = lambda f=f: jax.block_until_ready(f(*operands))
  times = alternate(runners, repeats=args.repeats)
  base = "ppo_jax attend"
  (ref_grads, ref_out) = results[base]
  t_base = float(np.median(times[base]))
  for name, ts in times.items():
    grads, out = results[name]
    diff_out = float(jnp.max(jnp.abs((out - ref_out) * row_w)))
    diff_grad = max(
      float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
      for a, b in zip(grads, ref_grads, strict=True)
    )
    t = float(np.median(ts))
    print(
      f"{name}: {t * 1e3:.2f} ms per layer (min {min(ts) * 1e3:.2f}), {t_base / t:.2f}× attend's "
      f"speed; max |Δ| from attend: output {diff_out:.2g}, input gradients {diff_grad:.2g}"
    )


if __name__ == "__main__":
  main()
