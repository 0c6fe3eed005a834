"""The RLHF pipeline, top to bottom: data → SFT → reward model → PPO.

Each stage writes a Hugging Face folder into the workdir (``sft/``, ``reward_model/``,
``policy/``); a stage whose folder already exists is loaded instead of trained again, so a run
that stopped after its reward model resumes at PPO (``stage_checkpoints.check_record`` refuses a
folder trained under another config than the run's).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
from flax import nnx

from ppo_jax import (
  checkpoint,
  data,
  evaluation,
  preemption,
  rl,
  stage_checkpoints,
  supervised_step,
  writers,
)
from ppo_jax import sharding as shd
from ppo_jax.actor_critic import build_critic
from ppo_jax.compat import check_compatible, ordinary_stop_ids, turn_end_note
from ppo_jax.config import Settings, default_values
from ppo_jax.export import export_record, generation_defaults
from ppo_jax.finished import finished_summary, nothing_to_do
from ppo_jax.models import CausalLM, RewardModel
from ppo_jax.resume_rules import with_paths_resolved
from ppo_jax.rewards import load_reward_fn, load_reward_fns
from ppo_jax.rows import holdout_by_prompt
from ppo_jax.run_inputs import (
  Inputs,
  check_same_prompts,
  prepare_inputs,
  prompts_fingerprint,
  rl_prompts,
)
from ppo_jax.stage_folders import put_back_aside, save_whole
from ppo_jax.stages import (
  init_policy,
  read_preferences,
  run_dpo,
  run_reward_model,
  run_sft,
  with_adapters,
)
from ppo_jax.workdir import (
  LOCK,
  check_finished,
  check_not_foreign,
  check_workdir,
  in_use,
  preflight,
  refused_together,
  rl_outputs,
  stages_trained,
)

_LAST_BANNER = [time.perf_counter()]


def banner(title: str, *, stage: str | None = None) -> None:
  """A stage heading, with the time the previous stage took. Before ``stage`` starts, a stop
  requested meanwhile (SIGTERM during the previous stage's evaluation, say) stops the run here,
  with the stages before it saved, rather than after ``stage``'s first step."""
  if stage is not None and preemption.stop_requested():
    raise preemption.Preempted(
      f"stopped by {preemption.GUARD.signal_name} before the {stage} stage (the stages before it "
      "are saved)"
    )
  now = time.perf_counter()
  took = f" (previous stage {now - _LAST_BANNER[0]:.1f} s)"
  _LAST_BANNER[0] = now
  print(f"\n{'=' * 20} {title} {'=' * max(0, 58 - len(title))}{took}", flush=True)


def run_ppo_stage(
  s: Settings,
  config,
  policy: CausalLM,
  reward_model: RewardModel | None,
  inputs: Inputs,
  prompts: evaluation.Prompts,
  eval_prompts: evaluation.Prompts,
  hp,
  workdir: pathlib.Path,
  *,
  resume: bool,
  mesh=None,
) -> rl.PPOResult:
  """PPO with its logs and checkpoints (resumed from ``WORKDIR/checkpoints`` when present)."""
  scorer = evaluation.Scorer(
    reward_model=reward_model if s.reward.source == "model" else None,
    fn=load_reward_fns(s.reward.fn, s.reward.weights) if s.reward.source == "function" else None,
    fn_name=s.reward.fn or "",
  )
  gold = load_reward_fn(inputs.gold) if inputs.gold else None
  critic = None  # GRPO and RLOO have none
  with shd.staged_on_host(mesh):  # built here, placed by rl.run_ppo
    if hp.estimator == "gae":
      critic = build_critic(
        policy,
        reward_model,
        shared_trunk=s.ppo_run.value_head_on_policy,
        init=s.ppo_run.critic_init,
        seed=s.seed + 2,
      )
    policy, base_policy = with_adapters(
      s, policy, workdir, inputs.tokenizer, checkpoints=workdir / "checkpoints"
    )
  with checkpoint.Checkpointer(workdir / "checkpoints", s.checkpoint) as ckpt:
    resume_step = (ckpt.latest_step() or 0) if resume else 0
    writers.truncate_jsonl(workdir / "samples.jsonl", resume_step)
    tb_dir = workdir / "tensorboard" if s.log.tensorboard else None
    writer = writers.MetricsWriter(
      workdir / "metrics.jsonl", tensorboard_dir=tb_dir, resume_step=resume_step
    )
    bar = writers.progress_bar(
      s.ppo_run.iterations, s.algo, initial=resume_step, enabled=s.log.progress
    )

    def log(step, row, samples):
      writer.write(step, row)
      bar.update(1)
      gold_text = {"gold": f"{row['gold/score']:.3f}"} if "gold/score" in row else {}
      bar.set_postfix(
        {"score": f"{row['objective/scores']:.3f}", "kl": f"{row['objective/kl']:.3f}", **gold_text}
      )
      every = s.log.samples_every
      if every and (step % every == 0 or step == s.ppo_run.iterations):
        writers.write_samples(workdir / "samples", step, samples(s.log.num_samples), writer)

    record = {
      "config": with_paths_resolved(json.loads(config.to_json_best_effort())),
      **stage_checkpoints.sft_from(workdir),
      **export_record(
        policy.cfg,
        inputs.tokenizer_path,
        base_policy,
        workdir=workdir,
        generation_config=generation_defaults(s),
      ),
    }
    try:
      return rl.run_ppo(
        policy,
        scorer,
        prompts,
        eval_prompts,
        inputs.tokenizer,
        hp=hp,
        optim=s.ppo_optim,
        critic_lr_scale=s.ppo_run.critic_lr_scale,
        iterations=s.ppo_run.iterations,
        batch_size=s.ppo_run.batch_size,
        critic=critic,
        seed=s.seed,
        fuse=s.ppo_run.fuse,
        gold=gold,
        log=log,
        checkpointer=ckpt,
        record=record,
        config_defaults=default_values(),
        max_nonfinite=s.ppo_run.max_nonfinite,
        mesh=mesh,
      )
    finally:
      bar.close()
      writer.close()


def run(config, workdir: str | pathlib.Path, *, resume: bool = True) -> dict[str, Any]:
  """Runs the whole pipeline; returns a summary (also written to ``summary.json``).

  SIGTERM/SIGINT stop it at the next step boundary (``preemption.Preempted``), after saving a
  checkpoint of the stage it is in. With ``resume`` (the default) a workdir's finished stages and
  latest checkpoints are picked up; ``resume=False`` refuses a workdir that holds checkpoints.
  ``config``: an experiment's ConfigDict (``config.load_experiment``), or the same as a dict.
  """
  if isinstance(config, dict):  # ``config.to_dict()``, or one written by hand
    import ml_collections

    config = ml_collections.ConfigDict(config)
  with preemption.GUARD:
    return _run(config, pathlib.Path(workdir), resume=resume)


def _run(config, workdir: pathlib.Path, *, resume: bool) -> dict[str, Any]:
  t_start = time.perf_counter()
  s = Settings.from_config(config)
  mesh = preflight(s)
  refused_together(check_not_foreign, workdir, writes_data=s.task.name == "synthetic")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a file in the way, a read-only disk, no permission
    why = "a file is in the way" if workdir.is_file() else e.strerror
    raise OSError(f"--workdir {workdir}: cannot create it as a folder ({why})") from e
  with in_use(workdir):
    return _run_in(config, s, mesh, workdir, resume=resume, t_start=t_start)


def _run_in(config, s: Settings, mesh, workdir: pathlib.Path, *, resume: bool, t_start: float):
  put_back_aside(workdir)  # a stage folder a kill left renamed aside (stage_folders.saved_whole)
  defaults = default_values()
  now = json.loads(config.to_json_best_effort())
  refused_together(check_workdir, workdir, s=s, config=now, resume=resume, defaults=defaults)
  if resume and (done := finished_summary(s, workdir, now)) is not None:
    print(nothing_to_do(s, workdir, done, now))
    writers.print_summary(done, this_invocation=False)
    return done
  print(
    f"ppo_jax: workdir {workdir}, jax {jax.__version__} on {jax.devices()[0].platform}, "
    f"mesh {shd.describe(mesh)}, {jax.process_count()} process(es)"
  )
  mesh = mesh if mesh.size > 1 else None  # one device: plain jit, nothing to place

  banner("data")
  inputs = prepare_inputs(s, workdir)
  tok = inputs.tokenizer
  # The RL stage's settings (none where config.stop_after ends the run before it)
  hp = None if s.stop_after else s.ppo(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  layout = data.Layout.of(
    tok,
    s.data.max_prompt_len,
    s.data.max_response_len,
    s.data.prompt_overflow,
    s.data.chat_template,
    s.data.system_prompt,
    s.data.chat_template_kwargs,
  )
  if s.stop_after:  # no policy trained on prompts: none read
    prompts = eval_prompts = None
    print(f"config.stop_after={s.stop_after!r}: no prompts read; vocabulary {len(tok)}")
  else:
    prompts, eval_prompts = rl_prompts(s, inputs, layout)
  if (
    prompts is not None
    and resume
    and s.algo != "dpo"
    and checkpoint.holds_checkpoints(workdir / "checkpoints")
  ):
    with checkpoint.Checkpointer(workdir / "checkpoints", s.checkpoint) as ckpt:
      if ckpt.latest_step() is not None:  # now, not once the models are built and placed
        prints = prompts_fingerprint(prompts, eval_prompts)
        check_same_prompts(prints, len(eval_prompts), ckpt.directory, ckpt.record())
  max_len = layout.prompt_len + max(hp.max_new_tokens if hp else 0, layout.response_len)
  with shd.staged_on_host(mesh):  # each stage places the models it trains
    policy = init_policy(s, tok, max_len)
  if hp is not None:
    hp = dataclasses.replace(hp, extra_eos_token_ids=policy.cfg.extra_eos_token_ids)
    if note := ordinary_stop_ids(tok, hp.stop_ids):
      print(note)
  if s.data.chat_template and (note := turn_end_note(tok)):
    print(note)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(policy, nnx.Param)))
  print(
    f"policy: {policy.cfg.model_type}, {n_params / 1e6:.2f}M parameters, {policy.cfg.dtype} compute"
  )

  check_finished(s, inputs, workdir)
  will = stages_trained(s, workdir)  # their files' rows now, not after the stages before them
  if inputs.sft and will["sft"]:
    inputs.loaded["sft"] = data.load_sft(inputs.sft, tok, layout)
  if inputs.preferences and (will["rm"] or will["dpo"]):
    inputs.loaded["preferences"] = read_preferences(inputs, layout)
  sections = (("sft", "sft"), ("rm", "preferences"), ("dpo", "preferences"))
  for stage, key in sections:  # and their batches over the mesh, before SFT trains
    if will[stage] and mesh is not None and key in inputs.loaded:
      section, rows = getattr(s, stage), inputs.loaded[key]
      seqs = rows[0] if key == "preferences" else rows  # the chosen side's prompts, or SFT's
      n = len(holdout_by_prompt(seqs, section.eval_fraction, seed=s.seed)[0])
      supervised_step.check_mesh_rows(section, n, mesh, stage)
  # A run that stops before the RL stage, in a workdir holding that stage's outputs (another
  # run's): their config.json and summary stay theirs.
  keep = bool(s.stop_after and rl_outputs(workdir))
  if shd.is_main_process() and not keep:  # after the refusals that need no training
    (workdir / "summary.json").unlink(missing_ok=True)  # an earlier run's: this one writes its own
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  banner("1/3 supervised fine-tuning", stage="sft")
  policy, sft_eval = run_sft(s, policy, inputs, layout, workdir, mesh=mesh)
  stopped = {"before": {}, "after": {}, "sft_eval": sft_eval, "rm_eval": {}, **inputs.notes}
  stopped["stop_after"] = s.stop_after
  if s.stop_after == "sft":
    return _close(s, workdir, stopped, now, t_start, write=not keep)
  banner("2/3 reward model", stage="reward model")
  if s.algo == "dpo":  # whatever rm.* says: DPO learns from the pairs themselves
    print("DPO trains on the preference pairs directly: no reward model")
    stage_checkpoints.note_skipped(workdir, "rm")
    reward_model, rm_eval = None, {}
  else:
    reward_model, rm_eval = run_reward_model(s, policy, inputs, layout, workdir, mesh=mesh)
    if reward_model is not None:
      check_compatible(reward_model.cfg, tok, max_len, what="reward model")
  if s.stop_after == "rm":
    return _close(s, workdir, {**stopped, "rm_eval": rm_eval}, now, t_start, write=not keep)

  banner(f"3/3 {s.algo.upper()}", stage=s.algo)
  stage_eval = {}
  if s.algo == "dpo":
    result, stage_eval = run_dpo(s, policy, inputs, layout, eval_prompts, hp, workdir, mesh)
  else:
    result = run_ppo_stage(
      s,
      config,
      policy,
      reward_model,
      inputs,
      prompts,
      eval_prompts,
      hp,
      workdir,
      resume=resume,
      mesh=mesh,
    )
  save_whole(result.policy, workdir / "policy", tok, generation_config=generation_defaults(s))

  before, after = result.before, result.after
  metrics_path = workdir / "metrics.jsonl"  # RL stages only
  rows = writers.read_metrics(metrics_path) if metrics_path.exists() else []
  k = max(1, min(3, len(rows) // 2))  # rollouts on each side, none on both
  if not before and rows:  # no held-out prompts: the first and last rollouts (one: no after)
    before = writers.rollout_summary(rows[:k])
    after = writers.rollout_summary(rows[-k:]) if len(rows) > 1 else {}
  summary = {
    "before": before,
    "after": after,
    "held_out": bool(result.before),
    **({"rollouts_compared": k} if rows and not result.before else {}),
    "sft_eval": sft_eval,
    "rm_eval": rm_eval,
    **({"dpo_eval": stage_eval} if stage_eval else {}),
    **inputs.notes,
  }
  return _close(s, workdir, summary, now, t_start)


def _close(
  s: Settings, workdir: pathlib.Path, summary: dict, config: dict, t_start: float, write=True
) -> dict:
  """Plots the stages run, writes ``summary.json`` (``summary`` with the algorithm, the time taken
  and ``config``, the run's config as JSON; not with ``write=False``: the workdir's is another
  run's), prints the closing table and the outputs; returns the whole summary."""
  if s.log.plots:
    writers.plot_stages(workdir, s.algo, stop_after=s.stop_after)
  summary = {
    **summary,
    "algo": s.algo,
    "seconds": time.perf_counter() - t_start,
    "config": config,  # what finished_summary compares a later run's config with
  }
  if shd.is_main_process() and write:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  banner("summary")
  writers.print_summary(summary)
  outputs = sorted(p.name + "/" * p.is_dir() for p in workdir.iterdir() if p.name != LOCK)
  print(f"outputs in {workdir}: {', '.join(outputs)}")
  return summary
