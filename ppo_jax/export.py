"""Export: the policy of a PPO or DPO checkpoint as a Hugging Face folder (``ppo-jax export``)."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp

from ppo_jax import preemption
from ppo_jax.checkpoint import holds_checkpoints, read, state_metadata
from ppo_jax.models import ModelConfig
from ppo_jax.resume_rules import check_same_base

# The checkpoint folder of each stage whose checkpoints hold a policy.
STAGE_CHECKPOINTS = {"ppo": "checkpoints", "dpo": "dpo_checkpoints"}


def generation_defaults(s) -> dict | None:
  """The ``generation_config.json`` of the checkpoint run ``s`` starts from (sampling defaults,
  stop ids), written again with its final policy and exports; None from scratch."""
  from ppo_jax.models.hf_config import read_generation_config

  return None if s.model.init == "scratch" else read_generation_config(s.model.init)


def export_record(
  model_config, tokenizer_path, base_policy=None, *, workdir=None, generation_config=None
) -> dict:
  """What a checkpoint's record must hold for ``export_policy``: the policy's ``ModelConfig``,
  its tokenizer folder and, for LoRA adapters, the folder of the base weights under them and
  their ``weights_digest`` (a resume or an export over other base weights is refused). With
  ``workdir``, paths inside it are found again in a moved or copied workdir. The
  ``generation_config`` of the checkpoint the run started from is written with the export."""
  absolute = lambda path: str(pathlib.Path(path).absolute()) if path else None
  return {
    "generation_config": generation_config,
    "model_config": model_config.to_dict(),
    "tokenizer": absolute(tokenizer_path),
    "base_policy": absolute(base_policy),
    "base_digest": weights_digest(base_policy) if base_policy else None,
    "workdir": absolute(workdir),
  }


def weights_digest(folder: str | pathlib.Path) -> str:
  """SHA-256 of a model folder's safetensors files, names and bytes in name order."""
  digest = hashlib.sha256()
  for path in sorted(pathlib.Path(folder).glob("*.safetensors")):
    digest.update(path.name.encode())
    with path.open("rb") as f:
      while chunk := f.read(1 << 24):
        digest.update(chunk)
  return digest.hexdigest()


def _in_this_workdir(path: str | None, record: dict, workdir: pathlib.Path) -> str | None:
  """``path`` as recorded or, when it lay inside the run's workdir and ``workdir`` (the one being
  exported: moved or copied since, maybe) has it at the same place, that copy."""
  saved = record.get("workdir")
  if not path or not saved:
    return path
  try:
    here = workdir.absolute() / pathlib.Path(path).relative_to(saved)
  except ValueError:
    return path
  return str(here) if here.exists() else path


def export_policy(
  workdir: str | pathlib.Path,
  out: str | pathlib.Path,
  *,
  step: int | None = None,
  stage: str | None = None,
) -> int:
  """Writes the policy of a checkpoint (default: the latest) as a Hugging Face folder.

  ``stage`` is ``"ppo"`` (``WORKDIR/checkpoints``) or ``"dpo"`` (``WORKDIR/dpo_checkpoints``);
  by default, whichever the workdir holds.
  """
  from flax import nnx

  from ppo_jax.models import CausalLM, from_pretrained, save_pretrained
  from ppo_jax.models.lora import add_lora, merge_lora, split_lora
  from ppo_jax.tokenizer import load_tokenizer

  _check_export_target(pathlib.Path(workdir), pathlib.Path(out))
  stage, directory = _checkpoint_folder(pathlib.Path(workdir), stage)
  mgr = ocp.CheckpointManager(
    directory.absolute(),
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
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
    meta = ocp.args.Composite(meta=ocp.args.JsonRestore())
    record = read(lambda: mgr.restore(step, args=meta).meta, directory / str(step), then)
    if "model_config" not in record:  # checked before any array is read
      raise ValueError(
        f"{directory / str(step)}: its record names no model config (written by an older "
        "ppo_jax); export the policy/ folder a finished run writes instead"
      )
    where = ("params", "policy") if stage == "ppo" else ("params",)
    params = read(lambda: _restore_here(mgr, step, where), directory / str(step), then)
  finally:
    mgr.close()
  cfg = ModelConfig.from_dict(record["model_config"])
  policy_params = _int_keys(params)
  if bad := _non_finite(policy_params):  # training skips such updates: the files are damaged
    raise ValueError(f"{directory / str(step)}: damaged checkpoint, {bad}; {then}")
  if cfg.lora_rank:  # adapters: merged onto the base weights they were trained over
    base_folder = _in_this_workdir(record["base_policy"], record, pathlib.Path(workdir))
    if not any(pathlib.Path(base_folder).glob("*.safetensors")):
      raise FileNotFoundError(
        f"{base_folder}: no base weights, which the LoRA adapters of step {step} need under them"
      )
    check_same_base(
      record,
      {**record, "base_policy": base_folder, "base_digest": weights_digest(base_folder)},
      directory / str(step),
    )
    base = from_pretrained(base_folder, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
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
  tokenizer_folder = _in_this_workdir(record.get("tokenizer"), record, pathlib.Path(workdir))
  tokenizer = load_tokenizer(tokenizer_folder) if tokenizer_folder else None
  # Written into a hidden folder inside ``out``, then moved up: a failed export leaves the
  # earlier export there as it was, and an earlier export's files are replaced whole (no stale
  # shards of another layout), the user's kept. ``out`` itself stays (the current folder, or a
  # link, may be it).
  out = pathlib.Path(out).resolve()
  created = not out.exists()
  staging, previous, moved = out / STAGING, out / PREVIOUS, []
  shutil.rmtree(staging, ignore_errors=True)
  _restore_previous(out, previous)  # an export killed while it swapped the files
  try:
    save_pretrained(
      policy, staging, tokenizer=tokenizer, generation_config=record.get("generation_config")
    )
    files = sorted([p.name for p in staging.iterdir()] + [EXPORT_RECORD])
    (staging / EXPORT_RECORD).write_text(
      json.dumps(
        {
          "workdir": str(pathlib.Path(workdir).absolute()),
          "stage": stage,
          "step": step,
          "files": files,
        },
        indent=2,
      )
      + "\n"
    )
    preemption.raise_pending()  # a Ctrl-C that Python discarded: before the files are swapped
    earlier = _earlier_export(out, files)
    if earlier:  # set aside, not deleted, until the new export is whole
      previous.mkdir()
    for old in earlier:
      old.rename(previous / old.name)
    kept = sorted(p.name for p in out.iterdir() if p not in (staging, previous))
    for new in sorted(staging.iterdir(), key=lambda p: p.name == EXPORT_RECORD):  # record last
      new.rename(out / new.name)
      moved.append(out / new.name)
  except BaseException:
    if created:
      shutil.rmtree(out, ignore_errors=True)
    else:  # the earlier export back as it was
      for path in moved:
        _remove(path)
      for old in previous.iterdir() if previous.is_dir() else ():
        old.rename(out / old.name)
      shutil.rmtree(previous, ignore_errors=True)
      shutil.rmtree(staging, ignore_errors=True)
    raise
  if previous.is_dir():  # renamed first: a kill while it is deleted leaves nothing to put back
    previous.rename(out / DISCARDED)
    shutil.rmtree(out / DISCARDED, ignore_errors=True)
  staging.rmdir()
  if kept:
    print(f"note: kept the files in {out} that the earlier export did not write: {_listed(kept)}")
  return step


def _non_finite(params) -> str | None:
  """``N non-finite values in NAME (and M more arrays)`` of a parameter tree; None if all are
  finite."""
  import numpy as np

  bad = []
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    if n := int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x, np.float32)))):
      bad.append((n, ".".join(str(getattr(k, "key", k)) for k in path)))
  if not bad:
    return None
  more = f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""
  return f"{bad[0][0]} non-finite values in {bad[0][1]}{more}"


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  else:
    path.unlink(missing_ok=True)


def _restore_previous(out: pathlib.Path, previous: pathlib.Path) -> None:
  """After an export killed (``kill -9``) while it swapped its files: the earlier export's files
  set aside in ``previous`` go back in place of whatever half of the new one had moved in."""
  shutil.rmtree(out / DISCARDED, ignore_errors=True)  # a whole export's, partly deleted
  if not previous.is_dir():
    return
  for old in previous.iterdir():
    _remove(out / old.name)
    old.rename(out / old.name)
  previous.rmdir()


def _earlier_export(out: pathlib.Path, files: list[str]) -> list[pathlib.Path]:
  """What an earlier export in ``out`` wrote, which this one replaces: the files its record lists
  (a record from before the lists: the names this export writes, and weight shards of any
  layout). Anything else there (a model card, notes) is the user's and stays."""
  try:
    listed = json.loads((out / EXPORT_RECORD).read_text()).get("files")
  except (OSError, ValueError, AttributeError):
    listed = None
  if isinstance(listed, list):
    ours = lambda n: n in listed or n in files
  else:  # a record from before the lists
    ours = lambda n: (
      n in files
      or (n.startswith("model") and n.endswith((".safetensors", ".safetensors.index.json")))
    )
  return [p for p in out.iterdir() if p.name not in (STAGING, PREVIOUS, DISCARDED) and ours(p.name)]


def _listed(names: list[str]) -> str:
  return f"{', '.join(names[:3])}{', …' if len(names) > 3 else ''}"


EXPORT_RECORD = "ppo_jax_checkpoint.json"  # what an export writes beside the weights
STAGING = ".ppo_jax_exporting"  # inside --out while an export is written
PREVIOUS = ".ppo_jax_previous_export"  # the earlier export's files, while they are replaced
DISCARDED = ".ppo_jax_discarded_export"  # those files, being deleted once the new export is whole


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


def _restore_here(mgr: ocp.CheckpointManager, step: int, where: tuple[str, ...]):
  """The policy's parameters in checkpoint ``step``: the state's subtree at ``where``
  alone (not the critic or the optimizer's moments, which would take several times the memory),
  every array on this process's first device whatever mesh saved it (without a target orbax asks
  for the saving run's device topology)."""
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  saved = state_metadata(mgr, step)
  for key in where:
    saved = saved[key]
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), saved)
  for key in reversed(where):
    target = {key: target}
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=one), target)
  state = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
  params = mgr.restore(step, args=ocp.args.Composite(state=state)).state
  for key in where:
    params = params[key]
  return params


def _checkpoint_folder(workdir: pathlib.Path, stage: str | None) -> tuple[str, pathlib.Path]:
  """``(stage, folder)`` of the checkpoints to export: ``stage``'s, else the only stage's."""
  if stage is not None:
    if stage not in STAGE_CHECKPOINTS:
      raise ValueError(f"--stage {stage!r}: expected one of {sorted(STAGE_CHECKPOINTS)}")
    directory = workdir / STAGE_CHECKPOINTS[stage]
    if not directory.is_dir():
      raise FileNotFoundError(f"{directory}: no {stage.upper()} checkpoints")
    return stage, directory
  found = {k: workdir / v for k, v in STAGE_CHECKPOINTS.items() if holds_checkpoints(workdir / v)}
  if not workdir.is_dir():
    raise FileNotFoundError(f"--workdir {workdir}: no such folder")
  if not found:
    # a finished run's policy, or the SFT policy of one that stopped there (config.stop_after)
    kept = [
      (n, w) for n, w in (("policy", "policy"), ("sft", "SFT policy")) if (workdir / n).is_dir()
    ]
    raise FileNotFoundError(
      f"{workdir}: no checkpoints/ or dpo_checkpoints/ to export"
      + (
        f" (its finished {kept[0][1]} is {workdir / kept[0][0]}, already a Hugging Face folder)"
        if kept
        else " (not a ppo_jax workdir, or a run stopped before its first checkpoint)"
      )
    )
  if len(found) > 1:
    raise ValueError(
      f"{workdir} holds both PPO (checkpoints/) and DPO (dpo_checkpoints/) checkpoints: choose "
      "one with --stage ppo or --stage dpo"
    )
  return next(iter(found.items()))


def _check_export_target(workdir: pathlib.Path, out: pathlib.Path) -> None:
  w, o = workdir.resolve(), out.resolve()
  if o == w:
    raise ValueError(f"--out {out} is the workdir: the export would overwrite the run's files")
  if w.is_relative_to(o):
    raise ValueError(f"--out {out} holds the workdir: choose a folder outside the run")
  for name in RUN_FOLDERS:
    if o.is_relative_to((w / name).resolve()):
      raise ValueError(f"--out {out} is inside the run's {name}/ folder: choose another folder")
  if o.exists() and not o.is_dir():
    raise ValueError(f"--out {out} is a file: choose a new or empty folder")
  # A killed export's STAGING and PREVIOUS (the earlier export, put back before writing).
  if o.is_dir() and not ((o / EXPORT_RECORD).is_file() or (o / PREVIOUS).is_dir()):
    held = sorted(p.name for p in o.iterdir() if p.name != STAGING)
    if held:
      raise ValueError(
        f"--out {out} holds other files ({_listed(held)})"
        ": choose a new or empty folder (only an earlier export there is replaced)"
      )


def _int_keys(tree):
  """Orbax stores dict keys as strings; NNX layer lists use integers."""
  if isinstance(tree, dict):
    return {
      (int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()
    }
  return tree
