"""Decode throughput: pj.generate against transformers' generate, side by side in one run.

The GPT-2 configuration of ../shared/BENCHMARK.md (4 layers, width 256, 4 heads, vocab 512,
128 positions), random weights, batch 16, 16-token prompts (``--prompt-len``), 32 sampled tokens
(``--new-tokens``) at temperature 0.7, no EOS (fixed length), fp32 on CPU. Both models hold the
same weights (saved by transformers, loaded by ppo_jax). Prints response tokens/s of each and
their ratio. With ``--lora R`` it also times the same policy with rank-R adapters on every
projection (non-zero, as after training), what a LoRA run samples with, and prints its cost
against the plain policy's.

  python bench/decode.py [--repeats 20] [--threads 2] [--lora 16] [--prompt-len 16 --new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import torch
import transformers as tf
from timing import alternate, summary

import ppo_jax as pj

B = 16


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  ap.add_argument("--lora", type=int, default=0, help="also time rank-R adapters (0: no)")
  ap.add_argument("--prompt-len", type=int, default=16, help="P, prompt tokens")
  ap.add_argument("--new-tokens", type=int, default=32, help="N, sampled tokens")
  args = ap.parse_args()
  P, N = args.prompt_len, args.new_tokens
  if P < 1 or N < 1 or P + N > 128:
    ap.error(f"need P ≥ 1, N ≥ 1 and P + N ≤ 128 (the model's positions), got {P} + {N}")
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  cfg = tf.GPT2Config(
    n_layer=4,
    n_embd=256,
    n_head=4,
    vocab_size=512,
    n_positions=128,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
  )
  hf_model = tf.AutoModelForCausalLM.from_config(cfg).eval()
  with tempfile.TemporaryDirectory() as d:
    hf_model.save_pretrained(d)
    model = pj.models.from_pretrained(d)
  ids = np.random.default_rng(0).integers(4, 512, size=(B, P))
  ids_t = torch.tensor(ids)
  keys = iter(jax.random.split(jax.random.key(0), 10_000))

  def ours():
    gen = pj.generate(model, ids, None, key=next(keys), max_new_tokens=N, temperature=0.7)
    gen.tokens.block_until_ready()

  def theirs():
    with torch.no_grad():
      hf_model.generate(
        ids_t,
        attention_mask=torch.ones_like(ids_t),
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        max_new_tokens=N,
        min_new_tokens=N,
        eos_token_id=None,
        pad_token_id=0,
      )

  contenders = {"ppo_jax": ours, "transformers": theirs}
  if args.lora:
    contenders["ppo_jax LoRA"] = lora_sampler(model, ids, keys, rank=args.lora, new_tokens=N)
  times = alternate(contenders, repeats=args.repeats, warmup=2)
  tps = {k: B * N / statistics.median(v) for k, v in times.items()}
  print(f"batch {B}, {P}-token prompts, {N} sampled tokens")
  print(
    f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
    f"({args.threads} threads), transformers {tf.__version__}"
  )
  for name, t in times.items():
    print(f"{name:>12}: {summary(t)}  → {tps[name]:,.0f} tokens/s")
  print(f"ratio ppo_jax / transformers: {tps['ppo_jax'] / tps['transformers']:.2f}x")
  if args.lora:
    print(
      f"LoRA rank {args.lora} on q,k,v,o,up,down: sampling takes "
      f"{tps['ppo_jax'] / tps['ppo_jax LoRA']:.2f}x the plain policy's time"
    )


def lora_sampler(model, ids, keys, *, rank, new_tokens):
  """``generate`` from ``model`` with rank-``rank`` adapters on every projection, their B made
  non-zero (fresh ones are zero, which a compiler could fold away)."""
  from flax import nnx

  from ppo_jax.models.lora import add_lora, split_lora

  graphdef, adapters, base = split_lora(
    add_lora(model, rank=rank, targets="q,k,v,o,up,down", seed=1)
  )
  adapters = jax.tree.map(lambda x: x + 0.01, adapters)
  adapted = nnx.merge(graphdef, adapters, base)

  def run():
    gen = pj.generate(
      adapted, ids, None, key=next(keys), max_new_tokens=new_tokens, temperature=0.7
    )
    gen.tokens.block_until_ready()

  return run


if __name__ == "__main__":
  main()
