"""Per-device memory of the PPO programs for a ~1B Llama-style model on 8 devices, per saver,
and of DPO's training step with the full weights and with LoRA adapters.

Nothing is allocated: the programs are compiled ahead of time from abstract shapes
(``jax.jit(...).lower(...).compile()``) and XLA reports each one's memory
(``memory_analysis()``). Two programs matter: the scoring pass (policy, reference, critic and
reward model forward over the rollout) and the update (forward + backward of policy and critic,
optimizer). Resident = parameters and optimizer states of everything PPO holds; peak = the larger
of the two programs' arguments + temporaries.

  python bench/memory.py                 # 8 simulated CPU devices unless XLA_FLAGS says more
  python bench/memory.py --batch 64 --prompt 256 --response 256
  python bench/memory.py --dpo           # DPO's step only (batch: preference pairs), whole
                                         # and in micro-batches of a quarter of the batch

The figures come from XLA's CPU compiler (this machine has no accelerator); GPU and TPU compilers
schedule differently, so take them as relative.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
from flax import nnx
from flops import llama_1b

from ppo_jax import dpo, ppo, rollout, supervised
from ppo_jax import sharding as shd
from ppo_jax.actor_critic import ActorCritic
from ppo_jax.models import CausalLM, RewardModel, ScalarHead, ValueModel
from ppo_jax.optim import OptimHparams, make_actor_critic_optimizer, make_optimizer
from ppo_jax.sampling import Generation

GB = 1024**3


@dataclasses.dataclass(frozen=True)
class Saver:
  name: str
  mesh: tuple = (1, 8, 1)
  shared_trunk: bool = False
  remat: str = "none"
  dtype: str = "float32"
  micro_batch: int | None = None
  lora_rank: int = 0


SAVERS = [
  Saver("data parallel only (mesh 8×1×1), fp32, separate critic", mesh=(8, 1, 1)),
  Saver("FSDP (mesh 1×8×1)"),
  Saver("+ value head on the policy trunk", shared_trunk=True),
  Saver("+ remat (recompute each block)", shared_trunk=True, remat="block"),
  Saver("+ bf16 compute, fp32 master weights", shared_trunk=True, remat="block", dtype="bfloat16"),
  Saver("+ micro-batches of 8", shared_trunk=True, remat="block", dtype="bfloat16", micro_batch=8),
  Saver(
    "+ LoRA r=16 on q,k,v,o (reference = base)",
    shared_trunk=True,
    remat="block",
    dtype="bfloat16",
    micro_batch=8,
    lora_rank=16,
  ),
]


def abstract(tree, shardings):
  """ShapeDtypeStructs that carry their shardings: what ``.lower`` needs, nothing allocated."""
  return jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings
  )


def per_device_gb(tree, shardings) -> float:
  leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
  return sum(x.dtype.itemsize * math.prod(sh.shard_shape(x.shape)) for x, sh in leaves) / GB


def build_abstract(saver: Saver):
  """PPO's models as shapes only: ``(ActorCritic, params, frozen policy, reward params)``."""
  cfg = llama_1b(remat=saver.remat, dtype=saver.dtype, param_dtype="float32")
  critic_cfg = cfg.replace(remat="none")
  graphs = {}

  def build():
    policy = CausalLM(cfg.replace(lora_rank=saver.lora_rank), rngs=nnx.Rngs(0))
    value = (
      ScalarHead(cfg.hidden_size, rngs=nnx.Rngs(2))
      if saver.shared_trunk
      else ValueModel(critic_cfg, rngs=nnx.Rngs(2))
    )
    models, params, frozen_policy, reward_params = ActorCritic.build(
      policy, value, RewardModel(critic_cfg, rngs=nnx.Rngs(3))
    )
    graphs["models"] = models
    return params, frozen_policy, reward_params

  params, frozen_policy, reward_params = jax.eval_shape(build)
  return graphs["models"], params, frozen_policy, reward_params


def measure(saver: Saver, *, batch: int, prompt: int, response: int) -> dict[str, float]:
  models, params, frozen_policy, reward_params = build_abstract(saver)
  hp = ppo.PPOHparams(
    max_new_tokens=response,
    num_epochs=1,
    num_minibatches=1,
    micro_batch_size=saver.micro_batch,
    eos_token_id=1,
  )
  tx = make_actor_critic_optimizer(OptimHparams(lr=1e-6), policy_steps=1000, value_steps=1000)
  state = jax.eval_shape(lambda p: ppo.init_state(p, tx, hp, seed=0), params)
  frozen = ppo.Frozen(frozen_policy, reward_params, hparams=hp.numbers())  # as rl.run_ppo's
  pl = rollout.Placement.build(shd.make_mesh(saver.mesh), state, frozen, tx)
  fns = rollout.make_step_fns(models, tx, hp, placement=pl)

  def rows(n, dtype=jnp.float32):
    return jax.ShapeDtypeStruct((batch, n), dtype, sharding=pl.batch)

  L = prompt + response
  exp = ppo.Experience(
    ids=rows(L, jnp.int32),
    mask=rows(L, jnp.int32),
    **{
      k: rows(response)
      for k in ("response_mask", "old_logprobs", "ref_logprobs", "old_values", "advantages")
    },
    returns=rows(response),
    ok=jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=pl.vector),
  )
  gen = Generation(tokens=rows(response, jnp.int32), logprobs=rows(response), mask=rows(response))
  state_a, frozen_a = abstract(state, pl.state), abstract(frozen, pl.frozen)
  key = jax.ShapeDtypeStruct(
    (), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=pl.replicated
  )
  programs = {
    "sample": lambda: fns.sample.lower(
      state_a.params["policy"], frozen_a, key, rows(prompt, jnp.int32), rows(prompt, jnp.int32)
    ),
    "score": lambda: fns.score.lower(
      state_a, frozen_a, rows(prompt, jnp.int32), rows(prompt, jnp.int32), gen, None
    ),
    "update": lambda: fns.update.lower(
      state_a, frozen_a, exp, jax.ShapeDtypeStruct((), jnp.float32, sharding=pl.replicated)
    ),
  }
  out = {}
  t0 = time.perf_counter()
  for name, lower in programs.items():
    m = lower().compile().memory_analysis()
    out[f"{name}_temp"] = m.temp_size_in_bytes / GB
    # Donated arguments are reused for outputs, so arguments + temporaries bound the live set.
    out[f"{name}_peak"] = (m.argument_size_in_bytes + m.temp_size_in_bytes) / GB
  out["compile_s"] = time.perf_counter() - t0
  out["state"] = per_device_gb(state, pl.state)
  out["frozen"] = per_device_gb(frozen, pl.frozen)
  out["trainable"] = sum(x.size for x in jax.tree.leaves(params)) / 1e6
  return out


def measure_dpo(
  lora_rank: int, *, batch: int, prompt: int, response: int, micro: int | None = None
) -> dict[str, float]:
  """DPO's jitted training step (``supervised.make_step`` of ``dpo.dpo_objective``, donated as
  ``supervised.train`` donates it) on the FSDP mesh 1×8×1, remat, bf16 compute over fp32
  weights: the policy's weights or, with ``lora_rank``, adapters on q,k,v,o over the frozen base;
  with ``micro``, the batch's gradient accumulated over micro-batches of that many pairs
  (``dpo.micro_batch_size``). The reference log-probs come in the batch (DPO computes them once,
  before training)."""
  cfg = llama_1b(remat="block", dtype="bfloat16", param_dtype="float32", lora_rank=lora_rank)
  graphs = {}

  def build():
    models, params, frozen_policy, _ = ActorCritic.build(CausalLM(cfg, rngs=nnx.Rngs(0)), None)
    graphs["models"] = models
    return params["policy"], frozen_policy

  params, base = jax.eval_shape(build)
  models = graphs["models"]
  frozen = base if models.lora else None
  mesh = shd.make_mesh((1, 8, 1))
  tx = make_optimizer(OptimHparams(lr=1e-6), 1000)
  param_sh = shd.param_shardings(params, mesh)
  opt_state = jax.eval_shape(tx.init, params)
  opt_sh = shd.optimizer_shardings(tx, params, param_sh, mesh)
  frozen_sh = None if frozen is None else shd.param_shardings(frozen, mesh)
  L, rows, vector = prompt + response, shd.batch_sharding(mesh, 2), shd.batch_sharding(mesh, 1)
  shapes = {"ids": (L, jnp.int32), "mask": (L, jnp.int32), "response_mask": (response, jnp.float32)}
  pairs = {}
  for side in ("chosen", "rejected"):
    for k, (n, dtype) in shapes.items():
      pairs[f"{side}_{k}"] = jax.ShapeDtypeStruct((batch, n), dtype, sharding=rows)
    pairs[f"ref_{side}"] = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=vector)
  objective = functools.partial(dpo.dpo_objective, beta=0.1)
  n_micro = supervised.SupervisedHparams(batch_size=batch, micro_batch_size=micro).micro_batches(
    batch
  )
  step = jax.jit(
    supervised.make_step(objective, models.policy, tx, n_micro=n_micro, mesh=mesh),
    donate_argnums=(0, 1),
    in_shardings=(param_sh, opt_sh, frozen_sh, None),
    out_shardings=(param_sh, opt_sh, None),
  )
  t0 = time.perf_counter()
  args = (abstract(params, param_sh), abstract(opt_state, opt_sh))
  args += (None if frozen is None else abstract(frozen, frozen_sh), pairs)
  m = step.lower(*args).compile().memory_analysis()
  return {
    "trainable": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
    "state": per_device_gb(params, param_sh) + per_device_gb(opt_state, opt_sh),
    "frozen": 0.0 if frozen is None else per_device_gb(frozen, frozen_sh),
    "peak": (m.argument_size_in_bytes + m.temp_size_in_bytes) / GB,
    "compile_s": time.perf_counter() - t0,
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--batch", type=int, default=32, help="rollout batch (prompts); DPO: pairs")
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--response", type=int, default=128)
  ap.add_argument(
    "--dpo", action="store_true", help="DPO's step: full weights, micro-batched, LoRA r=16"
  )
  args = ap.parse_args()
  n = sum(
    x.size
    for x in jax.tree.leaves(
      nnx.state(nnx.eval_shape(lambda: CausalLM(llama_1b(), rngs=nnx.Rngs(0))))
    )
  )
  print(
    f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices; "
    f"policy {n / 1e9:.2f} B parameters; batch {args.batch} × ({args.prompt} prompt + "
    f"{args.response} response) tokens; GB per device\n"
  )
  if args.dpo:
    print(
      "| DPO step | trainable (M params) | resident: trained state | resident: frozen base | ",
      end="",
    )
    print("step peak |\n|---|---|---|---|---|")
    micro = max(8, args.batch // 4)  # a quarter of the batch, split over the 8 devices
    rows = [
      ("full weights", 0, None),
      (f"full weights, micro-batches of {micro} pairs", 0, micro),
      ("LoRA r=16 on q,k,v,o (reference = base)", 16, None),
    ]
    for name, rank, m in rows:
      r = measure_dpo(rank, batch=args.batch, prompt=args.prompt, response=args.response, micro=m)
      print(
        f"| {name} | {r['trainable']:.1f} | {r['state']:.2f} | {r['frozen']:.2f} | "
        f"{r['peak']:.2f} |",
        flush=True,
      )
    return
  print(
    "| saver | trainable (M params) | resident: PPO state | resident: frozen models | "
    "sampler peak | scoring peak | update peak |"
  )
  print("|---|---|---|---|---|---|---|")
  for saver in SAVERS:
    r = measure(saver, batch=args.batch, prompt=args.prompt, response=args.response)
    print(
      f"| {saver.name} | {r['trainable']:.1f} | {r['state']:.2f} | {r['frozen']:.2f} | "
      f"{r['sample_peak']:.2f} | {r['score_peak']:.2f} | {r['update_peak']:.2f} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
