"""A supervised stage's checkpoints (SFT, reward model, DPO) in ``WORKDIR/{stage}_checkpoints``:
what a resume must agree on (the config fields the stage reads, a fingerprint of its training
rows), and their life cycle around the stage's model folder. ``supervised.train`` saves and
resumes them."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import pathlib
import shutil
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ppo_jax import sharding as shd
from ppo_jax import writers
from ppo_jax.checkpoint import Checkpointer, holds_checkpoints
from ppo_jax.resume_rules import config_differences, with_paths_resolved

if TYPE_CHECKING:
  from ppo_jax.config import Settings


@dataclasses.dataclass(frozen=True)
class Checkpoints:
  """A supervised stage's checkpoints: written by ``checkpointer`` every
  ``checkpointer.settings.supervised_every`` steps, on preemption and (``save_at_end``) after the
  last step. A stage resumes from the latest only if its config agrees with ``config`` in the
  fields under ``fields`` (``defaults``: every field's default, for fields added since the save)
  and its training data has the same ``fingerprint``. ``meta`` goes into every checkpoint's
  record (what ``ppo-jax export`` needs of a policy: ``export.export_record``)."""

  checkpointer: Checkpointer
  config: dict[str, Any]
  fields: tuple[str, ...]
  defaults: dict[str, Any] | None = None
  fingerprint: str = ""
  save_at_end: bool = True
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def resume(self, record: dict[str, Any], like, total: int, *, limit: str):
    """``(params, opt_state, step, nonfinite_streak, saved record)`` of the stage's latest
    checkpoint (None without one), read onto ``like``'s shapes; refuses one of another config, of
    other training data, or past step ``total`` (``limit``: the setting that gives it).
    ``nonfinite_streak``: the updates skipped in a row just before it was saved."""

    def same_data(saved):
      if (saved.get("rows"), saved.get("data")) != (record["rows"], record["data"]):
        raise ValueError(
          f"{self.checkpointer.directory} holds a stage trained on other data "
          f"({saved.get('rows')} rows then, {record['rows']} now; or the same data split or "
          "encoded otherwise: since 2026-12-06 whole prompts are held out, and a BOS or EOS "
          "written in the text counts once); use a new workdir or the original data, or delete "
          "that folder to train the stage again"
        )

    resumed = self.checkpointer.resume(
      like, record, total, self.defaults, only=self.fields, check=same_data, limit=limit
    )
    if resumed is None:
      return None
    state, saved = resumed
    streak = int(saved.get("nonfinite_streak", 0))  # absent from older checkpoints
    return state["params"], state["opt_state"], int(saved["step"]), streak, saved


def fingerprint(*arrays: np.ndarray) -> str:
  """A digest of arrays' dtypes, shapes and values: the training data a checkpoint was made on."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()[:16]


# What each stage reads, as config prefixes: the model, its own section, its training file (or
# the synthetic task's fields that make it) and the layout of its rows (the fingerprint checks the
# rows themselves). DPO also reads the SFT policy (its reference, so sft.*) and samples its
# evaluations on the prompts as the RL stages do (ppo.*), scored by task.gold.
READ_BY_EVERY_STAGE = (
  "seed",
  "task.name",
  "model.",
  "data.max_",
  "data.prompt_overflow",
  "data.chat_template",
  "data.system_prompt",
)
PAIRS = ("data.preferences", "task.num_pairs", "task.label_noise")
READ_BY = {
  "sft": ("data.sft", "task.num_sft"),
  "rm": PAIRS,
  "dpo": (*PAIRS, "data.prompts", "task.num_prompts", "task.gold", "sft.", "ppo."),
}


def stage_fields(name: str, config: dict | None = None) -> tuple[str, ...]:
  """The config fields (dotted prefixes) a checkpoint or model folder of stage ``name`` must agree
  on. With ``config`` (a run's, as a dict), a reward model that starts from the SFT policy
  (``rm.init='policy'``, the default) also reads SFT's fields."""
  fields = (*READ_BY_EVERY_STAGE, f"{name}.", *READ_BY[name])
  if name == "rm" and (config or {}).get("rm", {}).get("init", "policy") == "policy":
    fields += ("sft.", *READ_BY["sft"])
  return fields


def _config_of(s: Settings) -> dict[str, Any]:
  return json.loads(s.raw.to_json_best_effort())


def _defaults() -> dict[str, Any]:
  from ppo_jax.config import default_values  # config imports this module

  return default_values()


@contextlib.contextmanager
def for_stage(
  s: Settings, workdir: pathlib.Path, name: str, *data: np.ndarray, meta: dict | None = None
) -> Iterator[Checkpoints]:
  """The ``Checkpoints`` of stage ``name`` (sft, rm, dpo) in ``WORKDIR/{name}_checkpoints`` over
  the training arrays ``data``, with ``meta`` in their records. SFT's and the reward model's are
  deleted when the stage's folder is written (``drop_checkpoints``), so they skip the save after
  the last step; DPO's stay. A stage that starts from the SFT policy records which
  (``sft_from``)."""
  config = with_paths_resolved(_config_of(s))
  if name == "dpo" or (name == "rm" and _starts_from_sft(s)):
    meta = {**(meta or {}), **sft_from(workdir)}
  with Checkpointer(pathlib.Path(workdir) / f"{name}_checkpoints", s.checkpoint) as ckpt:
    yield Checkpoints(
      ckpt,
      config,
      stage_fields(name, config),
      _defaults(),
      fingerprint=fingerprint(*data),
      save_at_end=name == "dpo",
      meta=meta or {},
    )


def drop_checkpoints(workdir: pathlib.Path, name: str) -> None:
  """Deletes stage ``name``'s checkpoints (its model folder, now written, supersedes them)."""
  if shd.is_main_process():
    shutil.rmtree(pathlib.Path(workdir) / f"{name}_checkpoints", ignore_errors=True)


def note_skipped(workdir: pathlib.Path, name: str) -> None:
  """Names stage ``name``'s checkpoints when a run skips that stage: they are left as they are."""
  directory = pathlib.Path(workdir) / f"{name}_checkpoints"
  if holds_checkpoints(directory):
    print(
      f"note: {directory} holds checkpoints of the {name} stage, which this run skips; they are "
      "left as they are (--noresume refuses a workdir holding them: delete the folder if stale)"
    )


# Beside a finished stage's weights (sft/, reward_model/): the config it was trained under and a
# digest of its training file, so a later run reuses the folder only if it would train the same.
STAGE_RECORD = "ppo_jax_stage.json"


def file_digest(path: str | pathlib.Path) -> str:
  """The sha256 of a file's bytes (first 16 hex digits)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()[:16]


def _stage_id(folder: pathlib.Path) -> str | None:
  """The id of the training that wrote ``folder`` (None: no such folder, or no record)."""
  try:
    return json.loads((folder / STAGE_RECORD).read_text()).get("id")
  except (OSError, ValueError):
    return None


def sft_from(workdir: pathlib.Path) -> dict[str, str | None]:
  """``{"sft_id": ...}``: which training wrote ``WORKDIR/sft`` (None: none, or no record), for the
  records of what starts from it; ``resume_rules.check_same_start`` compares them on resume."""
  return {"sft_id": _stage_id(pathlib.Path(workdir) / "sft")}


def _starts_from_sft(s: Settings) -> bool:
  return s.rm_run.init == "policy"


def write_record(out: pathlib.Path, s: Settings, name: str, data_file: str) -> None:
  """Writes ``out/ppo_jax_stage.json`` (whole or not at all): stage ``name`` is being trained
  under ``s`` on ``data_file`` (a reward model from the SFT policy: from the one in ``sft/``)."""
  if not shd.is_main_process():
    return
  out = pathlib.Path(out)
  record = {
    "stage": name,
    "id": uuid.uuid4().hex,
    "config": with_paths_resolved(_config_of(s)),
    "data_digest": file_digest(data_file),
  }
  if name == "rm" and _starts_from_sft(s):
    record.update(sft_from(out.parent))
  out.mkdir(parents=True, exist_ok=True)
  writers.write_whole(out / STAGE_RECORD, json.dumps(record, indent=1) + "\n")


def check_record(
  out: pathlib.Path,
  s: Settings,
  name: str,
  data_file: str | None,
  *,
  note: bool = True,
  delete_also: str = "",
) -> None:
  """Refuses (one ValueError line) to reuse the finished stage in ``out`` when this run would
  train it otherwise: a config field the stage reads differs (``stage_fields``; paths as the
  files they name), its training file's bytes do, or (a reward model from the SFT policy)
  ``sft/`` holds another SFT policy than the one it started from. A folder without a record
  (another tool's, or ppo_jax's before records) is reused, with a note if ``note``.
  ``delete_also`` follows "delete that folder" in the refusal (what depends on it)."""
  out = pathlib.Path(out)
  path = out / STAGE_RECORD
  if not path.is_file():
    if note:
      print(f"note: {out} has no record of the config it was trained under; reusing it as it is")
    return
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(
      f"{path}: not a readable record ({e}); delete {out} to train the stage again"
    ) from None
  config = with_paths_resolved(_config_of(s))
  diffs = config_differences(
    saved.get("config", {}), config, defaults=_defaults(), only=stage_fields(name, config)
  )
  if data_file and saved.get("data_digest") not in (None, file_digest(data_file)):
    diffs.append(f"the bytes of {data_file}")
  sft = out.parent / "sft"
  if "sft_id" in saved and _starts_from_sft(s) and saved["sft_id"] != _stage_id(sft):
    since = "trained again or replaced" if sft.is_dir() else "deleted"
    diffs.append(f"the SFT policy it started from ({sft} was {since} since)")
  if diffs:
    raise ValueError(
      f"{out} was trained under another config than this run's ({'; '.join(diffs)}); delete "
      f"that folder{delete_also} to train the stage again (or to go without it), or restore the "
      "config"
    )
