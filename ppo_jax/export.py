"""Export: the policy of a PPO checkpoint as a Hugging Face folder (``ppo-jax export``)."""

from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp

from ppo_jax.checkpoint import read
from ppo_jax.models import ModelConfig


def export_policy(
  workdir: str | pathlib.Path, out: str | pathlib.Path, *, step: int | None = None
) -> int:
  """Writes the policy of a PPO checkpoint (default: the latest) as a Hugging Face folder."""
  from flax import nnx

  from ppo_jax.models import CausalLM, from_pretrained, save_pretrained
  from ppo_jax.models.lora import add_lora, merge_lora, split_lora
  from ppo_jax.tokenizer import load_tokenizer

  _check_export_target(pathlib.Path(workdir), pathlib.Path(out))
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: no checkpoints (is {workdir} a ppo_jax workdir?)")
  mgr = ocp.CheckpointManager(
    directory.absolute(), options=ocp.CheckpointManagerOptions(read_only=True)
  )
  try:
    steps = mgr.all_steps()
    if not steps:
      raise FileNotFoundError(f"{directory}: no complete checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
      raise ValueError(f"no checkpoint of step {step} in {directory} (there are {sorted(steps)})")
    others = sorted(set(steps) - {step})
    then = (
      f"export another step with --step (there are {others})" if others else "it is the only one"
    )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    restored = read(
      lambda: mgr.restore(step, args=args),
      directory / str(step),
      then,
    )
  finally:
    mgr.close()
  record = restored.meta
  cfg = ModelConfig.from_dict(record["model_config"])
  policy_params = _int_keys(restored.state["params"]["policy"])
  if cfg.lora_rank:  # adapters: merged onto the base weights they were trained over
    base = from_pretrained(record["base_policy"], dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    graphdef, adapters, base_params = split_lora(
      add_lora(base, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
    )
    adapters = jax.tree.map(lambda _, x: x, adapters, policy_params)
    policy = merge_lora(nnx.merge(graphdef, adapters, base_params))
  else:
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    policy = nnx.merge(
      graphdef, jax.tree.map(lambda _, x: x, nnx.to_pure_dict(abstract), policy_params)
    )
  tokenizer = load_tokenizer(record["tokenizer"]) if record.get("tokenizer") else None
  save_pretrained(policy, out, tokenizer=tokenizer)
  (pathlib.Path(out) / "ppo_jax_checkpoint.json").write_text(
    json.dumps({"workdir": str(workdir), "step": step}, indent=2) + "\n"
  )
  return step


# What a run writes into its workdir: an export must not land on any of it.
RUN_FOLDERS = (
  "checkpoints",
  "sft_checkpoints",
  "rm_checkpoints",
  "dpo_checkpoints",
  "sft",
  "reward_model",
  "policy",
  "ppo_base",
  "data",
  "tensorboard",
  "plots",
  "samples",
)


def _check_export_target(workdir: pathlib.Path, out: pathlib.Path) -> None:
  w, o = workdir.resolve(), out.resolve()
  if o == w:
    raise ValueError(f"--out {out} is the workdir: the export would overwrite the run's files")
  for name in RUN_FOLDERS:
    if o.is_relative_to((w / name).resolve()):
      raise ValueError(f"--out {out} is inside the run's {name}/ folder: choose another folder")


def _int_keys(tree):
  """Orbax stores dict keys as strings; NNX layer lists use integers."""
  if isinstance(tree, dict):
    return {
      (int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()
    }
  return tree
