"""The supervised stages of the pipeline: SFT and the reward model, each saved as a Hugging Face
folder in the workdir (and loaded from there instead of trained again when it exists)."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

from flax import nnx

from ppo_jax import data, dpo, supervised
from ppo_jax.models import CausalLM, RewardModel, from_pretrained, save_pretrained
from ppo_jax.models.hf import load_hf_config
from ppo_jax.rewards import load_reward_fn

if TYPE_CHECKING:
  from ppo_jax.config import Settings
  from ppo_jax.pipeline import Inputs


def has_model_folder(folder: pathlib.Path) -> bool:
  return (folder / "config.json").is_file() and any(folder.glob("*.safetensors*"))


def load_preference_split(
  inputs: Inputs, layout: data.Layout, eval_fraction: float, seed: int
) -> tuple[tuple[data.Sequences, data.Sequences], tuple[data.Sequences, data.Sequences]]:
  """``(train pairs, held-out pairs)``, each ``(chosen, rejected)``, of the preference file."""
  chosen, rejected = data.load_preferences(inputs.preferences, inputs.tokenizer, layout)
  train_idx, eval_idx = data.split_holdout(len(chosen), eval_fraction, seed=seed)
  print(
    f"{len(train_idx)} training and {len(eval_idx)} held-out preference pairs from "
    f"{inputs.preferences}"
  )
  return (chosen.take(train_idx), rejected.take(train_idx)), (
    chosen.take(eval_idx),
    rejected.take(eval_idx),
  )


def run_sft(
  s: Settings,
  policy: CausalLM,
  inputs: Inputs,
  layout: data.Layout,
  workdir: pathlib.Path,
  mesh=None,
) -> tuple[CausalLM, dict]:
  out = workdir / "sft"
  if has_model_folder(out):
    print(f"found {out}: loading it instead of training")
    return from_pretrained(
      out, dtype=s.model.dtype, param_dtype=s.model.param_dtype, remat=s.model.remat
    ), {}
  if not inputs.sft or s.sft.epochs == 0:
    print("no SFT (no data.sft file, or sft.epochs=0)")
    return policy, {}
  seqs = data.load_sft(inputs.sft, inputs.tokenizer, layout)
  train_idx, eval_idx = data.split_holdout(len(seqs), s.sft.eval_fraction, seed=s.seed)
  train_set, eval_set = seqs.take(train_idx), seqs.take(eval_idx)
  print(
    f"{len(train_set)} training and {len(eval_set)} held-out pairs from {inputs.sft}"
    + (
      f" ({seqs.truncated} responses cut at {layout.response_len} tokens)" if seqs.truncated else ""
    )
  )
  graphdef, params = nnx.split(policy)
  params, held_out = supervised.fit(
    "sft",
    nnx.to_pure_dict(params),
    graphdef,
    supervised.sft_loss,
    s.sft,
    (lambda i: supervised.sft_batch(train_set, i), len(train_set)),
    (lambda i: supervised.sft_batch(eval_set, i), len(eval_set)),
    workdir=workdir,
    seed=s.seed,
    progress=s.log.progress,
    mesh=mesh,
  )
  policy = nnx.merge(graphdef, params)
  save_pretrained(policy, out, tokenizer=inputs.tokenizer)
  return policy, held_out


def run_dpo(
  s: Settings, policy, inputs, layout, eval_prompts, hp, workdir: pathlib.Path, mesh=None
):
  """DPO from the SFT policy on the preference pairs (``ppo_jax.dpo``), logged to
  ``WORKDIR/dpo_metrics.jsonl``."""
  if not inputs.preferences:
    raise ValueError("config.algo='dpo' needs preference pairs (config.data.preferences)")
  return dpo.run_dpo_stage(
    s,
    policy,
    load_preference_split(inputs, layout, s.dpo.eval_fraction, s.seed),
    eval_prompts,
    inputs.tokenizer,
    hp,
    workdir,
    gold=load_reward_fn(inputs.gold) if inputs.gold else None,
    mesh=mesh,
  )


def run_reward_model(
  s: Settings,
  policy: CausalLM,
  inputs: Inputs,
  layout: data.Layout,
  workdir: pathlib.Path,
  mesh=None,
) -> tuple[RewardModel | None, dict]:
  out = workdir / "reward_model"
  kw = dict(dtype=s.model.dtype, param_dtype=s.model.param_dtype, remat=s.model.remat)
  if s.reward.model:
    print(f"reward model: {s.reward.model}")
    architectures = getattr(load_hf_config(s.reward.model), "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
      raise ValueError(
        f"config.reward.model: {s.reward.model} is not a reward model (architectures "
        f"{architectures}; expected a *ForSequenceClassification with its score head)"
      )
    return from_pretrained(s.reward.model, kind="reward", **kw), {}
  if not s.rm_run.enabled:
    return None, {}
  if has_model_folder(out):
    print(f"found {out}: loading it instead of training")
    return from_pretrained(out, kind="reward", **kw), {}
  if not inputs.preferences:
    raise ValueError("config.rm.enabled=True needs config.data.preferences=FILE.jsonl")
  train_pairs, eval_pairs = load_preference_split(inputs, layout, s.rm.eval_fraction, s.seed)
  rm = RewardModel(policy.cfg, rngs=nnx.Rngs(s.seed + 1))
  if s.rm_run.init == "policy":
    nnx.update(rm.trunk, nnx.state(policy.trunk))
  graphdef, params = nnx.split(rm)
  params, held_out = supervised.fit(
    "rm",
    nnx.to_pure_dict(params),
    graphdef,
    supervised.reward_loss,
    s.rm,
    (lambda i: supervised.pair_batch(train_pairs, i), len(train_pairs[0])),
    (lambda i: supervised.pair_batch(eval_pairs, i), len(eval_pairs[0])),
    workdir=workdir,
    seed=s.seed + 1,
    progress=s.log.progress,
    mesh=mesh,
  )
  rm = nnx.merge(graphdef, params)
  save_pretrained(rm, out, tokenizer=inputs.tokenizer)
  return rm, held_out
