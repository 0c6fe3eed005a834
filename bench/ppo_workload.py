"""The reference PPO workload of ../shared/BENCHMARK.md in ppo_jax: seconds per iteration.

Random-init GPT-2 (4 layers, width 256, 4 heads, vocab 512, 128 positions); policy, reference
(frozen copy), reward model (seed 1) and value model (a copy of the reward model, trained).
Per iteration: 16 prompts of 16 random ids → 32 sampled tokens each at temperature 0.7 (fixed
length, no EOS stop; the old log-probs are the sampler's, as TRL takes them from its generation
logits); reference log-probs, values and reward over the 48-token sequences, k1 KL in the reward
(β 0.05), GAE (γ 1, λ 0.95), whitened advantages; 4 epochs × 1 minibatch of 16 of the clipped
PPO update (clip 0.2, value clip 0.2, vf_coef 0.1), AdamW lr 3e-6, fp32.

The whole iteration is one XLA program (``StepFns.iterate``: sample → score → GAE → update,
state donated). The phases are also timed as separate programs to show where the time goes.
Prints the median seconds per iteration after warm-up, compile time, phase times, tokens/s, and
model FLOP utilisation against a matmul peak measured in the same run. The last line is

  ppo_jax: iter_s=<median s per iteration> tokens_per_s=<16·32 / iter_s>

  python bench/ppo_workload.py [--layers 8 --width 512 --heads 8] [--iterations 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flops import forward_flops
from timing import matmul_peak

from ppo_jax import ppo, rollout
from ppo_jax.actor_critic import ActorCritic
from ppo_jax.models import CausalLM, ModelConfig, RewardModel, ValueModel
from ppo_jax.optim import OptimHparams, make_actor_critic_optimizer

B, P, N, NUM_PROMPTS = 16, 16, 32, 256


def iteration_flops(cfg: ModelConfig, epochs: int) -> dict[str, float]:
  """Model FLOPs of one PPO iteration, as counted in ../shared/BENCHMARK.md."""
  T = P + N
  # As the reference counts them: the unembedding over every position of a scored sequence.
  full = lambda lm: B * forward_flops(cfg, T, (T + 1) / 2, lm_head_tokens=T if lm else 0)
  prefill = B * forward_flops(cfg, P, (P + 1) / 2, lm_head_tokens=P)
  decode = B * (N - 1) * forward_flops(cfg, 1, P + N / 2, lm_head_tokens=1)
  return {
    "generate": prefill + decode,
    "score": full(True) + 2 * full(False),  # reference, value model, reward model
    "update": epochs * 3 * (full(True) + full(False)),  # policy + value, backward = 2× forward
  }


# Old log-probs from the sampler, as TRL takes them from its generation logits (the library's
# default, recompute_logprobs=True, adds a policy forward pass to scoring).
HPARAMS = ppo.PPOHparams(
  max_new_tokens=N, temperature=0.7, eos_token_id=None, num_epochs=4, recompute_logprobs=False
)


def build(cfg: ModelConfig, hp: ppo.PPOHparams):
  policy = CausalLM(cfg, rngs=nnx.Rngs(0))
  reward = RewardModel(cfg, rngs=nnx.Rngs(1))
  value = ValueModel(cfg, rngs=nnx.Rngs(2))
  nnx.update(value, nnx.state(reward))  # the value model starts as a copy of the reward model
  models, params, frozen_policy, reward_params = ActorCritic.build(policy, value, reward)
  tx = make_actor_critic_optimizer(OptimHparams(lr=3e-6), policy_steps=10_000, value_steps=10_000)
  state = ppo.init_state(params, tx, hp, seed=0)
  # The numbers as inputs, as rl.run_ppo gives them.
  frozen = ppo.Frozen(frozen_policy, reward_params, hparams=hp.numbers())
  return rollout.make_step_fns(models, tx, hp), state, frozen


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--iterations", type=int, default=20, help="timed, after one warm-up")
  ap.add_argument("--no-phases", action="store_true", help="skip the per-phase timing")
  ap.add_argument(
    "--early-stop-kl",
    type=float,
    help="ppo.early_stop_kl; 1e-30 stops at the first minibatch (the sampler's log-probs round "
    "off the update's): the cost of an iteration whose update stops at once (not the workload)",
  )
  args = ap.parse_args()
  cfg = ModelConfig.gpt2(
    vocab_size=512, hidden_size=args.width, num_layers=args.layers, num_heads=args.heads
  )
  hp = dataclasses.replace(HPARAMS, early_stop_kl=args.early_stop_kl)
  fns, state, frozen = build(cfg, hp)
  prompts = np.random.default_rng(0).integers(4, 512, size=(NUM_PROMPTS, P)).astype(np.int32)
  mask = jnp.ones((B, P), jnp.int32)
  batches = [jnp.asarray(prompts[i : i + B]) for i in range(0, NUM_PROMPTS, B)]

  t0 = time.perf_counter()
  compiled = fns.iterate.lower(state, frozen, batches[0], mask).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(args.iterations + 1):
    t0 = time.perf_counter()
    state, metrics, _ = compiled(state, frozen, batches[i % len(batches)], mask)
    jax.block_until_ready(state.step)
    times.append(time.perf_counter() - t0)
  iter_s = statistics.median(times[1:])
  if hp.early_stop_kl is not None:
    print(f"early stopping: update/early_stopped {float(metrics['update/early_stopped']):.2f}")

  flops = iteration_flops(cfg, hp.num_epochs)
  peak = matmul_peak()
  n_params = sum(x.size for x in jax.tree.leaves(state.params["policy"]))
  print(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind}; GPT-2 L{args.layers} "
    f"d{args.width} ({n_params / 1e6:.1f} M params per model); batch {B}, {P}+{N} tokens, "
    f"{hp.num_epochs} epochs"
  )
  print(f"compile (whole iteration, one program): {compile_s:.1f} s")
  print(
    f"iteration: median {iter_s:.3f} s (min {min(times[1:]):.3f}, max {max(times[1:]):.3f}, "
    f"n={args.iterations}); first {times[0]:.3f} s"
  )
  total = sum(flops.values())
  print(
    f"model FLOPs per iteration {total / 1e9:.1f} G ("
    + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items())
    + f"); {total / iter_s / 1e9:.0f} GFLOP/s = {total / iter_s / peak:.0%} of the "
    f"{peak / 1e9:.0f} GFLOP/s matmul peak measured here"
  )
  if not args.no_phases:
    phase = {"generate": [], "score": [], "update": []}
    for i in range(args.iterations + 1):
      ids = batches[i % len(batches)]
      t0 = time.perf_counter()
      gen = fns.sample(state.params["policy"], frozen, ppo.iteration_keys(state)[0], ids, mask)
      jax.block_until_ready(gen.tokens)
      t1 = time.perf_counter()
      exp, state, roll = fns.score(state, frozen, ids, mask, gen, None)
      jax.block_until_ready(exp.advantages)
      t2 = time.perf_counter()
      state, _ = fns.update(state, frozen, exp, roll["objective/kl"])
      jax.block_until_ready(state.step)
      t3 = time.perf_counter()
      if i:
        for k, v in zip(phase, (t1 - t0, t2 - t1, t3 - t2), strict=True):
          phase[k].append(v)
    med = {k: statistics.median(v) for k, v in phase.items()}
    print(
      "phases as separate programs (median s, model FLOP utilisation): "
      + ", ".join(f"{k} {v:.3f} ({flops[k] / v / peak:.0%})" for k, v in med.items())
      + f"; sum {sum(med.values()):.3f} s"
    )
  print(f"ppo_jax: iter_s={iter_s:.4f} tokens_per_s={B * N / iter_s:.1f}")


if __name__ == "__main__":
  main()
