"""``ppo-jax sample`` on prompts of mixed lengths, three ways: rows sorted longest prompt first
and each batch cut to its longest prompt (rounded up to a power of two: ``inference.batch_order``
and ``inference.trimmed``, what the command does); the rows in file order, cut; and in file order
with every batch padded to the file's longest.

  python bench/sample_widths.py [--prompts 256] [--long-every 16] [--repeats 3]

A random GPT-2 (L4 d256, 512 positions, a 500-word vocabulary) samples 32 tokens for each prompt
of a file where most prompts have 8–40 tokens and one in ``--long-every`` has 200–400 (the shape
of chat datasets such as HH-RLHF); both variants run alternately in one process, after a warm-up
that compiles their programs. The responses are the same up to rounding (tested in
tests/test_inference.py); only the padding differs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).parent))

import numpy as np
from flax import nnx
from timing import alternate

from ppo_jax import inference
from ppo_jax.models import CausalLM, ModelConfig, save_pretrained
from ppo_jax.tokenizer import build_word_tokenizer


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--prompts", type=int, default=256)
  ap.add_argument("--long-every", type=int, default=16, help="one long prompt in this many")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--batch-size", type=int, default=16)
  args = ap.parse_args()
  words = [f"w{i}" for i in range(500)]
  tok = build_word_tokenizer(words)
  rng = np.random.default_rng(0)
  lengths = [
    int(rng.integers(200, 401)) if i % args.long_every == 0 else int(rng.integers(8, 41))
    for i in range(args.prompts)
  ]
  order = rng.permutation(args.prompts)  # long prompts anywhere in the file
  with tempfile.TemporaryDirectory() as d:
    root = pathlib.Path(d)
    cfg = ModelConfig.gpt2(
      vocab_size=len(tok),
      max_position_embeddings=512,
      eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id,
    )
    save_pretrained(CausalLM(cfg, rngs=nnx.Rngs(0)), root / "policy", tokenizer=tok)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
      "".join(json.dumps({"prompt": " ".join(rng.choice(words, lengths[i]))}) + "\n" for i in order)
    )
    full = lambda lengths, width, **kw: width
    file_order = lambda lengths: np.arange(len(lengths))
    calls = iter(range(10**6))

    def run(cut: bool, sort: bool):
      def go():
        saved = inference.trimmed, inference.batch_order
        inference.trimmed = saved[0] if cut else full
        inference.batch_order = saved[1] if sort else file_order
        try:
          inference.sample_file(
            root / "policy",
            prompts,
            root / f"out{next(calls)}.jsonl",
            max_new_tokens=32,
            batch_size=args.batch_size,
            seed=0,
            progress=False,
          )
        finally:
          inference.trimmed, inference.batch_order = saved

      return go

    variants = {"sorted": run(True, True), "cut": run(True, False), "padded": run(False, False)}
    times = alternate(variants, repeats=args.repeats)
  srt, cut, padded = (statistics.median(times[k]) for k in ("sorted", "cut", "padded"))
  mean_len = np.mean(lengths)
  print(
    f"{args.prompts} prompts (mean {mean_len:.0f} tokens, longest {max(lengths)}; one in "
    f"{args.long_every} long), batches of {args.batch_size}, 32 new tokens"
  )
  runs = lambda k: ", ".join(f"{t:.2f}" for t in times[k])
  print(f"sorted longest first, cut to each batch's longest: {srt:.2f} s (runs {runs('sorted')})")
  print(f"file order, cut to each batch's longest: {cut:.2f} s (runs {runs('cut')})")
  print(f"file order, padded to the file's longest: {padded:.2f} s (runs {runs('padded')})")
  print(f"sorting: {cut / srt:.2f}× over file order, {padded / srt:.2f}× over padded")


if __name__ == "__main__":
  main()
