"""A supervised stage's checkpoints: what a resume must agree on (the fields a stage reads, the
fingerprint of its rows). Saving and resuming them is tested in test_supervised.py."""

import copy
import json
import os
import pathlib

import numpy as np
import pytest

from ppo_jax import stage_checkpoints
from ppo_jax.config import base_config
from ppo_jax.resume_rules import config_differences


def test_the_fingerprint_tells_values_dtypes_and_shapes_apart():
  a = np.arange(6, dtype=np.int32)
  same = stage_checkpoints.fingerprint(a.reshape(2, 3), a[::2])
  assert stage_checkpoints.fingerprint(a.reshape(2, 3).copy(), np.ascontiguousarray(a[::2])) == same
  others = [
    (a.reshape(3, 2), a[::2]),  # shape
    (a.reshape(2, 3), a[1::2]),  # values
    (a.reshape(2, 3).astype(np.int64), a[::2]),  # dtype
  ]
  assert len({stage_checkpoints.fingerprint(*x) for x in others} | {same}) == 4


@pytest.mark.parametrize(
  "field,refused_by",
  [
    ("data.sft", {"sft", "rm"}),  # the reward model starts from the SFT policy
    ("data.preferences", {"rm", "dpo"}),
    ("data.prompts", {"dpo"}),  # DPO samples its evaluations on them
    ("data.max_response_len", {"sft", "rm", "dpo"}),  # the rows' layout
    ("sft.batch_size", {"sft", "rm", "dpo"}),  # DPO's reference is the SFT policy
    ("ppo.temperature", {"dpo"}),  # DPO's evaluation sampler
    ("task.num_pairs", {"rm", "dpo"}),  # the synthetic task's preference pairs
    ("task.label_noise", {"rm", "dpo"}),
    ("task.num_sft", {"sft", "rm"}),
    ("task.num_prompts", {"dpo"}),
    ("task.gold", {"dpo"}),  # scores DPO's evaluations
    ("task.name", {"sft", "rm", "dpo"}),
    ("seed", {"sft", "rm", "dpo"}),
  ],
)
def test_a_stage_resumes_after_changes_to_fields_it_does_not_read(field, refused_by):
  saved = json.loads(base_config().to_json_best_effort())
  now = copy.deepcopy(saved)
  *section, name = field.split(".")
  node = now[section[0]] if section else now
  node[name] = "other.jsonl" if name in ("sft", "preferences", "prompts") else 3
  for stage in ("sft", "rm", "dpo"):
    diffs = config_differences(saved, now, only=stage_checkpoints.stage_fields(stage, now))
    assert bool(diffs) == (stage in refused_by), (stage, diffs)
    assert all(d.startswith(f"{field}: ") for d in diffs)
  # A reward model from scratch does not read SFT's fields.
  saved["rm"]["init"] = now["rm"]["init"] = "scratch"
  diffs = config_differences(saved, now, only=stage_checkpoints.stage_fields("rm", now))
  from_sft = field in ("data.sft", "sft.batch_size", "task.num_sft")
  assert bool(diffs) == ("rm" in refused_by and not from_sft), diffs


def test_a_finished_stage_names_what_it_was_trained_on(tmp_path, capsys, monkeypatch):
  """The record beside sft/ refuses a changed training file (its bytes) and a changed field the
  stage reads; a folder without a record is reused with a note."""
  from conftest import smoke_config

  from ppo_jax.config import Settings

  s = Settings.from_config(smoke_config())
  data = tmp_path / "sft.jsonl"
  data.write_text('{"prompt": "a", "response": "b"}\n')
  out = tmp_path / "sft"
  out.mkdir()
  stage_checkpoints.check_record(out, s, "sft", str(data))
  assert capsys.readouterr().out.startswith(f"note: {out} has no record of the config")
  stage_checkpoints.write_record(out, s, "sft", str(data))
  stage_checkpoints.check_record(out, s, "sft", str(data))  # the same: reused
  stage_checkpoints.check_record(
    out, Settings.from_config(smoke_config(ppo__kl_coef=0.5)), "sft", str(data)
  )
  data.write_text('{"prompt": "a", "response": "c"}\n')
  with pytest.raises(
    ValueError, match=rf"^{out} was trained under .*\(the bytes of {data}\); delete"
  ):
    stage_checkpoints.check_record(out, s, "sft", str(data))
  # A relative path to the same file is the same file; a damaged record is named.
  files = lambda path: smoke_config(
    task__name="files",
    model__tokenizer=str(tmp_path / "t"),
    data__sft=path,
    data__prompts=path,
    data__preferences=path,
  )
  stage_checkpoints.write_record(out, Settings.from_config(files(str(data))), "sft", str(data))
  monkeypatch.chdir(out)
  relative = Settings.from_config(files("../sft.jsonl"))
  stage_checkpoints.check_record(out, relative, "sft", "../sft.jsonl")
  (out / stage_checkpoints.STAGE_RECORD).write_text('{"stage": "sf')
  with pytest.raises(
    ValueError, match=r"ppo_jax_stage\.json: not a readable record \(.*\); delete"
  ):
    stage_checkpoints.check_record(out, relative, "sft", "../sft.jsonl")
  stage_checkpoints.write_record(out, s, "sft", str(data))
  changed = Settings.from_config(smoke_config(data__max_prompt_len=24))
  with pytest.raises(ValueError, match=r"\(data\.max_prompt_len: \d+ → 24\); delete that folder"):
    stage_checkpoints.check_record(out, changed, "sft", str(data))


def test_held_out_metrics_are_written_whole_and_a_bad_file_is_named(tmp_path, capsys):
  """A finished stage's held-out metrics are reported, never trained on: an unreadable file (one
  cut short before writes were atomic) costs a note, not the run."""
  from ppo_jax import stages, writers

  path = tmp_path / stages.HELD_OUT
  writers.write_whole(path, json.dumps({"nll": 1.5, "accuracy": 0.25}))
  assert stages._held_out(path) == {"nll": 1.5, "accuracy": 0.25}
  assert [p.name for p in tmp_path.iterdir()] == [stages.HELD_OUT]  # no partial file left
  assert stages._held_out(tmp_path / "absent.json") == {}
  for text in ("", '{"nll": ', "[1, 2]", '{"nll": "x"}'):
    path.write_text(text)
    assert stages._held_out(path) == {}
    assert f"note: {path} is unreadable (" in capsys.readouterr().out, text


def test_a_stage_folder_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
  """A run killed while it saves sft/ (its weights written, not yet its held-out metrics or
  tokenizer) leaves no sft/ a resumed run would take for finished; the next save replaces an
  unfinished one whole and leaves no partial folder."""
  from conftest import smoke_config
  from flax import nnx

  from ppo_jax import stages
  from ppo_jax.compat import has_model_folder
  from ppo_jax.config import Settings
  from ppo_jax.models import CausalLM, ModelConfig

  s = Settings.from_config(smoke_config())
  data = tmp_path / "sft.jsonl"
  data.write_text('{"prompt": "a", "response": "b"}\n')
  cfg = ModelConfig.gpt2(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2)
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  out = tmp_path / "sft"
  out.mkdir()
  (out / "stale.txt").write_text("from an earlier, unfinished save")
  real = stages.save_pretrained

  def killed(*args, **kw):
    real(*args, **kw)  # the weights are written...
    raise KeyboardInterrupt  # ...and the run stops before the held-out metrics

  monkeypatch.setattr(stages, "save_pretrained", killed)
  with pytest.raises(KeyboardInterrupt):
    stages._save(s, "sft", str(data), model, out, None, {"nll": 1.5})
  assert not has_model_folder(out) and (out / "stale.txt").exists()
  monkeypatch.setattr(stages, "save_pretrained", real)
  (tmp_path / ".sft.partial" / "leftover.bin").write_text("of the killed save")
  stages._save(s, "sft", str(data), model, out, None, {"nll": 1.5})
  assert has_model_folder(out) and not (out / "stale.txt").exists()
  assert not (out / "leftover.bin").exists()  # the staging folder is emptied first
  assert {stages.HELD_OUT, stage_checkpoints.STAGE_RECORD} <= {p.name for p in out.iterdir()}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["sft", "sft.jsonl"]  # no partial left
  assert stages._held_out(out / stages.HELD_OUT) == {"nll": 1.5}
  stage_checkpoints.check_record(out, s, "sft", str(data))  # its record: reused as finished


def test_a_stage_folder_renamed_aside_and_not_replaced_is_put_back(tmp_path):
  """A kill between saved_whole's two renames leaves sft/ at .sft.old: the next run puts it back
  before anything reads it; an aside folder whose replacement is in place is left to be
  deleted by the next save."""
  from ppo_jax.stage_folders import put_back_aside

  names = ("sft", "reward_model", "ppo_base", "policy")  # every folder saved_whole writes
  for name in names:
    (tmp_path / f".{name}.old").mkdir()
    (tmp_path / f".{name}.old" / "config.json").write_text(name)
  put_back_aside(tmp_path)
  for name in names:
    assert (tmp_path / name / "config.json").read_text() == name
    assert not (tmp_path / f".{name}.old").exists()
  other = tmp_path / "other"
  (other / ".policy.old").mkdir(parents=True)
  (other / "policy").mkdir()
  put_back_aside(other)
  assert (other / ".policy.old").is_dir() and not any((other / "policy").iterdir())


def test_a_kill_between_the_two_renames_leaves_the_old_folder_aside(tmp_path, monkeypatch):
  """saved_whole renames the old folder aside, then the new one in: a kill between the two
  leaves the old one whole at ``.sft.old`` (put back by the next run), never deleted."""
  from ppo_jax import stage_folders

  out = tmp_path / "sft"
  out.mkdir()
  (out / "config.json").write_text("old")
  real = os.replace

  def killed(src, dst):
    if pathlib.Path(src).name == ".sft.partial":
      raise KeyboardInterrupt
    real(src, dst)

  monkeypatch.setattr(stage_folders.os, "replace", killed)
  with pytest.raises(KeyboardInterrupt), stage_folders.saved_whole(out) as staging:
    staging.mkdir()
    (staging / "config.json").write_text("new")
  monkeypatch.undo()
  assert not out.exists() and (tmp_path / ".sft.old" / "config.json").read_text() == "old"
  stage_folders.put_back_aside(tmp_path)
  assert (out / "config.json").read_text() == "old"


def _tiny_stage(tmp_path):
  """(settings, training file, model) of a tiny SFT stage."""
  from conftest import smoke_config
  from flax import nnx

  from ppo_jax.config import Settings
  from ppo_jax.models import CausalLM, ModelConfig

  data = tmp_path / "sft.jsonl"
  data.write_text('{"prompt": "a", "response": "b"}\n')
  cfg = ModelConfig.gpt2(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2)
  return Settings.from_config(smoke_config()), str(data), CausalLM(cfg, rngs=nnx.Rngs(0))


def _weights(model):
  import jax
  from flax import nnx

  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_a_finished_stage_is_reused_with_its_metrics_and_drops_the_checkpoints_it_left(
  tmp_path, capsys
):
  """A run stopped after sft/ was saved, before its checkpoints were deleted: the next run loads
  sft/ (its held-out metrics reported again) and deletes them; one under another config is
  refused and deletes nothing."""
  from conftest import smoke_config

  from ppo_jax import stages
  from ppo_jax.config import Settings

  s, data, model = _tiny_stage(tmp_path)
  out = tmp_path / "sft"
  stages._save(s, "sft", data, model, out, None, {"nll": 1.5})
  (tmp_path / "sft_checkpoints" / "40").mkdir(parents=True)
  changed = Settings.from_config(smoke_config(sft__epochs=3.0))
  with pytest.raises(ValueError, match=rf"^{out} was trained under .*\(sft\.epochs: "):
    stages._reuse(changed, "sft", out, data)
  assert (tmp_path / "sft_checkpoints" / "40").is_dir()
  reused, held_out = stages._reuse(s, "sft", out, data)
  assert f"found {out}: loading it instead of training" in capsys.readouterr().out
  assert held_out == {"nll": 1.5} and not (tmp_path / "sft_checkpoints").exists()
  assert all(np.array_equal(a, b) for a, b in zip(_weights(reused), _weights(model), strict=True))


def test_a_trained_stage_is_saved_then_its_checkpoints_are_deleted(tmp_path, monkeypatch):
  """Once sft/ is written, with its record and held-out metrics, the checkpoints SFT trained
  through are deleted: the folder supersedes them."""
  from ppo_jax import stages
  from ppo_jax.compat import has_model_folder

  s, data, model = _tiny_stage(tmp_path)

  def fit(name, params, graphdef, *args, checkpoints, **kw):
    step = checkpoints.checkpointer.directory / "3"
    step.mkdir(parents=True)  # a checkpoint of the training
    return params, {"nll": 2.0}

  monkeypatch.setattr(stages.supervised, "fit", fit)
  arrays, out = (np.arange(6).reshape(2, 3),), tmp_path / "sft"
  kw = {"out": out, "data_file": data, "tokenizer": None, "seed": 0}
  _, held_out = stages._train_and_save(s, "sft", model, None, s.sft, None, None, arrays, **kw)
  assert held_out == {"nll": 2.0} and has_model_folder(out)
  assert stages._held_out(out / stages.HELD_OUT) == {"nll": 2.0}
  assert not (tmp_path / "sft_checkpoints").exists()


def test_a_reward_model_from_the_sft_policy_is_refused_once_that_policy_is_replaced(tmp_path):
  """The record of a reward model trained from sft/ names that SFT training: reused while sft/
  holds it, refused once SFT trained again or was deleted; one from scratch names none."""
  import shutil

  from conftest import smoke_config

  from ppo_jax.config import Settings

  s, data, _ = _tiny_stage(tmp_path)
  sft, rm = tmp_path / "sft", tmp_path / "reward_model"
  record = lambda folder: json.loads((folder / stage_checkpoints.STAGE_RECORD).read_text())
  stage_checkpoints.write_record(sft, s, "sft", data)
  stage_checkpoints.write_record(rm, s, "rm", data)
  assert record(rm)["sft_id"] == record(sft)["id"]
  stage_checkpoints.check_record(rm, s, "rm", data)  # the same SFT policy: reused
  stage_checkpoints.write_record(sft, s, "sft", data)  # SFT trained again
  with pytest.raises(
    ValueError, match=r"\(the SFT policy it started from \(.*sft was trained again or replaced"
  ):
    stage_checkpoints.check_record(rm, s, "rm", data)
  shutil.rmtree(sft)
  with pytest.raises(ValueError, match=r"\(the SFT policy it started from \(.*sft was deleted"):
    stage_checkpoints.check_record(rm, s, "rm", data)
  scratch = Settings.from_config(smoke_config(rm__init="scratch"))
  stage_checkpoints.write_record(rm, scratch, "rm", data)
  assert "sft_id" not in record(rm)
  stage_checkpoints.check_record(rm, scratch, "rm", data)


def test_only_dpo_saves_its_last_step_and_the_stages_from_sft_name_that_policy(tmp_path):
  """SFT's and the reward model's checkpoints are deleted once their folder is written, so they
  skip the save after the last step; DPO's stay. The reward model (from the SFT policy) and DPO
  record which SFT training they started from."""
  s, data, _ = _tiny_stage(tmp_path)
  stage_checkpoints.write_record(tmp_path / "sft", s, "sft", data)
  sft_id = stage_checkpoints.sft_from(tmp_path)["sft_id"]
  assert sft_id is not None
  for name, keeps, from_sft in (("sft", False, False), ("rm", False, True), ("dpo", True, True)):
    with stage_checkpoints.for_stage(s, tmp_path, name, np.arange(3)) as checkpoints:
      assert checkpoints.checkpointer.directory == tmp_path / f"{name}_checkpoints"
      assert checkpoints.save_at_end == keeps, name
      assert checkpoints.meta == ({"sft_id": sft_id} if from_sft else {}), name
      assert checkpoints.fingerprint == stage_checkpoints.fingerprint(np.arange(3))


def test_a_skipped_stage_names_its_checkpoints_folder_only_when_it_holds_some(tmp_path, capsys):
  """An empty ``rm_checkpoints/`` (a stage stopped before its first save) is no reason for a
  note; one holding a step is named."""
  directory = tmp_path / "rm_checkpoints"
  directory.mkdir()
  stage_checkpoints.note_skipped(tmp_path, "rm")
  assert capsys.readouterr().out == ""
  (directory / "40").mkdir()
  stage_checkpoints.note_skipped(tmp_path, "rm")
  assert capsys.readouterr().out.startswith(
    f"note: {directory} holds checkpoints of the rm stage, which this run skips"
  )
