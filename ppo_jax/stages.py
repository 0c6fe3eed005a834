"""The stages of the pipeline before PPO: the starting policy, then SFT and the reward model, each
saved as a Hugging Face folder in the workdir (and loaded from there instead of trained again when
it exists)."""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from ppo_jax import data, dpo, stage_checkpoints, supervised, writers
from ppo_jax import sharding as shd
from ppo_jax.checkpoint import holds_checkpoints
from ppo_jax.compat import check_compatible, check_reward_model, has_model_folder
from ppo_jax.models import CausalLM, ModelConfig, RewardModel, from_pretrained, save_pretrained
from ppo_jax.models.hf import load_hf_config
from ppo_jax.models.layers import LoRAParam
from ppo_jax.models.lora import add_lora, check_targets
from ppo_jax.rewards import load_reward_fn
from ppo_jax.rows import holdout_by_prompt
from ppo_jax.stage_folders import save_whole, saved_whole
from ppo_jax.token_edges import turn_end_id

if TYPE_CHECKING:
  from ppo_jax.config import Settings
  from ppo_jax.run_inputs import Inputs


def with_adapters(
  s: Settings, policy: CausalLM, workdir: pathlib.Path, tokenizer, *, checkpoints: pathlib.Path
) -> tuple[CausalLM, pathlib.Path | None]:
  """``(policy, base folder)``: with ``ppo.lora_rank``, the policy with fresh LoRA adapters and the
  Hugging Face folder of the base weights under them (``WORKDIR/sft``, or ``WORKDIR/ppo_base``
  when SFT was skipped), which ``ppo-jax export`` merges a checkpoint's adapters onto; without,
  ``(policy, None)``.

  ``ppo_base/`` is written from ``policy`` unless the stage resumes (its ``checkpoints`` folder
  holds some) and finds it there: then the base is read from it, the weights the saved adapters
  were trained over. Rebuilt from the seed instead, on another CPU, it could differ in the last
  bits, and the resume's digest check would refuse it.
  """
  if not s.ppo_run.lora_rank:
    return policy, None
  base_policy = workdir / "sft"
  if not has_model_folder(base_policy):
    base_policy = workdir / "ppo_base"
    if holds_checkpoints(checkpoints) and has_model_folder(base_policy):
      _load_base(policy, base_policy, s.model.numerics())
    else:
      save_whole(policy, base_policy, tokenizer)
  adapted = add_lora(
    policy,
    rank=s.ppo_run.lora_rank,
    alpha=s.ppo_run.lora_alpha,
    targets=s.ppo_run.lora_targets,
    seed=s.seed + 3,
  )
  count = lambda m, kind: sum(x.size for x in jax.tree.leaves(nnx.state(m, kind)))
  print(
    f"LoRA rank {s.ppo_run.lora_rank} on {s.ppo_run.lora_targets}: "
    f"{count(adapted, LoRAParam) / 1e6:.3f}M trainable parameters over the "
    f"{count(policy, nnx.Param) / 1e6:.2f}M base weights of {base_policy}"
  )
  return adapted, base_policy


def _load_base(policy: CausalLM, folder: pathlib.Path, numerics: dict) -> None:
  """Sets ``policy``'s weights to those saved in ``folder``, which must have their shapes."""
  saved = nnx.state(from_pretrained(folder, **numerics), nnx.Param)
  now = nnx.state(policy, nnx.Param)
  shapes = lambda state: [
    (path, x.shape) for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
  ]
  if shapes(saved) != shapes(now):
    raise ValueError(
      f"{folder} holds a model of other shapes than config.model builds, so the checkpoints beside "
      "it were trained over another base; use a new workdir or restore that config"
    )
  nnx.update(policy, saved)
  print(f"resuming over the base weights in {folder}")


def read_preferences(inputs: Inputs, layout: data.Layout) -> tuple:
  """``(chosen, rejected, rows)`` of the preference file: the pairs' sequences and its rows."""
  rows: list[dict] = []
  pairs = data.load_preferences(inputs.preferences, inputs.tokenizer, layout, rows=rows)
  return (*pairs, rows)


def load_preference_split(
  inputs: Inputs, layout: data.Layout, eval_fraction: float, seed: int, held_out: pathlib.Path
) -> tuple[tuple[data.Sequences, data.Sequences], tuple[data.Sequences, data.Sequences]]:
  """``(train pairs, held-out pairs)``, each ``(chosen, rejected)``, of the preference file; the
  held-out rows, as the file has them, are written to ``held_out`` (for ``ppo-jax rm-eval``)."""
  chosen, rejected, rows = inputs.loaded.pop("preferences", None) or read_preferences(
    inputs, layout
  )
  # A prompt's pairs all train or are all held out.
  train_idx, eval_idx = holdout_by_prompt(chosen, eval_fraction, seed=seed, what=inputs.preferences)
  if shd.is_main_process():  # none held out: an earlier run's file would name training rows
    held_out.unlink(missing_ok=True)
    if len(eval_idx):
      held_out.write_text("".join(json.dumps(rows[i]) + "\n" for i in eval_idx))
  print(
    f"{len(train_idx)} training and {len(eval_idx)} held-out preference pairs from "
    f"{inputs.preferences}" + (f" (held-out rows in {held_out})" if len(eval_idx) else "")
  )
  if cut := chosen.truncated + rejected.truncated:
    # Cut responses lose their EOS; two that share their first tokens become one sequence.
    was_cut = chosen.response_mask.all(1) & (chosen.ids[:, -1] != layout.eos_id)  # no EOS fit
    twice = np.all((chosen.ids == rejected.ids) & (chosen.mask == rejected.mask), 1)
    same = int(np.sum(twice & was_cut))
    print(
      f"note: {cut} of the {2 * len(chosen)} responses cut at {layout.response_len} tokens "
      "(data.max_response_len)"
      + (f"; {same} pairs are then the same sequence twice (no preference to learn)" * bool(same))
    )
  return (chosen.take(train_idx), rejected.take(train_idx)), (
    chosen.take(eval_idx),
    rejected.take(eval_idx),
  )


def init_policy(s: Settings, tokenizer: Any, max_len: int) -> CausalLM:
  """The policy before SFT: a Hugging Face folder, or a small model from scratch."""
  m = s.model
  # Responses end with the template's turn end (data.Layout.of): sampling stops there too, and
  # saved models list it among their EOS ids.
  end = turn_end_id(tokenizer) if s.data.chat_template else None
  if m.init != "scratch":
    policy = from_pretrained(m.init, **m.numerics())
    policy.cfg = _tokenizer_ids(_stops_at(policy.cfg, end), tokenizer, m.init)
    stored = str(getattr(load_hf_config(m.init), "dtype", None) or "").removeprefix("torch.")
    if stored in ("bfloat16", "float16") and m.param_dtype_or() == "float32":
      print(
        f"note: {m.init} holds {stored} weights; they train and are saved in float32 (twice "
        f"the size): config.model.dtype={stored} (or model.param_dtype alone) keeps {stored}"
      )
  else:
    cfg = m.scratch_config(
      len(tokenizer),
      eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id,
    )
    policy = CausalLM(_stops_at(cfg, end), rngs=nnx.Rngs(s.seed))
  check_compatible(policy.cfg, tokenizer, max_len)
  if s.ppo_run.lora_rank and not s.stop_after:  # now, not after SFT and the reward model
    check_targets(policy.cfg.model_type, policy.cfg.projections, s.ppo_run.lora_targets)
  return policy


def _stops_at(cfg: ModelConfig, end: int | None) -> ModelConfig:
  """``cfg`` that also stops at ``end`` (None: as it is)."""
  if end is None or end in cfg.stop_ids:
    return cfg
  return cfg.replace(extra_eos_token_ids=(*cfg.extra_eos_token_ids, end))


def _tokenizer_ids(cfg: ModelConfig, tokenizer: Any, folder: str) -> ModelConfig:
  """``cfg`` with the tokenizer's special ids (SFT targets end with its EOS, sampling stops at
  it), saying so when the checkpoint's config.json named others."""
  tok = (tokenizer.eos_token_id, tokenizer.pad_token_id)
  # A tokenizer without a pad of its own pads with EOS (load_tokenizer); the config keeps no pad
  # then, as its checkpoint had none (transformers' classifiers skip a trailing pad-valued EOS).
  fallback = cfg.pad_token_id is None and tok[1] == tok[0]
  new = cfg.with_special_ids(
    eos=tok[0], pad=None if fallback else tok[1], bos=tokenizer.bos_token_id
  )
  if cfg.eos_token_id != tok[0] or cfg.pad_token_id not in (None, tok[1]):
    print(
      f"note: {folder}/config.json has EOS id {cfg.eos_token_id} and pad id "
      f"{cfg.pad_token_id}, the tokenizer EOS {tok[0]} and pad {tok[1]}: training uses the "
      f"tokenizer's, and saved models list EOS ids {[new.eos_token_id, *new.extra_eos_token_ids]}"
    )
  return new


# A stage's held-out metrics, beside its weights: a resumed run reports them again.
HELD_OUT = "ppo_jax_held_out.json"


def _save(s: Settings, name: str, data_file: str, model, out, tokenizer: Any, held_out) -> None:
  """A stage's folder, whole or not at all: the record of how it was trained (first: weights
  are never unrecorded), the model, its held-out metrics."""
  with saved_whole(out) as staging:
    stage_checkpoints.write_record(staging, s, name, data_file)
    save_pretrained(model, staging, tokenizer=tokenizer)
    if jax.process_index() == 0:
      text = json.dumps({k: float(v) for k, v in held_out.items()}) + "\n"
      writers.write_whole(staging / HELD_OUT, text)


def _reuse(
  s: Settings, name: str, out: pathlib.Path, data_file: str | None, **kw
) -> tuple[nnx.Module, dict]:
  """A finished stage's model and held-out metrics (none from before they were saved), unless
  this run would have trained it otherwise (``stage_checkpoints.check_record``)."""
  stage_checkpoints.check_record(out, s, name, data_file)
  stage_checkpoints.drop_checkpoints(out.parent, name)  # left if a run stopped after the save
  print(f"found {out}: loading it instead of training")
  return from_pretrained(out, **kw), _held_out(out / HELD_OUT)


def _held_out(path: pathlib.Path) -> dict[str, float]:
  """A finished stage's held-out metrics; none (with a note) when the file is missing (saved
  before they were) or unreadable: they are reported, never trained on."""
  if not path.is_file():
    return {}
  try:
    held_out = json.loads(path.read_text())
    return {str(k): float(v) for k, v in held_out.items()}
  except (ValueError, TypeError, AttributeError, OSError) as e:
    print(f"note: {path} is unreadable ({e}); the stage's held-out metrics go unreported")
    return {}


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
    with shd.staged_on_host(mesh):
      return _reuse(s, "sft", out, inputs.sft, **s.model.numerics())
  if not inputs.sft or s.sft.epochs == 0:
    print("no SFT (no data.sft file, or sft.epochs=0)")
    stage_checkpoints.note_skipped(workdir, "sft")
    return policy, {}
  seqs = inputs.loaded.pop("sft", None)
  if seqs is None:  # a library caller's Inputs: the pipeline reads it before any stage trains
    seqs = data.load_sft(inputs.sft, inputs.tokenizer, layout)
  # A prompt's responses all train or are all held out.
  train_idx, eval_idx = holdout_by_prompt(seqs, s.sft.eval_fraction, seed=s.seed, what=inputs.sft)
  train_set, eval_set = seqs.take(train_idx), seqs.take(eval_idx)
  print(
    f"{len(train_set)} training and {len(eval_set)} held-out pairs from {inputs.sft}"
    + (
      f" ({seqs.truncated} responses cut at {layout.response_len} tokens)" if seqs.truncated else ""
    )
  )
  return _train_and_save(
    s,
    "sft",
    policy,
    supervised.sft_loss,
    s.sft,
    (lambda i: supervised.sft_batch(train_set, i), len(train_set)),
    (lambda i: supervised.sft_batch(eval_set, i), len(eval_set)),
    (train_set.ids, train_set.mask, train_set.response_mask),
    out=out,
    data_file=inputs.sft,
    tokenizer=inputs.tokenizer,
    seed=s.seed,
    mesh=mesh,
  )


def _train_and_save(
  s: Settings,
  name: str,
  model: nnx.Module,
  loss_fn,
  hp: supervised.SupervisedHparams,
  train_rows: supervised.Rows,
  eval_rows: supervised.Rows,
  data_arrays,
  *,
  out: pathlib.Path,
  data_file: str,
  tokenizer: Any,
  seed: int,
  mesh=None,
  loss_args: dict[str, Any] | None = None,
) -> tuple[nnx.Module, dict]:
  """``supervised.fit`` of stage ``name`` (checkpointed over ``data_arrays``, the training
  arrays, read from ``data_file``; ``loss_args``: the loss's numbers, inputs of its step), its
  model saved to ``out`` with the record of how it was trained, then its checkpoints dropped."""
  workdir = out.parent
  graphdef, params = nnx.split(model)
  with stage_checkpoints.for_stage(s, workdir, name, *data_arrays) as checkpoints:
    params, held_out = supervised.fit(
      name,
      nnx.to_pure_dict(params),
      graphdef,
      loss_fn,
      hp,
      train_rows,
      eval_rows,
      workdir=workdir,
      seed=seed,
      progress=s.log.progress,
      checkpoints=checkpoints,
      mesh=mesh,
      max_nonfinite=s.ppo_run.max_nonfinite,
      loss_args=loss_args,
    )
  model = nnx.merge(graphdef, params)
  _save(s, name, data_file, model, out, tokenizer, held_out)
  stage_checkpoints.drop_checkpoints(workdir, name)
  return model, held_out


def run_dpo(
  s: Settings, policy, inputs, layout, eval_prompts, hp, workdir: pathlib.Path, mesh=None
):
  """DPO from the SFT policy on the preference pairs (``ppo_jax.dpo``), logged to
  ``WORKDIR/dpo_metrics.jsonl``."""
  if not inputs.preferences:
    raise ValueError("config.algo='dpo' needs preference pairs (config.data.preferences)")
  with shd.staged_on_host(mesh):
    policy, base_policy = with_adapters(
      s, policy, workdir, inputs.tokenizer, checkpoints=workdir / "dpo_checkpoints"
    )
  pairs = load_preference_split(
    inputs, layout, s.dpo.eval_fraction, s.seed, workdir / "dpo_held_out_pairs.jsonl"
  )
  if pairs[0][0].margin is not None:
    print("note: the pairs' 'margin' fields are read by the reward model's loss only, not DPO's")
  return dpo.run_dpo_stage(
    s,
    policy,
    pairs,
    eval_prompts,
    inputs.tokenizer,
    hp,
    workdir,
    gold=load_reward_fn(inputs.gold) if inputs.gold else None,
    tokenizer_path=inputs.tokenizer_path,
    base_policy=base_policy,
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
  kw = s.model.numerics()
  if s.reward.model or not s.rm_run.enabled:
    stage_checkpoints.note_skipped(workdir, "rm")
  if s.reward.model:
    print(f"reward model: {s.reward.model}")
    check_reward_model(
      s.reward.model, tokenizer=inputs.tokenizer, tokenizer_folder=inputs.tokenizer_path
    )
    with shd.staged_on_host(mesh):
      return from_pretrained(s.reward.model, kind="reward", **kw), {}
  if not s.rm_run.enabled:
    print(f"no reward model (config.rm.enabled=False): scores from {s.reward.fn}")
    return None, {}
  if has_model_folder(out):
    with shd.staged_on_host(mesh):
      return _reuse(s, "rm", out, inputs.preferences, kind="reward", **kw)
  if not inputs.preferences:
    raise ValueError("config.rm.enabled=True needs config.data.preferences=FILE.jsonl")
  train_pairs, eval_pairs = load_preference_split(
    inputs, layout, s.rm.eval_fraction, s.seed, workdir / "rm_held_out_pairs.jsonl"
  )
  with shd.staged_on_host(mesh):
    rm = RewardModel(policy.cfg, rngs=nnx.Rngs(s.seed + 1))
  if s.rm_run.init == "policy":
    nnx.update(rm.trunk, nnx.state(policy.trunk))
  return _train_and_save(
    s,
    "rm",
    rm,
    supervised.reward_loss,
    s.rm,
    (lambda i: supervised.pair_batch(train_pairs, i), len(train_pairs[0])),
    (lambda i: supervised.pair_batch(eval_pairs, i), len(eval_pairs[0])),
    [x for seqs in train_pairs for x in (seqs.ids, seqs.mask, seqs.margin) if x is not None],
    out=out,
    data_file=inputs.preferences,
    tokenizer=inputs.tokenizer,
    seed=s.seed + 1,
    mesh=mesh,
    # An input of the step, not a constant: a sweep over it runs one program.
    loss_args={"center_coef": np.float32(s.rm_run.center_coef)},
  )
