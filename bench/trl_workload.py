"""The reference PPO workload of ../shared/BENCHMARK.md in TRL 1.12's PPOTrainer (PyTorch, CPU).

Runs in its own virtual env, never imported by ppo_jax:

  python -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 trl==1.12.0
  .venv-trl/bin/python bench/trl_workload.py [--layers 8 --width 512 --heads 8]

Random-init GPT-2 policy (seed 0), reference (a copy), reward model (sequence classifier, seed 1)
and value model (a copy of the reward model); 256 prompts of 16 random ids; 16 prompts per
iteration, 32 sampled tokens at temperature 0.7 without an EOS stop, 4 PPO epochs × 1 minibatch,
AdamW lr 3e-6, fp32, torch on 2 threads. Seconds per iteration are the gaps between TRL's
``on_step_end`` callbacks (one per PPO iteration), median after the first. The last line is

  trl_ppo: iter_s=<median s per iteration> tokens_per_s=<16·32 / iter_s>
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np
import torch
import transformers as tf
from datasets import Dataset
from tokenizers import Tokenizer, models
from trl.experimental.ppo import PPOConfig, PPOTrainer

B, P, N, NUM_PROMPTS, VOCAB = 16, 16, 32, 256, 512


def word_tokenizer() -> tf.PreTrainedTokenizerFast:
  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
  vocab.update({f"w{i}": i for i in range(4, VOCAB)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  return tf.PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
  )


class StepTimes(tf.TrainerCallback):
  def __init__(self):
    self.stamps = []

  def on_train_begin(self, args, state, control, **kw):
    self.stamps.append(time.perf_counter())

  def on_step_end(self, args, state, control, **kw):
    self.stamps.append(time.perf_counter())


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--iterations", type=int, default=20, help="timed, after one warm-up")
  ap.add_argument("--threads", type=int, default=2)
  args = ap.parse_args()
  torch.set_num_threads(args.threads)
  cfg = tf.GPT2Config(
    n_layer=args.layers,
    n_embd=args.width,
    n_head=args.heads,
    vocab_size=VOCAB,
    n_positions=128,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
    num_labels=1,
  )
  torch.manual_seed(0)
  policy = tf.AutoModelForCausalLM.from_config(cfg)
  torch.manual_seed(1)
  reward = tf.AutoModelForSequenceClassification.from_config(cfg)
  prompts = np.random.default_rng(0).integers(4, VOCAB, size=(NUM_PROMPTS, P))
  iterations = args.iterations + 1
  timer = StepTimes()
  with tempfile.TemporaryDirectory() as out:
    config = PPOConfig(
      output_dir=out,
      per_device_train_batch_size=B,
      gradient_accumulation_steps=1,
      num_mini_batches=1,
      num_ppo_epochs=4,
      response_length=N,
      temperature=0.7,
      learning_rate=3e-6,
      kl_coef=0.05,
      cliprange=0.2,
      cliprange_value=0.2,
      vf_coef=0.1,
      gamma=1.0,
      lam=0.95,
      total_episodes=iterations * B,
      local_rollout_forward_batch_size=B,
      stop_token=None,
      num_sample_generations=0,
      bf16=False,
      gradient_checkpointing=False,
      use_cpu=True,
      report_to="none",
      save_strategy="no",
      logging_steps=10_000,
      disable_tqdm=True,
      seed=0,
    )
    trainer = PPOTrainer(
      args=config,
      processing_class=word_tokenizer(),
      model=policy,
      ref_model=copy.deepcopy(policy),
      reward_model=reward,
      value_model=copy.deepcopy(reward),
      train_dataset=Dataset.from_dict({"input_ids": prompts.tolist()}),
      callbacks=[timer],
    )
    trainer.train()
  times = np.diff(timer.stamps)
  if len(times) != iterations:
    raise SystemExit(f"expected {iterations} iterations, timed {len(times)}")
  iter_s = statistics.median(times[1:])
  print(
    f"torch {torch.__version__}, {args.threads} threads; GPT-2 L{args.layers} d{args.width}; "
    f"iteration median {iter_s:.3f} s (min {min(times[1:]):.3f}, max {max(times[1:]):.3f}, "
    f"n={args.iterations}); first {times[0]:.3f} s"
  )
  print(f"trl_ppo: iter_s={iter_s:.4f} tokens_per_s={B * N / iter_s:.1f}")


if __name__ == "__main__":
  main()
