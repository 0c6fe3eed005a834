"""What a run checks before writing anything: its inputs (``preflight``: devices, functions,
files, model folders), then its workdir: checkpoints it was told not to resume, another
algorithm's outputs it would overwrite, data it would remake under stages trained on it, and
checkpoints of another config (PPO's, and those of each stage it would train). Each refusal is
one line and leaves the workdir as it was (``check_finished`` runs once the data are ready; each
stage compares its training data when it comes)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax

from ppo_jax import checkpoint, data, resume_rules, stage_checkpoints, supervised_step
from ppo_jax import sharding as shd
from ppo_jax.compat import (
  check_positions,
  check_reward_model,
  has_model_folder,
  model_folder,
)
from ppo_jax.models.config import ModelConfig, projections
from ppo_jax.models.hf import checkpoint_kind, load_hf_config
from ppo_jax.models.lora import check_targets
from ppo_jax.rewards import load_reward_fn, load_reward_fns
from ppo_jax.tokenizer import load_tokenizer, tokenizer_folder

if TYPE_CHECKING:
  from ppo_jax.config import Settings
  from ppo_jax.run_inputs import Inputs

CHECKPOINT_DIRS = ("checkpoints", "sft_checkpoints", "rm_checkpoints", "dpo_checkpoints")
# What synthetic.write_task makes WORKDIR/data's files from: one random stream draws the prompts,
# then the SFT rows, then the preference pairs.
SFT_DATA = ("seed", "task.num_prompts", "task.num_sft")
PAIR_DATA = (*SFT_DATA, "task.num_pairs", "task.label_noise")


def preflight(s: Settings):
  """What can fail before any work, checked now: the mesh (returned) and the PPO batch over it,
  the reward and gold functions (imported), the data files, and the folders a run would load only
  after SFT."""
  mesh = shd.make_mesh(s.mesh.shape)  # a shape that does not fit the devices fails here
  rl = not s.stop_after  # the RL stage runs: its batches, functions and lengths are checked too
  if s.model.attention == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(
      f"config.model.attention='cudnn' needs an NVIDIA GPU, and this run's devices are "
      f"{jax.default_backend()}: use 'xla'"
    )
  if mesh.size > 1 and rl:
    if s.algo != "dpo" or s.data.eval_prompts:  # DPO samples evaluations in these batches
      shd.check_batch(s.ppo_run.batch_size, mesh, "config.ppo.batch_size")
    if s.algo == "dpo":
      supervised_step.check_mesh_rows(s.dpo, s.dpo.batch_size, mesh, "dpo")
  if rl and s.reward.fn and s.reward.source == "function":
    load_reward_fns(s.reward.fn, s.reward.weights)
  if rl and s.task.gold:
    load_reward_fn(s.task.gold, what="config.task.gold")
  if s.task.name == "files":  # the synthetic task writes its own
    for field in ("prompts", "sft", "preferences"):
      path = getattr(s.data, field)
      if path and not pathlib.Path(path).is_file():
        folder = pathlib.Path(path).is_dir()
        why = "is a folder; expected a JSONL file" if folder else "no such file"
        raise data.DataError(f"config.data.{field}: {path}: {why}")
  if s.model.tokenizer:
    tokenizer_folder(s.model.tokenizer, "config.model.tokenizer:")
  # The longest sequence against a GPT-2's learned positions, before the task's data are written.
  sampled = s.raw.ppo.max_new_tokens if rl else 0
  max_len = s.data.max_prompt_len + max(sampled, s.data.max_response_len)
  if s.model.init != "scratch":
    model_folder(s.model.init, "config.model.init", "policy")
    try:
      hf = load_hf_config(s.model.init)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"config.model.init: {e}") from None
    except ValueError as e:
      raise ValueError(f"config.model.init: {e}") from None
    if checkpoint_kind(hf) == "reward":
      raise ValueError(
        f"config.model.init {s.model.init}: holds a sequence-classification model (a reward "
        "model: no LM head); the policy starts from a causal LM"
      )
    try:  # an architecture ppo_jax runs, at these numerics
      ModelConfig.from_hf(hf, **{**s.model.numerics(), "param_dtype": s.model.param_dtype_or()})
    except ValueError as e:
      raise ValueError(f"config.model.init {s.model.init}: {e}") from None
    model_type = hf.model_type
    if hf.model_type == "gpt2":
      check_positions(max_len, hf.n_positions)
  else:
    try:
      s.model.scratch_config(vocab_size=1)  # its shapes fit together
    except ValueError as e:
      raise ValueError(f"config.model: {e}") from None
    model_type = s.model.arch
    if s.model.arch == "gpt2":
      check_positions(max_len, s.model.max_position_embeddings)
  if rl and s.ppo_run.lora_rank:
    try:
      check_targets(model_type, projections(gpt2=model_type == "gpt2"), s.ppo_run.lora_targets)
    except ValueError as e:
      raise ValueError(f"config.ppo.{e}") from None
  if rl and s.reward.model and s.algo != "dpo":  # its tokenizer's ids and positions, when known now
    # model.init's tokenizer where it is the run's (the synthetic task writes one of its own)
    from_init = s.task.name == "files" and s.model.init != "scratch"
    tok_folder = s.model.tokenizer or (s.model.init if from_init else None)
    tok = load_tokenizer(tok_folder) if tok_folder is not None else None
    rm_hf = check_reward_model(s.reward.model, tokenizer=tok, tokenizer_folder=tok_folder)
    if rm_hf.model_type == "gpt2":
      check_positions(max_len, rm_hf.n_positions, "reward model")
  return mesh


def previous_config(workdir: pathlib.Path) -> dict[str, Any] | None:
  """The config.json an earlier run wrote in ``workdir`` (None: none, or not readable JSON)."""
  try:
    return json.loads((workdir / "config.json").read_text())
  except (OSError, ValueError):
    return None


LOCK = ".ppo_jax.lock"  # in the workdir: held while a run uses it


def check_not_foreign(workdir: pathlib.Path, *, writes_data: bool) -> None:
  """Refuses (one line) a workdir that no ppo_jax run used (no lock file, no run's config.json)
  holding what a run would write over: a config.json (a model folder's, say), or a data/ folder
  where the synthetic task writes its files (``writes_data``). Whatever else is there (a log,
  SLURM's output, dotfiles, copied stage folders) a run leaves be."""
  try:
    names = {p.name for p in workdir.iterdir()}
  except OSError:  # not there yet (made by the run), or a file in the way (said when made)
    return
  then = previous_config(workdir)
  if LOCK in names or (isinstance(then, dict) and "ppo" in then and "model_type" not in then):
    return
  if "config.json" in names:
    raise ValueError(
      f"--workdir {workdir} holds a config.json that is not a ppo_jax run's (a model folder?), "
      "which a run would write its own over: use a new folder"
    )
  if writes_data and (workdir / "data").is_dir() and any((workdir / "data").iterdir()):
    raise ValueError(
      f"--workdir {workdir} holds a data/ folder no ppo_jax run wrote, and the synthetic task "
      "would write its files over it: move it away, or use a new folder"
    )


@contextlib.contextmanager
def in_use(workdir: pathlib.Path) -> Iterator[None]:
  """Holds ``workdir`` for this run (an exclusive ``flock`` on ``WORKDIR/.ppo_jax.lock``,
  released when the run ends or its process dies; NFS clients take it on the server, so it holds
  across machines); a second run on it, a scheduler's requeue while the first still runs, is
  refused in one line before it reads or deletes anything (orbax would clean up the other run's
  checkpoint in flight). Taken by the first process only; where the file system refuses locks,
  a note says the run goes unguarded."""
  fd, busy = None, False
  if shd.is_main_process():
    try:  # a read-only workdir, say, goes on: a finished run there still prints its summary
      fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if fd is not None:
        os.close(fd)
      fd, busy = None, e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
      if not busy:
        print(f"note: {workdir} cannot be locked ({e.strerror}): nothing stops a second run on it")
  if not shd.all_agree(not busy):  # every process refuses, none waits for the others
    raise ValueError(
      f"{workdir} is in use by another run (its {LOCK} is held); wait for that run to end or "
      "stop it, or use another workdir"
    )
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)  # releases the lock


def refused_together(check, workdir: pathlib.Path, **kw) -> None:
  """``check(workdir, **kw)``, its refusal (ValueError) raised by every process or none: one
  process alone would leave the others waiting in a collective."""
  try:
    check(workdir, **kw)
    refused = None
  except ValueError as e:
    refused = e
  if not shd.all_agree(refused is None):
    raise refused or ValueError(f"another process refuses the workdir {workdir} (see its error)")


def check_workdir(
  workdir: pathlib.Path, *, s: Settings, config: dict, resume: bool, defaults: dict
) -> None:
  """Raises ValueError (one line) for a workdir this run must not write into; ``config`` is the
  run's config as JSON, ``defaults`` every field's default (for fields added since a save)."""
  for name in CHECKPOINT_DIRS:
    if not resume and checkpoint.holds_checkpoints(workdir / name):
      raise ValueError(
        f"{workdir / name} holds checkpoints and resuming is off; use a new workdir (or "
        "resume, the default)"
      )
  then = previous_config(workdir)
  if then is not None:
    if not s.stop_after:  # one that stops before the RL stage leaves its outputs (pipeline)
      _check_algo(then.get("algo", "ppo"), s.algo, workdir)
    if s.task.name == "synthetic" and then.get("task", {}).get("name") == "synthetic":
      _check_task_data(s, then, config, workdir)
  # The checkpoints of each stage this run would train, on the fields that stage reads (their
  # training data is compared by the stage, once it has read it).
  trained = stages_trained(s, workdir)
  for stage, will in trained.items():
    prefix = "" if stage == "ppo" else f"{stage}_"
    folder = workdir / f"{prefix}checkpoints"
    if resume and will and checkpoint.holds_checkpoints(folder):
      with checkpoint.Checkpointer(folder, s.checkpoint) as ckpt:
        if ckpt.latest_step() is None:
          continue
        start_over = _start_over(workdir, folder, config)
        if prefix:
          only = stage_checkpoints.stage_fields(prefix[:-1], config)
          saved = ckpt.check_config(config, None, defaults, only=only, start_over=start_over)
          if stage == "dpo" and "rows" in saved:  # fewer dpo.epochs than done: before SFT too
            steps = s.dpo.steps(saved["rows"])
            ckpt.check_step(ckpt.latest_step(), steps, s.dpo.steps_said(saved["rows"], "dpo"))
        else:
          saved = ckpt.check_config(config, s.ppo_run.iterations, defaults, start_over=start_over)
      if stage != "sft":  # and the SFT policy they started from, before SFT trains again
        _check_sft_start(saved, folder, workdir, sft_trains=trained["sft"])


def _start_over(workdir: pathlib.Path, folder: pathlib.Path, config: dict):
  """A refusal's hint: delete ``folder`` and the finished stages (``sft/``, ``reward_model/``)
  whose fields are among the differing ones, which the new config would refuse next."""

  def hint(fields: list[str]) -> str:
    stale = [folder]
    for stage, out in (("sft", "sft"), ("rm", "reward_model")):
      reads = stage_checkpoints.stage_fields(stage, config)
      if has_model_folder(workdir / out) and any(f.startswith(reads) for f in fields):
        stale.append(workdir / out)
    return f", or delete {' and '.join(map(str, stale))} to train again under this one"

  return hint


def _check_sft_start(saved: dict, folder: pathlib.Path, workdir: pathlib.Path, *, sft_trains):
  """Refuses the checkpoints in ``folder`` (latest record ``saved``) of a run that started from
  another SFT policy than ``sft/`` holds, or from one this run would train again (deleted)."""
  if sft_trains and saved.get("sft_id") is not None:
    raise ValueError(
      f"{folder} holds checkpoints of a run that started from the SFT policy in "
      f"{workdir / 'sft'}, which is gone and this run would train again; restore that folder, "
      f"or delete {folder} to start this stage over"
    )
  resume_rules.check_same_start(saved, stage_checkpoints.sft_from(workdir), folder)


def stages_trained(s: Settings, workdir: pathlib.Path) -> dict[str, bool]:
  """Which stages (ppo, sft, rm, dpo) this run would train in ``workdir``: not one it skips, nor
  SFT or the reward model when their finished folder is there to be reused."""
  rl = not s.stop_after  # config.stop_after ends the run before the RL stage
  return {
    "ppo": rl and s.algo != "dpo",
    "sft": s.sft.epochs > 0
    and (s.task.name != "files" or bool(s.data.sft))
    and not has_model_folder(workdir / "sft"),
    "rm": s.own_reward_model
    and s.stop_after != "sft"
    and not has_model_folder(workdir / "reward_model"),
    "dpo": rl and s.algo == "dpo",
  }


def _outputs(workdir: pathlib.Path, names) -> list[str]:
  """Which of ``names`` (model folders, checkpoint folders, files) hold something."""
  found = []
  for name in names:
    path = workdir / name
    if name.endswith("checkpoints"):
      held = checkpoint.holds_checkpoints(path)
    elif name.endswith(".jsonl"):
      held = path.is_file() and path.stat().st_size > 0
    else:
      held = has_model_folder(path)
    if held:
      found.append(f"{name}/" if not name.endswith(".jsonl") else name)
  return found


def rl_outputs(workdir: pathlib.Path) -> list[str]:
  """What the RL stage (PPO, GRPO, RLOO, DPO) of a run left in ``workdir``."""
  return _outputs(workdir, ("checkpoints", "dpo_checkpoints", "policy", "metrics.jsonl"))


def _check_algo(then: str, now: str, workdir: pathlib.Path) -> None:
  """A run of another algorithm would overwrite the last stage's outputs (``policy/``,
  ``metrics.jsonl``, the summary) of the one the workdir holds."""
  if then == now:
    return
  if held := rl_outputs(workdir):
    raise ValueError(
      f"{workdir} holds a {then} run ({', '.join(held)}); config.algo={now} would overwrite it: "
      "use a new workdir (copy sft/ and reward_model/ into it to reuse them)"
    )


def _check_task_data(s: Settings, then: dict, now: dict, workdir: pathlib.Path) -> None:
  """The embedded task's data/ made from other settings beneath a stage this run would reuse or
  resume: remaking it would change the files that stage's record names (and the stage refuses
  the run anyway, after the data are rewritten)."""

  then, now = resume_rules.flatten(then), resume_rules.flatten(now)
  learned = [("sft", SFT_DATA), ("sft_checkpoints", SFT_DATA)]
  if s.own_reward_model:
    learned += [("reward_model", PAIR_DATA), ("rm_checkpoints", PAIR_DATA)]
  learned += [("dpo_checkpoints", PAIR_DATA)] if s.algo == "dpo" else []
  for name, fields in learned:
    diffs = [
      f"{f}: {then[f]!r} → {now.get(f)!r}" for f in fields if f in then and then[f] != now.get(f)
    ]
    if diffs and _outputs(workdir, (name,)) and (workdir / "data").is_dir():
      raise ValueError(
        f"{workdir / 'data'} was made under other settings ({'; '.join(diffs)}) and {name}/ "
        "learned from it; this run would remake it: use a new workdir or the original values"
      )


def check_finished(s: Settings, inputs: Inputs, workdir: pathlib.Path) -> None:
  """Before any training: refuses a finished ``sft/`` or ``reward_model/`` this run would train
  otherwise, so the reward model's is not found out only after SFT has trained again (each
  stage checks its own again when it comes)."""
  sft, rm = workdir / "sft", workdir / "reward_model"
  uses_rm = s.own_reward_model and s.stop_after != "sft" and has_model_folder(rm)
  if has_model_folder(sft):
    after = (
      f" (and {rm}: it started from that SFT policy)"
      if uses_rm and s.rm_run.init == "policy"
      else ""
    )
    stage_checkpoints.check_record(sft, s, "sft", inputs.sft, note=False, delete_also=after)
  if uses_rm:
    stage_checkpoints.check_record(rm, s, "rm", inputs.preferences, note=False)
