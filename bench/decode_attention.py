"""The decode step's attention alone: one new query per row against a KV cache, at the 1B's
shapes, in formulations XLA compiles differently. Decode is memory-bound; this attention reads
every cached key and value once per step, so each variant's time is reported as the cache's
bytes per second against a plain read of the same bytes.

  python bench/decode_attention.py                 # B 32, S 512, 32 heads over 8 KV heads, D 64
  python bench/decode_attention.py --preset tiny   # on the CPU (cuDNN reported as unavailable)

Variants (all: float32 scores and softmax, bf16 cache):
- ``attend``: ppo_jax's ``attend`` on the heads-major cache [B, H_kv, S, D] (what decode runs):
  two batched matmuls with N = H / H_kv = 4 columns.
- ``reduce``: the same maths as multiply + reduce (no matmul): XLA fuses each product into its
  reduction; ``reduce scores, matmul mix``: the scores so, ``probs · v`` a matmul.
- ``pallas gqa, n splits``: JAX's Pallas flash-decoding kernel
  (``jax.experimental.pallas.ops.gpu.decode_attention.gqa``): each row's slots [start, stop) in
  n splits, combined after; the Triton kernel on a GPU, interpreted elsewhere.
- ``cudnn``: ``jax.nn.dot_product_attention`` (cuDNN) on a sequence-major cache [B, S, H_kv, D].

One call runs L layers × ``--chain`` steps inside one jit (each layer its own cache, each output
the next query), so the launch is paid once, as in the sampler's loop.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode
from timing import alternate, read_bandwidth

from ppo_jax.models.layers import attend

PRESETS = {
  "1b": dict(batch=32, cache=512, heads=32, kv_heads=8, head_dim=64, layers=16, read_gib=4.0),
  "tiny": dict(batch=4, cache=32, heads=4, kv_heads=2, head_dim=16, layers=2, read_gib=0.0625),
}


def reduce_attend(q_BxHxD, k_BxKxSxD, v_BxKxSxD, allowed_BxS, *, mix_by_matmul=False):
  """``softmax(q kᵀ/√D) v`` for one query per row as multiply + reduce, GQA by reshaping q
  (``mix_by_matmul``: the scores so, the mixing ``probs · v`` a batched matmul)."""
  B, H, D = q_BxHxD.shape
  K = k_BxKxSxD.shape[1]
  q = q_BxHxD.reshape(B, K, H // K, 1, D).astype(jnp.float32)
  scores = jnp.sum(q * k_BxKxSxD[:, :, None].astype(jnp.float32), -1) / np.sqrt(D)  # [B,K,G,S]
  scores = jnp.where(allowed_BxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if mix_by_matmul:
    out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(v_BxKxSxD.dtype), v_BxKxSxD)
    return out.reshape(B, H, D)
  out = jnp.sum(probs[..., None] * v_BxKxSxD[:, :, None].astype(jnp.float32), -2)  # [B,K,G,D]
  return out.reshape(B, H, D).astype(q_BxHxD.dtype)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
  ap.add_argument("--chain", type=int, default=8, help="decode steps per call")
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args()
  p = PRESETS[args.preset]
  B, S, H, K, D, L = (p[k] for k in ("batch", "cache", "heads", "kv_heads", "head_dim", "layers"))
  rng = np.random.default_rng(0)
  bf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  # One buffer per layer, as the sampler's loop carries them (slices of one stacked array would be
  # copied out before every kernel that cannot fuse a slice).
  k_major, v_major = ([bf(B, K, S, D) for _ in range(L)] for _ in range(2))  # heads-major
  k_seq, v_seq = ([jnp.swapaxes(x, 1, 2) for x in xs] for xs in (k_major, v_major))  # [B,S,K,D]
  q0 = bf(B, H, D)
  # Left padding, then the prompt and the tokens so far: slots [pad, filled) of each row.
  pad = rng.integers(0, S // 4, B)
  filled = rng.integers(S // 2, S + 1, B)
  slots = np.arange(S)[None]
  allowed = jnp.asarray((slots >= pad[:, None]) & (slots < filled[:, None]))
  start, stop = jnp.asarray(pad, jnp.int32), jnp.asarray(filled, jnp.int32)
  interpret = jax.default_backend() != "gpu"

  def pallas(k_splits):
    # Sequence-major views of the heads-major cache: gqa swaps them back (XLA drops the pair).
    return lambda q, k, v, a: pallas_decode.gqa(
      q,
      jnp.swapaxes(k, 1, 2),
      jnp.swapaxes(v, 1, 2),
      start,
      stop,
      k_splits=k_splits,
      block_k=min(128, S // k_splits),
      interpret=interpret,
    ).astype(q.dtype)  # it divides by a float32 epsilon: float32 out

  variants = {
    "attend": (
      lambda q, k, v, a: attend(q[:, None], k, v, a[:, None], heads_major=True)[:, 0],
      k_major,
      v_major,
    ),
    "reduce": (reduce_attend, k_major, v_major),
    "reduce scores, matmul mix": (
      lambda q, k, v, a: reduce_attend(q, k, v, a, mix_by_matmul=True),
      k_major,
      v_major,
    ),
    **{
      f"pallas gqa, {n} splits": (pallas(n), k_major, v_major)
      for n in (1, 2, 4, 8, 16)
      if S // n >= 16
    },
    "cudnn": (
      lambda q, k, v, a: jax.nn.dot_product_attention(
        q[:, None], k, v, mask=a[:, None, None], implementation="cudnn"
      )[:, 0],
      k_seq,
      v_seq,
    ),
  }
  dev = jax.devices()[0]
  print(
    f"jax {jax.__version__} on {dev.device_kind} ({dev.platform}); decode attention, B {B}, "
    f"cache {S} slots, {H} heads over {K} KV heads, D {D}, bf16 cache; {L} layers × "
    f"{args.chain} steps per call",
    flush=True,
  )
  runners, outs = {}, {}
  for name, (fn, ks, vs) in variants.items():
    f = jax.jit(lambda q, ks, vs, a, fn=fn: _chain(fn, q, ks, vs, a, L, args.chain))
    try:
      outs[name] = jax.block_until_ready(f(q0, ks, vs, allowed))
    except Exception as e:  # cuDNN off the GPU, or a shape it does not support
      print(f"{name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
      continue
    runners[name] = lambda f=f, ks=ks, vs=vs: jax.block_until_ready(f(q0, ks, vs, allowed))
  ref = outs["attend"]
  times = alternate(runners, repeats=args.repeats)
  read_bw = read_bandwidth(int(p["read_gib"] * 2**30))
  t_attend = statistics.median(times["attend"])
  cache_bytes = 2 * B * K * S * D * 2  # keys and values, bf16, one layer: all slots are read
  for name, ts in times.items():
    per_layer = statistics.median(ts) / (L * args.chain)
    diff = float(jnp.max(jnp.abs(outs[name].astype(jnp.float32) - ref.astype(jnp.float32))))
    bw = cache_bytes / per_layer
    print(
      f"{name}: {per_layer * 1e6:.1f} µs per layer-step = {bw / 1e9:,.0f} GB/s "
      f"over the {cache_bytes / 1e6:.1f} MB cache ({bw / read_bw:.0%} of a "
      f"plain read's {read_bw / 1e9:,.0f} GB/s); {t_attend / statistics.median(ts):.2f}× attend's "
      f"speed; max |Δ| from attend after {L * args.chain} chained layers: {diff:.2g}",
      flush=True,
    )


def _chain(one_layer, q, ks, vs, allowed, layers, steps):
  """``steps`` decode steps (a loop, as the sampler's) of ``layers`` layers, each layer's output
  the next one's query."""

  def step(_, q):
    for i in range(layers):
      q = one_layer(q, ks[i], vs[i], allowed)
    return q

  return jax.lax.fori_loop(0, steps, step, q)


if __name__ == "__main__":
  main()
