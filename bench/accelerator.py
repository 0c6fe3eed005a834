"""PPO on an accelerator: train-step model FLOP utilisation and decode speed against the HBM
roofline, for a ~1B Llama in bf16 (issue 7's GPU figures).

Model: Llama 3.2 1B's shape (random weights), fp32 master weights, bf16 compute; the critic is a
value head on the policy trunk; the reference is the frozen copy and the reward model has the same
shape. One rollout batch: B prompts of P random tokens → R sampled tokens (no EOS stop).

- Train step: one PPO update (1 epoch × 1 minibatch: forward + backward of policy and value head,
  AdamW) on that batch. Model FLOPs = 3 × forward (the trunk over P + R tokens, the unembedding
  over the R response positions, as the update computes them).
- Decode: the PPO sampler (prefill, then R − 1 steps in one ``lax.while_loop``); the time per
  step is (t(R) − t(1)) / (R − 1). A step must at least read every bf16 weight once and the KV
  cache at its current length, so bytes per step / step time / memory bandwidth is the fraction
  of the roofline reached.
- Peaks: measured here, the faster of each pair (a bf16 n³ matmul, one and eight per call; a
  read-only sum and ``x + 1`` over a large bf16 array) and, where the device is known or
  ``--peak-tflops`` / ``--peak-tbps`` are given, the vendor's figure.
- ``--lora R`` (with ``--decode-only``): the policy carries rank-R adapters on every projection,
  as in a LoRA run; the sampler folds them into the kernels before the loop, so its steps
  should cost what the plain policy's do.
- ``--attention cudnn``: cuDNN's fused attention (``model.attention``) in the score pass, the
  update and the sampler's decode steps (over a sequence-major cache); the score line gives the
  sampled tokens' log-prob drift between the full forward and the sampler either way.

- The decode loop as compiled: whether XLA knows its trip count (else XLA:GPU reads a predicate
  back to the host after every step) and whether a float32 weight is cast inside it (``hlo.py``).

  python bench/accelerator.py                          # 1B Llama, B 32, P 256, R 256
  python bench/accelerator.py --preset tiny            # a small smoke run, e.g. on CPU
  python bench/accelerator.py --decode-only --hlo-out decode.hlo.txt

On the H200 run it through ``bench/gpu_session.sh`` (one device call, every figure under $OUT).

The last line reads ``accelerator: train_mfu=<fraction> decode_roofline=<fraction>`` (both
against the measured peaks; ``train_mfu=skipped`` with ``--decode-only``).
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
from flops import decode_step_bytes, forward_flops, llama_1b
from hlo import describe, loop_report
from timing import alternate, copy_bandwidth, matmul_peak, read_bandwidth

from ppo_jax import ppo, rollout
from ppo_jax.actor_critic import ActorCritic
from ppo_jax.models import CausalLM, ModelConfig, RewardModel, ScalarHead
from ppo_jax.optim import OptimHparams, make_actor_critic_optimizer

# Dense bf16 TFLOP/s and HBM TB/s from the vendors' data sheets, by device_kind.
SPEC = {"NVIDIA H200": (989e12, 4.8e12), "NVIDIA H100 80GB HBM3": (989e12, 3.35e12)}

PRESETS = {
  "1b": dict(batch=32, prompt=256, response=256, matmul_n=8192, matmul_batch=8, copy_gib=4.0),
  "tiny": dict(batch=4, prompt=16, response=16, matmul_n=512, matmul_batch=2, copy_gib=0.0625),
}


def tiny_llama(**kw) -> ModelConfig:
  return ModelConfig.llama(
    vocab_size=512,
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=256,
    max_position_embeddings=256,
    **kw,
  )


def build(cfg: ModelConfig, hp: ppo.PPOHparams, *, lora: int = 0):
  targets = ",".join(cfg.projections)
  policy = CausalLM(cfg.replace(lora_rank=lora, lora_targets=targets), rngs=nnx.Rngs(0))
  head = ScalarHead(cfg.hidden_size, zero_init=True, rngs=nnx.Rngs(2))
  reward = RewardModel(cfg, rngs=nnx.Rngs(1))
  models, params, frozen_policy, reward_params = ActorCritic.build(policy, head, reward)
  del policy, head, reward
  tx = make_actor_critic_optimizer(OptimHparams(lr=1e-6), policy_steps=10_000, value_steps=10_000)
  state = ppo.init_state(params, tx, hp, seed=0)
  frozen = ppo.Frozen(frozen_policy, reward_params, hparams=hp.numbers())  # as rl.run_ppo's
  return models, tx, state, frozen


def median_time(fn, repeats: int) -> float:
  """Median seconds of ``repeats`` calls after one warm-up (compile) call."""
  return statistics.median(alternate({"fn": fn}, repeats=repeats)["fn"])


def write_profile(path: str, fn, title: str) -> None:
  """Traces one ``fn()`` (compiled and warm) and writes its time per op family to ``path``."""
  import tempfile

  from profile_ops import summarize

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      fn()
    text = summarize(trace_dir, title=title)
  with open(path, "w") as f:
    f.write(text)
  print(f"profile of {title}: {path}", flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
  ap.add_argument("--batch", type=int, help="rollout batch B (default: the preset's)")
  ap.add_argument("--prompt", type=int, help="prompt tokens P")
  ap.add_argument("--response", type=int, help="sampled tokens R")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--remat", default="none", choices=["none", "block", "dots"])
  ap.add_argument(
    "--attention",
    default="xla",
    choices=["xla", "cudnn"],
    help="model.attention: score, update, decode steps",
  )
  ap.add_argument("--decode-only", action="store_true", help="skip the train step")
  ap.add_argument("--lora", type=int, default=0, help="rank-R adapters on the policy (decode only)")
  ap.add_argument("--hlo-out", help="write the compiled sampler's optimised HLO text here")
  ap.add_argument(
    "--profile-out", help="trace one sampler call and write its time per op family here"
  )
  ap.add_argument("--peak-tflops", type=float, help="the device's bf16 peak (default: SPEC)")
  ap.add_argument("--peak-tbps", type=float, help="the device's memory bandwidth (default: SPEC)")
  args = ap.parse_args()
  if args.lora and not args.decode_only:  # a LoRA update's FLOPs are not 3 × forward
    raise SystemExit("--lora times decoding only: add --decode-only")
  pre = PRESETS[args.preset]
  B = args.batch or pre["batch"]
  P = args.prompt or pre["prompt"]
  R = args.response or pre["response"]
  make_cfg = llama_1b if args.preset == "1b" else tiny_llama
  cfg = make_cfg(
    dtype="bfloat16", param_dtype="float32", remat=args.remat, attention=args.attention
  )
  if P + R > cfg.max_position_embeddings:
    raise SystemExit(f"prompt {P} + response {R} exceeds {cfg.max_position_embeddings} positions")
  dev = jax.devices()[0]
  spec = SPEC.get(dev.device_kind, (None, None))
  spec_flops = args.peak_tflops * 1e12 if args.peak_tflops else spec[0]
  spec_bw = args.peak_tbps * 1e12 if args.peak_tbps else spec[1]

  t0 = time.perf_counter()
  n, nbytes = pre["matmul_n"], int(pre["copy_gib"] * 2**30)
  # The strictest denominators: the faster of each pair.
  matmuls = {
    1: matmul_peak(n, "bfloat16"),
    pre["matmul_batch"]: matmul_peak(n, "bfloat16", batch=pre["matmul_batch"]),
  }
  peak_flops = max(matmuls.values())
  copy_bw, read_bw = copy_bandwidth(nbytes), read_bandwidth(nbytes)
  peak_bw = max(copy_bw, read_bw)
  hp = ppo.PPOHparams(
    max_new_tokens=R, temperature=1.0, eos_token_id=None, num_epochs=1, num_minibatches=1
  )
  models, tx, state, frozen = build(cfg, hp, lora=args.lora)
  base = frozen.ref_params if args.lora else state.params["policy"]  # LoRA: the frozen base
  n_params = sum(x.size for x in jax.tree.leaves(base))
  fns = rollout.make_step_fns(models, tx, hp)
  first = rollout.make_step_fns(models, tx, dataclasses.replace(hp, max_new_tokens=1))
  ids = jnp.asarray(np.random.default_rng(0).integers(4, cfg.vocab_size, (B, P)), jnp.int32)
  mask = jnp.ones((B, P), jnp.int32)
  key = jax.random.key(0)
  print(
    f"jax {jax.__version__} on {dev.device_kind} ({dev.platform}); Llama L{cfg.num_layers} "
    f"d{cfg.hidden_size} ({n_params / 1e6:,.1f} M params), bf16 compute, fp32 master weights; "
    f"batch {B} × ({P} prompt + {R} response) tokens; attention {cfg.attention}; "
    + (f"LoRA rank {args.lora} on {','.join(cfg.projections)}; " if args.lora else "")
    + f"setup {time.perf_counter() - t0:.0f} s",
    flush=True,
  )
  print(
    "measured peaks: bf16 matmul "
    + ", ".join(f"{f / 1e12:,.3g} TFLOP/s ({k} × {n}³ per call)" for k, f in matmuls.items())
    + f"; memory {read_bw / 1e9:,.0f} GB/s read-only (sum), {copy_bw / 1e9:,.0f} GB/s read + "
    f"write (x + 1), over {nbytes / 2**30:g} GiB",
    flush=True,
  )

  # Decode: first what XLA made of the loop, then its speed.
  policy_params = state.params["policy"]
  sample_all = fns.sample.lower(policy_params, frozen, key, ids, mask).compile()
  hlo = sample_all.as_text()
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(hlo)
  weights = {x.shape for x in jax.tree.leaves(base) if x.ndim >= 2}
  print("decode loop as compiled: " + describe(loop_report(hlo, shapes=weights)), flush=True)
  run_all = lambda: jax.block_until_ready(sample_all(policy_params, frozen, key, ids, mask))
  run_one = lambda: jax.block_until_ready(first.sample(policy_params, frozen, key, ids, mask))
  t_all = median_time(run_all, args.repeats)
  t_one = median_time(run_one, args.repeats)
  step_s = (t_all - t_one) / max(R - 1, 1)
  step_bytes = decode_step_bytes(cfg, B, P + R / 2, itemsize=2)
  # The attention reads every one of the P + R cache slots (masked) on every step.
  read_bytes = decode_step_bytes(cfg, B, P + R, itemsize=2)

  def against(value, measured, vendor, unit):
    text = f"{value / measured:.0%} of the measured {measured / unit:,.3g}"
    return text + (f", {value / vendor:.0%} of the spec {vendor / unit:,.3g}" if vendor else "")

  print(
    f"decode: {B * R / t_all:,.0f} tokens/s; {t_all:.3f} s for {R} tokens, prefill + first "
    f"{t_one * 1e3:.1f} ms; {step_s * 1e3:.3g} ms per step reading ≥ {step_bytes / 1e9:.3g} GB "
    f"= {step_bytes / step_s / 1e9:,.3g} GB/s; "
    + against(step_bytes / step_s, peak_bw, spec_bw, 1e9)
    + f" GB/s (as read, the whole cache: {read_bytes / 1e9:.3g} GB, "
    f"{read_bytes / step_s / peak_bw:.0%} of the measured)",
    flush=True,
  )
  decode_roofline = step_bytes / step_s / peak_bw
  if args.profile_out:
    write_profile(args.profile_out, run_all, f"one sampler call: prefill + {R - 1} decode steps")
  if args.decode_only:
    print(f"accelerator: train_mfu=skipped decode_roofline={decode_roofline:.3f}")
    return

  # Score once for a real Experience, then time the update on it.
  gen = sample_all(policy_params, frozen, key, ids, mask)
  t_score = time.perf_counter()
  exp, state, roll = fns.score(state, frozen, ids, mask, gen, None)
  jax.block_until_ready(exp.advantages)
  t_score = time.perf_counter() - t_score
  # The score pass recomputes the sampled tokens' log-probs with a full forward; the sampler got
  # them from the KV-cache path (both with attention ``cfg.attention``, the prefill with attend).
  drift = jnp.max(jnp.abs(exp.old_logprobs - gen.logprobs) * exp.response_mask)
  kl = roll["objective/kl"]
  holder = {"state": state}

  def update():
    holder["state"], _ = fns.update(holder["state"], frozen, exp, kl)
    jax.block_until_ready(holder["state"].step)

  t_update = median_time(update, args.repeats)
  train_flops = 3 * forward_flops(cfg, B * (P + R), (P + R + 1) / 2, lm_head_tokens=B * R)
  print(
    f"score (first call, compile included): {t_score:.2f} s; max |Δ| of the sampled tokens' "
    f"log-probs, full forward ({cfg.attention}) vs the sampler's: {float(drift):.3g}"
  )
  print(
    f"train step (PPO update, {train_flops / 1e12:.3g} TFLOP): {t_update * 1e3:.1f} ms = "
    f"{train_flops / t_update / 1e12:.3g} TFLOP/s; "
    + against(train_flops / t_update, peak_flops, spec_flops, 1e12)
    + " TFLOP/s"
  )
  print(
    f"accelerator: train_mfu={train_flops / t_update / peak_flops:.3f} "
    f"decode_roofline={decode_roofline:.3f}"
  )


if __name__ == "__main__":
  main()
