"""The RLHF pipeline, top to bottom: data → SFT → reward model → PPO.

Each stage writes a Hugging Face folder into the workdir (``sft/``, ``reward_model/``,
``policy/``); a stage whose folder already exists is loaded instead of trained again, so a run
that stopped after its reward model resumes at PPO.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
from flax import nnx

from ppo_jax import data, rl, supervised, synthetic, writers
from ppo_jax.config import Settings
from ppo_jax.models import CausalLM, ModelConfig, RewardModel, from_pretrained, save_pretrained
from ppo_jax.rewards import load_reward_fn
from ppo_jax.tokenizer import load_tokenizer

_LAST_BANNER = [time.perf_counter()]


def banner(title: str) -> None:
  """A stage heading, with the time the previous stage took."""
  now = time.perf_counter()
  took = f" (previous stage {now - _LAST_BANNER[0]:.1f} s)"
  _LAST_BANNER[0] = now
  print(f"\n{'=' * 20} {title} {'=' * max(0, 58 - len(title))}{took}", flush=True)


@dataclasses.dataclass
class Inputs:
  tokenizer: Any
  prompts: str
  sft: str | None
  preferences: str | None
  gold: str | None
  notes: dict[str, float]


def prepare_inputs(s: Settings, workdir: pathlib.Path) -> Inputs:
  """The data files and tokenizer: the embedded synthetic task, or the user's files."""
  if s.task.name == "synthetic":
    paths = synthetic.write_task(
      workdir / "data",
      seed=s.seed,
      num_prompts=s.task.num_prompts,
      num_sft=s.task.num_sft,
      num_pairs=s.task.num_pairs,
      label_noise=s.task.label_noise,
    )
    tok = s.model.tokenizer or paths["tokenizer"]
    gold = s.task.gold or "ppo_jax.synthetic:gold_score"
    return Inputs(
      load_tokenizer(tok),
      paths["prompts"],
      paths["sft"],
      paths["preferences"],
      gold,
      {"label_accuracy": paths["label_accuracy"]},
    )
  tok = s.model.tokenizer or (None if s.model.init == "scratch" else s.model.init)
  if tok is None:
    raise ValueError("config.model.tokenizer is required when config.model.init='scratch'")
  return Inputs(
    load_tokenizer(tok), s.data.prompts, s.data.sft, s.data.preferences, s.task.gold, {}
  )


def init_policy(s: Settings, tokenizer: Any, max_len: int) -> CausalLM:
  """The policy before SFT: a Hugging Face folder, or a small model from scratch."""
  m = s.model
  if m.init != "scratch":
    policy = from_pretrained(m.init, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
  else:
    common = dict(
      vocab_size=len(tokenizer),
      hidden_size=m.hidden_size,
      num_layers=m.num_layers,
      num_heads=m.num_heads,
      max_position_embeddings=m.max_position_embeddings,
      dtype=m.dtype,
      param_dtype=m.param_dtype or m.dtype,
      remat=m.remat,
      eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id,
    )
    if m.arch == "gpt2":
      cfg = ModelConfig.gpt2(**common)
    else:
      cfg = ModelConfig.llama(num_kv_heads=m.num_kv_heads or m.num_heads, **common)
    policy = CausalLM(cfg, rngs=nnx.Rngs(s.seed))
  check_compatible(policy.cfg, tokenizer, max_len)
  return policy


def check_compatible(cfg: ModelConfig, tokenizer: Any, max_len: int) -> None:
  if len(tokenizer) > cfg.vocab_size:
    raise ValueError(
      f"tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
      f"{cfg.vocab_size} rows"
    )
  if cfg.is_gpt2 and max_len > cfg.max_position_embeddings:
    raise ValueError(
      f"data.max_prompt_len + max response length = {max_len} exceeds the model's "
      f"{cfg.max_position_embeddings} positions (lower ppo.max_new_tokens or "
      "data.max_prompt_len)"
    )


def _stage_done(folder: pathlib.Path) -> bool:
  return (folder / "config.json").is_file() and any(folder.glob("*.safetensors*"))


def _supervised_logger(workdir, name, total, progress):
  writer = writers.MetricsWriter(workdir / f"{name}_metrics.jsonl", tensorboard_dir=None)
  bar = writers.progress_bar(total, name, enabled=progress)

  def on_step(i, n, row):
    writer.write(i + 1, row)
    bar.update(1)
    if i % 10 == 0 or i + 1 == n:
      bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in ("nll", "loss", "accuracy")})

  return on_step, lambda: (bar.close(), writer.close())


def run_sft(
  s: Settings, policy: CausalLM, inputs: Inputs, layout: data.Layout, workdir: pathlib.Path
) -> tuple[CausalLM, dict]:
  out = workdir / "sft"
  if _stage_done(out):
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
  on_step, close = _supervised_logger(workdir, "sft", s.sft.steps(len(train_set)), s.log.progress)
  params, _ = supervised.train(
    nnx.to_pure_dict(params),
    graphdef,
    supervised.sft_loss,
    lambda i: supervised.sft_batch(train_set, i),
    len(train_set),
    s.sft,
    seed=s.seed,
    on_step=on_step,
  )
  close()
  policy = nnx.merge(graphdef, params)
  held_out = supervised.evaluate(
    params,
    graphdef,
    supervised.sft_loss,
    lambda i: supervised.sft_batch(eval_set, i),
    len(eval_set),
    batch_size=s.sft.batch_size,
  )
  print("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in held_out.items()))
  save_pretrained(policy, out, tokenizer=inputs.tokenizer)
  return policy, held_out


def run_reward_model(
  s: Settings, policy: CausalLM, inputs: Inputs, layout: data.Layout, workdir: pathlib.Path
) -> tuple[RewardModel | None, dict]:
  out = workdir / "reward_model"
  kw = dict(dtype=s.model.dtype, param_dtype=s.model.param_dtype, remat=s.model.remat)
  if s.reward.model:
    print(f"reward model: {s.reward.model}")
    return from_pretrained(s.reward.model, kind="reward", **kw), {}
  if not s.rm_run.enabled:
    return None, {}
  if _stage_done(out):
    print(f"found {out}: loading it instead of training")
    return from_pretrained(out, kind="reward", **kw), {}
  if not inputs.preferences:
    raise ValueError("config.rm.enabled=True needs config.data.preferences=FILE.jsonl")
  chosen, rejected = data.load_preferences(inputs.preferences, inputs.tokenizer, layout)
  train_idx, eval_idx = data.split_holdout(len(chosen), s.rm.eval_fraction, seed=s.seed)
  train_pairs = (chosen.take(train_idx), rejected.take(train_idx))
  eval_pairs = (chosen.take(eval_idx), rejected.take(eval_idx))
  print(
    f"{len(train_idx)} training and {len(eval_idx)} held-out preference pairs from "
    f"{inputs.preferences}"
  )
  rm = RewardModel(policy.cfg, rngs=nnx.Rngs(s.seed + 1))
  if s.rm_run.init == "policy":
    nnx.update(rm.trunk, nnx.state(policy.trunk))
  graphdef, params = nnx.split(rm)
  on_step, close = _supervised_logger(workdir, "rm", s.rm.steps(len(train_idx)), s.log.progress)
  params, _ = supervised.train(
    nnx.to_pure_dict(params),
    graphdef,
    supervised.reward_loss,
    lambda i: supervised.pair_batch(train_pairs, i),
    len(train_idx),
    s.rm,
    seed=s.seed + 1,
    on_step=on_step,
  )
  close()
  rm = nnx.merge(graphdef, params)
  held_out = supervised.evaluate(
    params,
    graphdef,
    supervised.reward_loss,
    lambda i: supervised.pair_batch(eval_pairs, i),
    len(eval_idx),
    batch_size=s.rm.batch_size,
  )
  print("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in held_out.items()))
  save_pretrained(rm, out, tokenizer=inputs.tokenizer)
  return rm, held_out


def run(config, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs the whole pipeline; returns a summary (also written to ``summary.json``)."""
  t_start = time.perf_counter()
  s = Settings.from_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  print(
    f"ppo_jax: workdir {workdir}, jax {jax.__version__} on {jax.devices()[0].platform} "
    f"({jax.device_count()} devices)"
  )

  banner("data")
  inputs = prepare_inputs(s, workdir)
  tok = inputs.tokenizer
  hp = s.ppo(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  layout = data.Layout(
    s.data.max_prompt_len,
    s.data.max_response_len,
    tok.pad_token_id,
    tok.eos_token_id,
    s.data.prompt_overflow,
  )
  texts, ids, mask = data.load_prompts(inputs.prompts, tok, layout)
  n_eval = min(s.data.eval_prompts, len(texts) // 4)
  prompts = rl.Prompts(texts[n_eval:], ids[n_eval:], mask[n_eval:])
  eval_prompts = rl.Prompts(texts[:n_eval], ids[:n_eval], mask[:n_eval])
  print(
    f"{len(prompts)} training and {len(eval_prompts)} evaluation prompts from "
    f"{inputs.prompts}; vocabulary {len(tok)}"
  )
  max_len = layout.prompt_len + max(hp.max_new_tokens, layout.response_len)
  policy = init_policy(s, tok, max_len)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(policy, nnx.Param)))
  print(
    f"policy: {policy.cfg.model_type}, {n_params / 1e6:.2f}M parameters, {policy.cfg.dtype} compute"
  )

  banner("1/3 supervised fine-tuning")
  policy, sft_eval = run_sft(s, policy, inputs, layout, workdir)
  banner("2/3 reward model")
  reward_model, rm_eval = run_reward_model(s, policy, inputs, layout, workdir)

  banner("3/3 PPO")
  scorer = rl.Scorer(
    reward_model=reward_model if s.reward.source == "model" else None,
    fn=load_reward_fn(s.reward.fn) if s.reward.source == "function" else None,
    fn_name=s.reward.fn or "",
  )
  gold = load_reward_fn(inputs.gold) if inputs.gold else None
  critic = rl.build_critic(
    policy,
    reward_model,
    shared_trunk=s.ppo_run.value_head_on_policy,
    init=s.ppo_run.critic_init,
    seed=s.seed + 2,
  )
  tb_dir = workdir / "tensorboard" if s.log.tensorboard else None
  writer = writers.MetricsWriter(workdir / "metrics.jsonl", tensorboard_dir=tb_dir)
  bar = writers.progress_bar(s.ppo_run.iterations, "ppo", enabled=s.log.progress)

  def log(step, row, samples):
    writer.write(step, row)
    bar.update(1)
    bar.set_postfix(
      {
        "score": f"{row['objective/scores']:.3f}",
        "kl": f"{row['objective/kl']:.3f}",
        **({"gold": f"{row['gold/score']:.3f}"} if "gold/score" in row else {}),
      }
    )
    every = s.log.samples_every
    if every and (step % every == 0 or step == s.ppo_run.iterations):
      writers.write_samples(workdir / "samples", step, samples(s.log.num_samples), writer)

  try:
    result = rl.run_ppo(
      policy,
      scorer,
      prompts,
      eval_prompts,
      tok,
      hp=hp,
      optim=s.ppo_optim,
      iterations=s.ppo_run.iterations,
      batch_size=s.ppo_run.batch_size,
      critic=critic,
      seed=s.seed,
      fuse=s.ppo_run.fuse,
      gold=gold,
      log=log,
    )
  finally:
    bar.close()
    writer.close()
  save_pretrained(result.policy, workdir / "policy", tokenizer=tok)
  if s.log.plots:
    writers.plot_metrics(
      workdir / "metrics.jsonl", workdir / "plots" / "ppo.png", title=f"PPO, {workdir.name}"
    )

  before, after = result.before, result.after
  if not before and result.history:  # no held-out prompts: the first and last rollouts
    before, after = rollout_summary(result.history[:3]), rollout_summary(result.history[-3:])
  summary = {
    "before": before,
    "after": after,
    "held_out": bool(result.before),
    "sft_eval": sft_eval,
    "rm_eval": rm_eval,
    **inputs.notes,
    "seconds": time.perf_counter() - t_start,
  }
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  banner("summary")
  _print_summary(summary)
  print(f"outputs in {workdir}: metrics.jsonl, tensorboard/, plots/, samples/, policy/")
  return summary


def rollout_summary(rows: list[dict[str, float]]) -> dict[str, float]:
  """Score, gold score, KL and length averaged over some iterations' rollouts."""
  keys = (
    ("score", "objective/scores"),
    ("gold", "gold/score"),
    ("kl", "objective/kl"),
    ("length", "response/length"),
  )
  return {k: sum(r[m] for r in rows) / len(rows) for k, m in keys if m in rows[0]}


def _print_summary(summary: dict[str, Any]) -> None:
  before, after = summary["before"], summary["after"]
  rows = [
    ("score (reward model or fn)", "score"),
    ("gold score", "gold"),
    ("KL to reference (nats/seq)", "kl"),
    ("response length", "length"),
  ]
  source = "held-out prompts" if summary.get("held_out") else "first/last 3 rollouts"
  print(f"{source:30s} {'before PPO':>12s} {'after PPO':>12s}")
  for label, key in rows:
    if key in before:
      print(f"{label:30s} {before[key]:12.4f} {after[key]:12.4f}")
  if "accuracy" in summary.get("rm_eval", {}):
    print(
      f"reward model held-out accuracy: {summary['rm_eval']['accuracy']:.3f}"
      + (
        f" (labeller agrees with gold on {summary['label_accuracy']:.3f})"
        if "label_accuracy" in summary
        else ""
      )
    )
  print(f"total time: {summary['seconds']:.0f} s")
