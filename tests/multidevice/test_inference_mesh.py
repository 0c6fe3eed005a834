"""ppo-jax sample and rm-eval on several devices write what one device writes."""

import json

import jax
import numpy as np
import pytest
import tiny_hf

from ppo_jax import inference, rm_eval
from ppo_jax import sharding as shd
from ppo_jax.models import from_pretrained
from ppo_jax.sampling import generate
from ppo_jax.tokenizer import build_word_tokenizer

WORDS = [f"w{i}" for i in range(tiny_hf.VOCAB - 8)]
PROMPTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9", "w10 w11", "w3 w3 w3 w3", "w12", "w7 w1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """(policy, reward model, prompts file, pairs file): a GQA Llama policy (2 KV heads, split by
  the tensor axis) and a GPT-2 reward model."""
  root = tmp_path_factory.mktemp("mesh")
  tok = build_word_tokenizer(WORDS)
  tiny_hf.make("llama3", root / "policy", seed=3)
  tiny_hf.make("gpt2", root / "rm", seed=4, kind="sequence_cls")
  for folder in ("policy", "rm"):
    tok.save_pretrained(str(root / folder))
  prompts = root / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  pairs = root / "pairs.jsonl"
  rng = np.random.default_rng(0)
  rows = [
    {
      "prompt": p,
      "chosen": " ".join(rng.choice(WORDS, 3)),
      "rejected": " ".join(rng.choice(WORDS, 2)),
    }
    for p in PROMPTS * 2
  ]
  pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return root / "policy", root / "rm", prompts, pairs


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_device(folders, tmp_path_factory):
  """``{batch size: (summary, sample rows, rm-eval summary, pair rows)}`` on one device."""
  policy, rm, prompts, pairs = folders
  done = {}
  for batch_size in (6, 8):
    out = tmp_path_factory.mktemp(f"one{batch_size}")
    kw = dict(n=3, max_new_tokens=6, reward_model=rm, seed=5, mesh=(1, 1, 1))
    summary = inference.sample_file(
      policy, prompts, out / "samples.jsonl", batch_size=batch_size, **kw
    )
    evaluated = rm_eval.evaluate_pairs(
      rm, pairs, out=out / "pairs.jsonl", batch_size=batch_size, mesh=(1, 1, 1)
    )
    done[batch_size] = summary, _rows(out / "samples.jsonl"), evaluated, _rows(out / "pairs.jsonl")
  return done


@pytest.mark.parametrize(
  "shape, batch_size, said",
  [
    ((-1, 1, 1), 8, "batches of 8 on data 8 × fsdp 1 × tensor 1 (8 devices)"),
    # 21 responses in batches of 6, each call padded to 8 rows for the 4 batch devices.
    ((2, 2, 2), 6, "batches of 6 (padded to 8 rows: data × fsdp = 4) on data 2 × fsdp 2 × "),
  ],
)
def test_sample_and_rm_eval_on_a_mesh_match_one_device(
  folders, one_device, tmp_path, shape, batch_size, said, capsys
):
  policy, rm, prompts, pairs = folders
  summary, rows, evaluated, scored = one_device[batch_size]
  kw = dict(n=3, max_new_tokens=6, reward_model=rm, batch_size=batch_size, seed=5, mesh=shape)
  got_summary = inference.sample_file(policy, prompts, tmp_path / "samples.jsonl", **kw)
  assert said in capsys.readouterr().out
  got = _rows(tmp_path / "samples.jsonl")
  assert len({r["response"] for r in got}) > 3  # sampled, not one greedy answer
  assert [{k: v for k, v in r.items() if k != "score"} for r in got] == [
    {k: v for k, v in r.items() if k != "score"} for r in rows
  ]
  np.testing.assert_allclose(
    [r["score"] for r in got], [r["score"] for r in rows], rtol=1e-5, atol=1e-5
  )
  assert got_summary.keys() == summary.keys()
  got_eval = rm_eval.evaluate_pairs(
    rm, pairs, out=tmp_path / "pairs.jsonl", batch_size=batch_size, mesh=shape
  )
  assert said in capsys.readouterr().out
  assert (got_eval["accuracy"], got_eval["ties"]) == (evaluated["accuracy"], evaluated["ties"])
  got_pairs = _rows(tmp_path / "pairs.jsonl")
  assert [r["index"] for r in got_pairs] == list(range(len(scored)))
  for side in ("chosen", "rejected", "margin"):
    np.testing.assert_allclose(
      [r[side] for r in got_pairs], [r[side] for r in scored], rtol=1e-5, atol=1e-5, err_msg=side
    )


def test_rows_stay_split_on_data(folders):
  """On a data mesh each device samples its own rows (GSPMD did not replicate the batch). On fsdp
  GSPMD keeps the weights where they are and splits each product's contraction instead, every
  device on every row: no weight all-gather per decode step (docs/scaling.md)."""
  policy = folders[0]
  mesh = shd.command_mesh((8, 1, 1))
  model = shd.placed(from_pretrained(policy, kind="causal_lm"), mesh)
  ids = np.full((8, 3), 7, np.int32)
  gen = generate(
    model,
    shd.on_rows(ids, mesh),
    shd.on_rows(np.ones_like(ids), mesh),
    key=jax.random.key(0),
    max_new_tokens=4,
  )
  assert gen.tokens.sharding.shard_shape(gen.tokens.shape) == (1, 4)
  with pytest.raises(ValueError, match="needs 16 devices"):
    shd.command_mesh((2, 8, 1))


def test_olmo_norms_over_all_heads_split_over_tensor_match_one_device(tmp_path):
  """OLMo's query and key RMSNorms span all heads, whose features the tensor axis splits: logits
  and the gradient of the response log-probs on a 2 × 2 × 2 mesh are one device's."""
  import jax.numpy as jnp
  from flax import nnx

  from ppo_jax.logprobs import token_logprobs

  tiny_hf.make("olmo3", tmp_path, seed=5)
  ids, mask = tiny_hf.batch(seed=5, B=4, T=9, left_pad=(0, 3, 5, 1))

  def run(model, ids, mask):
    def loss(model):
      logits = model(ids, mask)
      return jnp.sum(token_logprobs(logits[:, :-1], ids[:, 1:]) * mask[:, 1:]), logits

    (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return value, logits, nnx.to_pure_dict(nnx.state(grads))

  want = run(from_pretrained(tmp_path), jnp.asarray(ids), jnp.asarray(mask))
  mesh = shd.make_mesh((2, 2, 2))
  model = shd.placed(from_pretrained(tmp_path), mesh)
  assert model.trunk.layers[0].attn.q.kernel[...].sharding.spec[1] == "tensor"
  got = nnx.jit(run)(model, shd.on_rows(ids, mesh), shd.on_rows(mask, mesh))
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-4, rtol=1e-4)
  flat = lambda tree: dict(jax.tree_util.tree_flatten_with_path(tree)[0])
  grads, want_grads = flat(got[2]), flat(want[2])
  assert grads.keys() == want_grads.keys() and len(grads) > 20
  for path, g in want_grads.items():
    np.testing.assert_allclose(np.asarray(grads[path]), np.asarray(g), atol=1e-4, rtol=1e-3)
