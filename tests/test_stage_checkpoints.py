"""A supervised stage's checkpoints: what a resume must agree on (the fields a stage reads, the
fingerprint of its rows). Saving and resuming them is tested in test_supervised.py."""

import copy
import json

import numpy as np
import pytest

from ppo_jax import stage_checkpoints
from ppo_jax.checkpoint import config_differences
from ppo_jax.config import base_config


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
    ("data.sft", {"sft"}),
    ("data.preferences", {"rm", "dpo"}),
    ("data.prompts", {"dpo"}),  # DPO samples its evaluations on them
    ("data.max_response_len", {"sft", "rm", "dpo"}),  # the rows' layout
    ("sft.batch_size", {"sft", "dpo"}),  # DPO's reference is the SFT policy
    ("ppo.temperature", {"dpo"}),  # DPO's evaluation sampler
    ("task.num_pairs", {"rm", "dpo"}),  # the synthetic task's preference pairs
    ("task.label_noise", {"rm", "dpo"}),
    ("task.num_sft", {"sft"}),
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
    diffs = config_differences(saved, now, only=stage_checkpoints.stage_fields(stage))
    assert bool(diffs) == (stage in refused_by), (stage, diffs)
    assert all(d.startswith(f"{field}: ") for d in diffs)
