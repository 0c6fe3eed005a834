"""NNX decoders against transformers: logits, save/load round trips, dtypes, errors."""

import functools
import json
import operator
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tiny_hf
import torch
import transformers as tf
from flax import nnx

import ppo_jax as pj
from ppo_jax.models import ModelConfig

FAMILIES = list(tiny_hf.CONFIGS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name → (folder, torch model) for every family, plus a sharded and a bf16 checkpoint."""
  root = tmp_path_factory.mktemp("hf")
  out = {name: (root / name, tiny_hf.make(name, root / name)) for name in FAMILIES}
  out["sharded"] = (
    root / "sharded",
    tiny_hf.make("llama3", root / "sharded", seed=1, max_shard_size="20KB"),
  )
  out["bf16"] = (root / "bf16", tiny_hf.make("qwen2", root / "bf16", seed=2, dtype=torch.bfloat16))
  return out


@pytest.mark.parametrize("name", [*FAMILIES, "sharded"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_logits_match_transformers(checkpoints, name, padded):
  folder, hf_model = checkpoints[name]
  model = pj.models.from_pretrained(folder)
  ids, mask = tiny_hf.batch(left_pad=(0, 3, 5) if padded else (0, 0, 0))
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask) if padded else None))
  want = tiny_hf.torch_logits(hf_model, ids, mask if padded else None)
  assert got.dtype == np.float32 and np.abs(want).max() > 1.0  # logits far from uniform
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_gemma_configs_read_as_transformers_runs_them(tmp_path):
  """Gemma 3's attention ignores attn_logit_softcapping in transformers (so ppo_jax does too); a
  Gemma with no windowed layer keeps its window, which transformers needs to run the saved copy;
  a vision-language Gemma 3 is refused with what to use instead."""
  ids, mask = tiny_hf.batch(seed=4)
  for name, changes in [
    ("gemma3", {"attn_logit_softcapping": 5.0}),
    ("gemma2", {"layer_types": ["full_attention", "full_attention"]}),
  ]:
    hf_model = tiny_hf.make(name, tmp_path / name, **changes)
    model = pj.models.from_pretrained(tmp_path / name)
    want = tiny_hf.torch_logits(hf_model, ids, mask)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask > 0], want[mask > 0], atol=1e-4, rtol=1e-4)
    pj.models.save_pretrained(model, tmp_path / f"{name}_saved")
    back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / f"{name}_saved")).eval()
    np.testing.assert_allclose(
      tiny_hf.torch_logits(back, ids, mask)[mask > 0], want[mask > 0], atol=1e-5
    )
  with pytest.raises(ValueError, match=r"'gemma3' .*use a text-only Gemma3ForCausalLM checkpoint"):
    ModelConfig.from_hf(tf.Gemma3Config())


@pytest.mark.parametrize(
  "yarn",
  [  # DeepSeek's mscale pair, an untruncated ramp over dimensions 0–2 (two frequencies blended);
    # a given attention factor, other betas: a ramp over dimensions 0.2–1.4, truncated to 0–2
    {
      "factor": 4.0,
      "original_max_position_embeddings": 64,
      "mscale": 1.0,
      "mscale_all_dim": 0.5,
      "truncate": False,
    },
    {
      "factor": 16.0,
      "original_max_position_embeddings": 64,
      "attention_factor": 1.5,
      "beta_fast": 8.0,
      "beta_slow": 2.0,
    },
  ],
)
def test_yarn_rope_scaling_matches_transformers(tmp_path, yarn):
  """YaRN on a plain config (Qwen3's long-context setting): logits, and a save transformers
  reads back with the same parameters."""
  rope = {"rope_type": "yarn", "rope_theta": 10000.0}
  hf_model = tiny_hf.make("qwen3", tmp_path / "src", rope_parameters={**rope, **yarn})
  model = pj.models.from_pretrained(tmp_path / "src")
  assert model.cfg.rope_type == "yarn"
  ids, mask = tiny_hf.batch(seed=9)
  want = tiny_hf.torch_logits(hf_model, ids, mask)
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(got[mask > 0], want[mask > 0], atol=1e-4, rtol=1e-4)
  pj.models.save_pretrained(model, tmp_path / "saved")
  saved = json.loads((tmp_path / "saved" / "config.json").read_text())["rope_parameters"]
  assert saved == {**rope, **yarn}
  # Typed as transformers' own (an int context, a bool switch): 8.0 == 8 and 0.0 == False pass.
  assert {k: type(v) for k, v in saved.items()} == {k: type(v) for k, v in {**rope, **yarn}.items()}
  back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
  np.testing.assert_allclose(
    tiny_hf.torch_logits(back, ids, mask)[mask > 0], want[mask > 0], atol=1e-5
  )


def test_original_gpt2_layout_loads(checkpoints, tmp_path):
  """openai-community/gpt2's own file: names without ``transformer.`` (``h.0.…``,
  ``wte.weight``), each block's ``attn.bias`` and ``attn.masked_bias`` buffers, and the tied
  head stored too as ``lm_head.weight``; it loads, buffers and the stored head skipped, to
  transformers' logits."""
  folder, hf_model = checkpoints["gpt2"]
  tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
  assert all(n.startswith("transformer.") for n in tensors)
  original = {n.removeprefix("transformer."): t for n, t in tensors.items()}
  n = hf_model.config.n_positions
  for i in range(hf_model.config.n_layer):
    original[f"h.{i}.attn.bias"] = np.tril(np.ones((n, n), np.float32))[None, None]
    original[f"h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
  original["lm_head.weight"] = original["wte.weight"]
  safetensors.numpy.save_file(original, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  model = pj.models.from_pretrained(tmp_path)
  ids, mask = tiny_hf.batch(seed=5)
  np.testing.assert_allclose(
    np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[mask > 0],
    tiny_hf.torch_logits(hf_model, ids, mask)[mask > 0],
    atol=1e-4,
    rtol=1e-4,
  )


@pytest.mark.parametrize("name", FAMILIES)
def test_config_round_trips_through_config_json(tmp_path, name):
  """Every field ``to_hf`` writes reads back the same through config.json, with values apart
  from transformers' defaults (a field left out takes the default): GPT-2's ``n_inner`` and
  ``layer_norm_epsilon``, every family's norm epsilon and MLP width, Llama's ``mlp_bias`` and
  ``attention_bias``, BOS, EOS (two), pad."""
  cfg = ModelConfig.from_hf(tiny_hf.CONFIGS[name]()).replace(
    intermediate_size=48,
    norm_eps=1e-3,
    bos_token_id=3,
    eos_token_id=7,
    extra_eos_token_ids=(9,),
    pad_token_id=1,
  )
  if cfg.model_type == "llama":
    cfg = cfg.replace(mlp_bias=True, qkv_bias=True, o_bias=True)
  for architecture in ("causal_lm", "sequence_cls"):
    cfg.to_hf(architecture=architecture).save_pretrained(str(tmp_path / architecture))
    back = ModelConfig.from_hf(tf.AutoConfig.from_pretrained(str(tmp_path / architecture)))
    assert back == cfg, architecture


def test_sharded_checkpoint_has_an_index(checkpoints):
  folder, _ = checkpoints["sharded"]
  index = json.loads((folder / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1


def test_bf16_checkpoint(checkpoints, tmp_path):
  """A bf16 checkpoint loads in float32 or bf16 (params, compute, or both), and a model of bf16
  params saves as one: every tensor BF16, config.json's dtype bfloat16."""
  folder, _ = checkpoints["bf16"]
  ids, mask = tiny_hf.batch(seed=1)
  # float32 compute over the exact bf16 weights equals transformers in float32 over the same.
  hf32 = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
  model = pj.models.from_pretrained(folder)
  want = tiny_hf.torch_logits(hf32, ids, mask)
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(got[mask > 0], want[mask > 0], atol=1e-4, rtol=1e-4)
  # bf16 params and compute stay close to that (bf16 has 8 bits of mantissa).
  m16 = pj.models.from_pretrained(folder, dtype="bfloat16")
  assert m16.trunk.embed.embedding[...].dtype == jnp.bfloat16
  got16 = np.asarray(m16(jnp.asarray(ids), jnp.asarray(mask)))
  assert got16.dtype == np.float32
  assert np.abs(got16 - got)[mask > 0].max() < 0.1 * np.abs(got).max()
  # fp32 master weights with bf16 compute.
  mixed = pj.models.from_pretrained(folder, dtype="bfloat16", param_dtype="float32")
  assert mixed.trunk.embed.embedding[...].dtype == jnp.float32
  # Dtypes as objects are taken by name: the same model, config equal (a jit static) too.
  same = pj.models.from_pretrained(folder, dtype=jnp.bfloat16, param_dtype=np.dtype("float32"))
  assert same.cfg == mixed.cfg and same.cfg.dtype == "bfloat16"
  # Saved in bf16, as it came: not widened to float32, and config.json says so.
  pj.models.save_pretrained(m16, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text()).get("dtype") == "bfloat16"
  with safetensors.safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
    dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
  assert dtypes and set(dtypes.values()) == {"BF16"}, dtypes


@pytest.mark.parametrize("name", FAMILIES)
def test_save_then_transformers_loads_the_same_model(checkpoints, tmp_path, name):
  """The saved folder gives transformers the same logits, and ppo_jax the same special ids:
  the config's (EOS 5), not the tokenizer's saved beside it (EOS 1), which fill only ids the
  config lacks; BOS written too (transformers' default would take its place)."""
  folder, hf_model = checkpoints[name]
  model = pj.models.from_pretrained(folder)
  tok = pj.tokenizer.build_word_tokenizer([f"w{i}" for i in range(tiny_hf.VOCAB - 4)])
  assert tok.eos_token_id != model.cfg.eos_token_id
  pj.models.save_pretrained(model, tmp_path, tokenizer=tok)
  mode = lambda name: (tmp_path / name).stat().st_mode & 0o777
  assert mode("model.safetensors") == mode("config.json")  # not 0600: others may read it
  reloaded = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids, mask = tiny_hf.batch(seed=2)
  np.testing.assert_allclose(
    tiny_hf.torch_logits(reloaded, ids, mask)[mask > 0],
    tiny_hf.torch_logits(hf_model, ids, mask)[mask > 0],
    atol=1e-5,
  )
  assert tf.AutoTokenizer.from_pretrained(str(tmp_path)).pad_token_id == 0
  special = lambda c: (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.extra_eos_token_ids)
  assert special(model.cfg) == (2, tiny_hf.EOS, tiny_hf.PAD, ())
  assert special(pj.models.from_pretrained(tmp_path).cfg) == special(model.cfg)


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen3", "gemma2", "gemma3", "olmo3"])
def test_reward_model_matches_sequence_classification(tmp_path, name):
  hf_rm = tiny_hf.make(name, tmp_path / "rm", seed=3, kind="reward")
  rm = pj.models.from_pretrained(tmp_path / "rm")
  assert isinstance(rm, pj.models.RewardModel)
  ids, mask = tiny_hf.batch(seed=3)
  with torch.no_grad():
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    want = (
      hf_rm(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
      .logits[:, 0]
      .numpy()
    )
  np.testing.assert_allclose(rm(jnp.asarray(ids), jnp.asarray(mask)), want, atol=1e-4)
  # No mask: every token is real, the score the last one's (row 0 has no padding).
  np.testing.assert_allclose(rm(jnp.asarray(ids[:1])), want[:1], atol=1e-4)
  # The same checkpoint as a critic: one value per token, the last one is the score.
  critic = pj.models.from_pretrained(tmp_path / "rm", kind="value")
  values = critic(jnp.asarray(ids), jnp.asarray(mask))
  assert values.shape == ids.shape
  np.testing.assert_allclose(values[:, -1], want, atol=1e-4)
  # Save → transformers' sequence classifier gives the same scores.
  pj.models.save_pretrained(rm, tmp_path / "out")
  hf_back = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    back = (
      hf_back(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
      .logits[:, 0]
      .numpy()
    )
  np.testing.assert_allclose(back, want, atol=1e-5)


def test_several_eos_ids_are_kept_and_saved_back(tmp_path):
  """A checkpoint that stops on several ids (Llama 3 Instruct: <|end_of_text|>, <|eot_id|>):
  the first is ``eos_token_id``, the others are kept and written back, so transformers' generate
  on the export stops where the original did. A generation_config.json repeating config.json's
  ids adds none twice."""
  tiny_hf.make("qwen2", tmp_path / "src")
  config = json.loads((tmp_path / "src" / "config.json").read_text())
  (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "eos_token_id": [5, 7]}))
  model = pj.models.from_pretrained(tmp_path / "src")
  assert model.cfg.eos_token_id == 5 and model.cfg.extra_eos_token_ids == (7,)
  assert ModelConfig.from_dict(model.cfg.to_dict()) == model.cfg
  pj.models.save_pretrained(model, tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == [5, 7]
  assert tf.AutoConfig.from_pretrained(str(tmp_path / "out")).eos_token_id == [5, 7]
  # generation_config.json listing the same ids: each counted once, and written back once.
  (tmp_path / "src" / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
  model = pj.models.from_pretrained(tmp_path / "src")
  assert model.cfg.eos_token_id == 5 and model.cfg.extra_eos_token_ids == (7,)
  pj.models.save_pretrained(model, tmp_path / "again")
  gen = json.loads((tmp_path / "again" / "generation_config.json").read_text())
  assert gen["eos_token_id"] == [5, 7]


def test_generation_config_stop_ids_are_read_and_written_with_sampling_defaults(tmp_path):
  """Instruct checkpoints list their end-of-turn token in generation_config.json, beside sampling
  defaults: the ids join ``extra_eos_token_ids``; a saved causal LM gets the file back, its ids
  ours, the defaults given kept, and transformers' generate stops at every id."""
  hf_model = tiny_hf.make("qwen3", tmp_path / "src")
  gen = {"eos_token_id": [5, 9], "do_sample": True, "temperature": 0.6, "top_p": 0.95}
  (tmp_path / "src" / "generation_config.json").write_text(json.dumps(gen))
  model = pj.models.from_pretrained(tmp_path / "src")
  assert model.cfg.eos_token_id == 5 and model.cfg.extra_eos_token_ids == (9,)
  assert pj.models.read_generation_config(tmp_path / "src") == gen
  pj.models.save_pretrained(model, tmp_path / "out", generation_config=gen)
  written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
  assert written == {**gen, "eos_token_id": [5, 9], "bos_token_id": 2, "pad_token_id": 0}
  # The model's ids win over the given file's; its other settings are kept.
  other = {"eos_token_id": [9, 11], "bos_token_id": 3, "temperature": 0.6}
  pj.models.save_pretrained(model, tmp_path / "other", generation_config=other)
  assert json.loads((tmp_path / "other" / "generation_config.json").read_text()) == {
    "eos_token_id": [5, 9],
    "bos_token_id": 2,
    "pad_token_id": 0,
    "temperature": 0.6,
  }
  assert tf.GenerationConfig.from_pretrained(str(tmp_path / "out")).eos_token_id == [5, 9]
  # transformers' generate stops at the file's ids, which config.json does not list: made one the
  # greedy run emits third.
  ids, _ = tiny_hf.batch(seed=6, B=1, T=7, left_pad=(0,))
  with torch.no_grad():
    free = hf_model.generate(
      torch.tensor(ids), do_sample=False, max_new_tokens=8, eos_token_id=None
    )
  stop = int(free[0, ids.shape[1] + 2])
  (tmp_path / "out" / "generation_config.json").write_text(
    json.dumps({**written, "eos_token_id": [5, stop], "do_sample": False})
  )
  exported = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    out = exported.generate(torch.tensor(ids), max_new_tokens=8, pad_token_id=0)
  assert out.shape[1] - ids.shape[1] <= 3 and int(out[0, -1]) in (5, stop)
  # Repeated ids count once; a file that does not parse, or whose ids are not ids, is skipped
  # with a warning (transformers skips it too).
  gen_file = tmp_path / "src" / "generation_config.json"
  gen_file.write_text(json.dumps({"eos_token_id": [9, 9, 5, 11]}))
  assert pj.models.from_pretrained(tmp_path / "src").cfg.extra_eos_token_ids == (9, 11)
  for bad, why in (
    ("{", "not valid JSON"),
    ('{"eos_token_id": [7, null]}', "not token ids"),
    ('{"eos_token_id": [7, true]}', "not token ids"),  # JSON's true is no id 1
  ):
    gen_file.write_text(bad)
    with pytest.warns(UserWarning, match=f"generation_config.json: .*{why}.*; ignored"):
      assert pj.models.from_pretrained(tmp_path / "src").cfg.extra_eos_token_ids == ()
  # A reward model has no generation: no file.
  pj.models.save_pretrained(
    pj.models.from_pretrained(tmp_path / "src", kind="reward"), tmp_path / "rm"
  )
  assert not (tmp_path / "rm" / "generation_config.json").exists()
  # A config.json of no EOS takes the file's first id as its EOS, the others as extra ones.
  config = json.loads((tmp_path / "src" / "config.json").read_text())
  (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "eos_token_id": None}))
  gen_file.write_text(json.dumps({"eos_token_id": [9, 11]}))
  cfg = pj.models.from_pretrained(tmp_path / "src").cfg
  assert (cfg.eos_token_id, cfg.extra_eos_token_ids) == (9, (11,))


def test_saving_a_reward_model_whose_pad_is_its_eos_or_none_warns(tmp_path):
  """transformers' classifier reads the score before a final EOS when pad == EOS, and scores no
  batch without a pad id: said on save (a causal LM has no such reading and saves quietly)."""
  import warnings

  kw = dict(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16)
  same = ModelConfig.gpt2(**kw, eos_token_id=1, pad_token_id=1)
  with pytest.warns(UserWarning, match="pad and EOS share id 1"):
    pj.models.save_pretrained(pj.models.RewardModel(same, rngs=nnx.Rngs(0)), tmp_path / "rm")
  none = ModelConfig.gpt2(**kw, eos_token_id=1)
  with pytest.warns(UserWarning, match="no pad id; .*a batch raises"):
    pj.models.save_pretrained(pj.models.RewardModel(none, rngs=nnx.Rngs(0)), tmp_path / "rm0")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    pj.models.save_pretrained(pj.models.CausalLM(same, rngs=nnx.Rngs(0)), tmp_path / "lm")
    apart = ModelConfig.gpt2(**kw, eos_token_id=1, pad_token_id=0)
    pj.models.save_pretrained(pj.models.RewardModel(apart, rngs=nnx.Rngs(0)), tmp_path / "rm2")


def test_loading_a_reward_model_whose_pad_is_its_eos_warns_and_one_of_two_labels_is_refused(
  tmp_path,
):
  """Said on load too (a Hugging Face reward model of pad == EOS scores other tokens in
  transformers); a classifier of two labels is not a reward model (its misshaped score head was
  blamed on config.json's missing keys)."""
  import json

  kw = dict(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16)
  same = ModelConfig.gpt2(**kw, eos_token_id=1, pad_token_id=1)
  with pytest.warns(UserWarning, match="pad and EOS share id 1"):
    pj.models.save_pretrained(pj.models.RewardModel(same, rngs=nnx.Rngs(0)), tmp_path / "rm")
  with pytest.warns(UserWarning, match=r"rm: pad and EOS share id 1; .* differ from transformers'"):
    pj.models.from_pretrained(tmp_path / "rm")
  config = json.loads((tmp_path / "rm" / "config.json").read_text())
  (tmp_path / "rm" / "config.json").write_text(
    json.dumps({**config, "pad_token_id": 0, "id2label": {"0": "bad", "1": "good"}})
  )
  with pytest.raises(ValueError, match=r"rm: a classifier of num_labels=2; a reward model gives"):
    pj.models.from_pretrained(tmp_path / "rm")


def test_value_model_from_a_causal_lm_gets_a_fresh_head(checkpoints):
  folder, _ = checkpoints["llama3"]
  critic = pj.models.from_pretrained(folder, kind="value", zero_init_head=True)
  lm = pj.models.from_pretrained(folder)
  ids, mask = tiny_hf.batch()
  np.testing.assert_array_equal(critic(jnp.asarray(ids), jnp.asarray(mask)), 0.0)
  np.testing.assert_array_equal(critic.trunk.embed.embedding[...], lm.trunk.embed.embedding[...])


def test_random_model_round_trips_through_transformers(tmp_path):
  cfg = ModelConfig.llama(
    vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.2
  )
  model = pj.models.CausalLM(cfg, rngs=nnx.Rngs(0))
  pj.models.save_pretrained(model, tmp_path)
  hf_model = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids, mask = tiny_hf.batch(seed=4)
  ids = ids % 48
  np.testing.assert_allclose(
    np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[mask > 0],
    tiny_hf.torch_logits(hf_model, ids, mask)[mask > 0],
    atol=1e-4,
  )
  again = pj.models.from_pretrained(tmp_path)
  for a, b in zip(
    jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again)), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_lora_models_are_saved_merged_or_not_at_all(tmp_path):
  """Hugging Face has no place for LoRA adapters: saving an adapted model is refused (it used to
  write the base weights alone), its merge saves the adapted function, and from_pretrained
  refuses to build adapters it cannot fill."""
  from ppo_jax.models.lora import add_lora, merge_lora

  cfg = ModelConfig.llama(
    vocab_size=48, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, initializer_range=0.2
  )
  model = add_lora(pj.models.CausalLM(cfg, rngs=nnx.Rngs(0)), rank=4, targets="q,v")
  _, state = nnx.split(model)  # adapters that change the output
  model = nnx.merge(*nnx.split(model)[:1], jax.tree.map(lambda x: x + 0.3, state))
  with pytest.raises(ValueError, match="has LoRA adapters; merge them first"):
    pj.models.save_pretrained(model, tmp_path / "adapted")
  assert not (tmp_path / "adapted" / "model.safetensors").exists()
  pj.models.save_pretrained(merge_lora(model), tmp_path / "merged")
  ids, mask = tiny_hf.batch(seed=4)
  ids = ids % 48
  np.testing.assert_allclose(
    np.asarray(pj.models.from_pretrained(tmp_path / "merged")(jnp.asarray(ids), jnp.asarray(mask))),
    np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))),
    atol=1e-4,
  )
  with pytest.raises(ValueError, match=r"add adapters with ppo_jax\.models\.lora\.add_lora"):
    pj.models.from_pretrained(tmp_path / "merged", lora_rank=4)


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_changes_nothing_but_memory(remat):
  cfg = ModelConfig.gpt2(
    vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=32
  )
  ids, mask = tiny_hf.batch()

  def loss_and_grad(cfg):
    graphdef, params = nnx.split(pj.models.CausalLM(cfg, rngs=nnx.Rngs(0)))

    def loss(params):
      logits = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(mask))
      return jnp.mean(pj.token_logprobs(logits[:, :-1], jnp.asarray(ids[:, 1:])))

    return jax.jit(jax.value_and_grad(loss))(params)

  (l0, g0), (l1, g1) = loss_and_grad(cfg), loss_and_grad(cfg.replace(remat=remat))
  assert float(l0) == pytest.approx(float(l1), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Broken folders: every problem is named, in one error.


def _rewrite(folder, edit):
  path = folder / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(path))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors_are_all_named(tmp_path):
  tiny_hf.make("llama3", tmp_path)

  def corrupt(t):
    del t["model.layers.1.mlp.up_proj.weight"]
    del t["lm_head.weight"]
    t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    # A bias the config has none of is no buffer to skip (GPT-2's attn.bias is): named too.
    t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
    t["model.norm.weight"] = np.zeros(31, np.float32)

  _rewrite(tmp_path, corrupt)
  with pytest.raises(ValueError) as err:
    pj.models.from_pretrained(tmp_path)
  msg = str(err.value)
  assert "\n" not in msg
  for part in (
    "missing tensors: lm_head.weight, model.layers.1.mlp.up_proj.weight",
    "unexpected tensors: model.layers.0.extra.weight, model.layers.0.self_attn.o_proj.bias;",
    "misshaped tensors: model.norm.weight [31] (expected [32])",
  ):
    assert part in msg


def test_weights_holding_nan_or_inf_are_named_as_they_load(tmp_path):
  """A checkpoint with NaN weights loaded without a word: sampling wrote empty responses and
  training stopped at its non-finite guard, blaming the learning rate."""
  tiny_hf.make("llama3", tmp_path)

  def spoil(t):
    q = t["model.layers.1.self_attn.q_proj.weight"].copy()
    q[0, :2] = np.nan
    q[3, 3] = np.inf
    t["model.layers.1.self_attn.q_proj.weight"] = q

  _rewrite(tmp_path, spoil)
  with pytest.raises(ValueError) as e:
    pj.models.from_pretrained(tmp_path)
  assert str(e.value) == (
    f"{tmp_path}: cannot load as llama causal_lm: non-finite tensors: "
    "model.layers.1.self_attn.q_proj.weight (3 of 1024 values NaN or inf)"
  )


def test_integer_weights_and_config_fields_of_the_wrong_type_are_named(tmp_path):
  """An int32 checkpoint was converted and trained silently; a config.json field of the wrong
  type, or a GPT-2 width its head count does not divide, raised tracebacks (transformers'
  validator's own exception type; a reshape deep in the first forward)."""
  tiny_hf.make("gpt2", tmp_path)

  def to_int(t):
    t["transformer.ln_f.weight"] = t["transformer.ln_f.weight"].astype(np.int32)

  _rewrite(tmp_path, to_int)
  with pytest.raises(ValueError, match=r"non-float tensors: transformer\.ln_f\.weight int32"):
    pj.models.from_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  for edit, message in (
    ({"n_layer": "2"}, r"config\.json: .*n_layer"),
    (
      {"n_head": 5, "n_embd": 32},
      r"config\.json: unsupported model config: gpt2's hidden_size 32 is not num_heads 5 × head_",
    ),
  ):
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=message):
      pj.models.from_pretrained(tmp_path)
  # A size key config.json lacks takes transformers' default (GPT-2's 12 layers): the missing
  # tensors of 10 layers are counted, not listed, and the sizes read are said.
  (tmp_path / "config.json").write_text(
    json.dumps({k: v for k, v in config.items() if k != "n_layer"})
  )
  with pytest.raises(ValueError) as err:
    pj.models.from_pretrained(tmp_path)
  msg = str(err.value)
  assert re.search(r"missing tensors: (transformer\.h\.1\S+, ){4}\S+ and 115 more;", msg), msg
  assert "its config.json gives 12 layers, width" in msg and len(msg) < 700, msg


def test_unsupported_architecture(tmp_path):
  tf.BertConfig(
    hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
  ).save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="unsupported architecture 'bert'"):
    pj.models.from_pretrained(tmp_path)


@pytest.mark.parametrize("config", [tf.Qwen2Config, tf.Qwen3Config])
def test_qwen_sliding_window_is_refused(tmp_path, config):
  """Qwen2/3 put the window on the layers from ``max_window_layers`` on: not modelled, so said
  (and a window on no layer is none)."""
  kw = dict(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, head_dim=4)
  kw.update(use_sliding_window=True)
  config(num_hidden_layers=2, max_window_layers=1, **kw).save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match=rf"{config.__name__} option use_sliding_window=.* \[1\]"):
    pj.models.from_pretrained(tmp_path)
  # The window starts at layer max_window_layers: none when that is past the last layer.
  assert ModelConfig.from_hf(config(num_hidden_layers=2, max_window_layers=2, **kw)) == (
    ModelConfig.from_hf(config(num_hidden_layers=2, **{**kw, "use_sliding_window": False}))
  )


def test_not_a_model_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no config\.json"):
    pj.models.from_pretrained(tmp_path / "nowhere")


def test_pickle_only_folder_is_refused(tmp_path):
  tiny_hf.CONFIGS["gpt2"]().save_pretrained(str(tmp_path))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(FileNotFoundError, match="never unpickles"):
    pj.models.from_pretrained(tmp_path)


def test_missing_shard(tmp_path):
  tiny_hf.make("gpt2", tmp_path, max_shard_size="20KB")
  next(tmp_path.glob("model-00002-*.safetensors")).unlink()
  with pytest.raises(FileNotFoundError, match=r"index\.json are missing: \['model-00002-of-"):
    pj.models.from_pretrained(tmp_path)
  index = tmp_path / "model.safetensors.index.json"
  for text in ('{"weight_map": {', '["a"]', '{"metadata": {}}'):  # cut short, or not an index
    index.write_text(text)
    with pytest.raises(ValueError, match=r"index\.json: not a valid safetensors index \("):
      pj.models.from_pretrained(tmp_path)


def test_saving_over_a_sharded_checkpoint_replaces_it(tmp_path):
  """save_pretrained into a folder that holds a sharded checkpoint: its index and shards go
  (stale weights beside the new: a loader globbing *.safetensors would mix them); other files
  stay."""
  tiny_hf.make("llama3", tmp_path, seed=1, max_shard_size="20KB")
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  (tmp_path / "notes.safetensors").write_bytes(b"not named by the index")
  model = pj.models.from_pretrained(tmp_path)
  graphdef, state = nnx.split(model)
  changed = nnx.merge(graphdef, jax.tree.map(lambda x: x + 1.0, state))
  pj.models.save_pretrained(changed, tmp_path)
  assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == [
    "model.safetensors",
    "notes.safetensors",
  ]
  back = nnx.state(pj.models.from_pretrained(tmp_path))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(nnx.state(changed)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_single_weights_file_beside_an_index_is_the_one_loaded(tmp_path):
  """A folder with both (a single file saved by another tool over a sharded checkpoint): the
  single file is loaded, as transformers loads it, with a warning naming both."""
  sharded, single = tmp_path / "sharded", tmp_path / "single"
  tiny_hf.make("llama3", sharded, seed=1, max_shard_size="20KB")
  tiny_hf.make("llama3", single, seed=2)
  want = nnx.state(pj.models.from_pretrained(single))
  shutil.copy(single / "model.safetensors", sharded / "model.safetensors")
  with pytest.warns(UserWarning, match=r"both model\.safetensors and model\.safetensors\.index"):
    got = nnx.state(pj.models.from_pretrained(sharded))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)


def test_truncated_weights_file_is_named(tmp_path):
  tiny_hf.make("gpt2", tmp_path)
  weights = tmp_path / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-100])  # a download or copy cut short
  with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
    pj.models.from_pretrained(tmp_path)


@pytest.mark.parametrize("targets", ["gate", "q,gate"])
def test_lora_targets_the_model_lacks_are_refused(targets):
  """GPT-2's MLP has no gate: asking for it would train nothing there, silently. A run refuses
  it up front (check_targets); add_lora itself refuses only targets that match nothing, so a
  checkpoint saved with such targets still exports."""
  from ppo_jax.models.layers import LoRAParam
  from ppo_jax.models.lora import add_lora, check_targets

  gpt2 = pj.models.CausalLM(ModelConfig.gpt2(num_layers=1), rngs=nnx.Rngs(0))
  refused = (
    rf"lora_targets '{targets}': this gpt2 model has no gate projection \(it has q, k, v, o, "
  )
  with pytest.raises(ValueError, match=refused + r"up, down\)"):
    check_targets(gpt2.cfg.model_type, gpt2.cfg.projections, targets)
  names = lambda m: {
    p[-2].key
    for p, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(m, LoRAParam)))
  }
  if targets == "gate":
    with pytest.raises(ValueError, match=refused):
      add_lora(gpt2, rank=2, targets=targets)
  else:
    assert names(add_lora(gpt2, rank=2, targets=targets)) == {"q"}
  llama = pj.models.CausalLM(ModelConfig.llama(num_layers=1), rngs=nnx.Rngs(0))
  check_targets(llama.cfg.model_type, llama.cfg.projections, targets)
  assert names(add_lora(llama, rank=2, targets=targets)) == set(targets.split(","))
  for rank in (0, 1.5):  # no adapters at all, silently, before
    with pytest.raises(ValueError, match=rf"rank must be an integer ≥ 1 .*, got {rank}"):
      add_lora(llama, rank=rank, targets=targets)


def test_sequence_classifier_cannot_be_a_causal_lm(tmp_path):
  tiny_hf.make("gpt2", tmp_path, kind="reward")
  with pytest.raises(ValueError, match="no LM head"):
    pj.models.from_pretrained(tmp_path, kind="causal_lm")


def test_config_errors():
  with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
    ModelConfig.llama(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="remat 'all'"):
    ModelConfig.gpt2(remat="all")
  with pytest.raises(ValueError, match="attention 'flash'"):
    ModelConfig.gpt2(attention="flash")
  with pytest.raises(ValueError, match="attention 'cudnn' computes in bfloat16 or float16"):
    ModelConfig.gpt2(attention="cudnn")
  with pytest.raises(ValueError, match="dtype 'int8' \\(expected one of float32, bfloat16"):
    ModelConfig.gpt2(dtype=jnp.int8)
  with pytest.raises(ValueError, match=r"num_kv_heads 0 \(expected ≥ 1\)"):
    ModelConfig.llama(num_kv_heads=0)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="asserts the error off a GPU")
def test_cudnn_attention_off_a_gpu_is_one_clear_error():
  """A full forward and sampling (its decode steps) both say why not."""
  cfg = ModelConfig.llama(num_layers=1, dtype="bfloat16", attention="cudnn")
  model = pj.models.CausalLM(cfg, rngs=nnx.Rngs(0))
  ids = jnp.ones((2, 4), jnp.int32)
  message = r"attention 'cudnn' needs an NVIDIA GPU.*use attention 'xla'"
  with pytest.raises(ValueError, match=message):
    model(ids, None)
  with pytest.raises(ValueError, match=message):
    pj.generate(model, ids, jnp.ones_like(ids), key=jax.random.key(0), max_new_tokens=2)


@pytest.mark.parametrize("impl", ["attend", "attend heads-major", "fused_attend xla"])
def test_attend_matches_a_float64_loop(impl):
  """Grouped-query attention (6 heads over 2 KV heads) with a causal, left-padded mask, against
  a float64 loop over rows and heads; a row with no allowed key averages every value.

  ``fused_attend`` is the call ``model.attention = "cudnn"`` makes, here lowered by XLA (cuDNN
  needs a GPU; docs/benchmarks.md has its figures there).
  """
  from ppo_jax.models.layers import attend, fused_attend

  rng = np.random.default_rng(0)
  B, T, H, K, D = 2, 5, 6, 2, 4
  q, k, v = (
    rng.normal(size=(B, T, H, D)),
    rng.normal(size=(B, T, K, D)),
    rng.normal(size=(B, T, K, D)),
  )
  allowed = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
  allowed[1, :, :2] = False  # row 1: two padding keys; its queries 0 and 1 see nothing
  want = np.zeros((B, T, H, D))
  for b in range(B):
    for t in range(T):
      for h in range(H):
        g = h // (H // K)  # the KV head of query head h
        s = k[b, :, g] @ q[b, t, h] / np.sqrt(D)
        if allowed[b, t].any():
          p = np.where(allowed[b, t], np.exp(s - s[allowed[b, t]].max()), 0.0)
        else:
          p = np.ones(T)
        want[b, t, h] = (p / p.sum()) @ v[b, :, g]
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  if impl == "fused_attend xla":
    got = fused_attend(f32(q), f32(k), f32(v), jnp.asarray(allowed), implementation="xla")
  else:
    heads_major = impl == "attend heads-major"
    kv = (lambda x: x.transpose(0, 2, 1, 3)) if heads_major else (lambda x: x)
    got = attend(f32(q), f32(kv(k)), f32(kv(v)), jnp.asarray(allowed), heads_major=heads_major)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_a_scratch_model_saved_with_its_tokenizer_takes_the_tokenizers_special_ids(tmp_path):
  """A config without EOS or pad (a model built from scratch): the folder says the tokenizer's,
  so transformers' generate and a reload stop at its EOS (it ran past it)."""
  tok = pj.tokenizer.build_word_tokenizer(["good", "film"])
  cfg = ModelConfig.gpt2(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2)
  assert cfg.eos_token_id is None and cfg.pad_token_id is None
  pj.models.save_pretrained(pj.models.CausalLM(cfg, rngs=nnx.Rngs(0)), tmp_path, tokenizer=tok)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert (saved["eos_token_id"], saved["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id)
  generation = json.loads((tmp_path / "generation_config.json").read_text())
  assert generation["eos_token_id"] == tok.eos_token_id
  assert pj.models.from_pretrained(tmp_path).cfg.stop_ids == (tok.eos_token_id,)


def test_merge_lora_folds_alpha_over_rank_times_a_b_into_each_kernel_in_its_dtype():
  """``W + (α/r)·A B`` against NumPy in float64 with add_lora's α = 4, r = 2 (scale 2: r/α is
  0.5, the default α 16 gives 8), in every adapted kernel of both layers, each kept in its dtype
  (bfloat16 here: to its rounding); the kernels without adapters are untouched. add_lora's seed
  draws the adapters."""
  from ppo_jax.models.lora import add_lora, merge_lora, split_lora

  cfg = ModelConfig.llama(
    vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, param_dtype="bfloat16"
  )
  plain = pj.models.CausalLM(cfg, rngs=nnx.Rngs(0))
  model = add_lora(plain, rank=2, alpha=4.0, targets="q,v,down", seed=1)
  graphdef, adapters, base = split_lora(model)
  other_seed = split_lora(add_lora(plain, rank=2, alpha=4.0, targets="q,v,down", seed=2))[1]
  lora_a = lambda tree: [
    x for p, x in jax.tree_util.tree_leaves_with_path(tree) if p[-1].key == "lora_a"
  ]
  assert all(
    not np.array_equal(a, b) for a, b in zip(lora_a(adapters), lora_a(other_seed), strict=True)
  )
  adapters = jax.tree.map(lambda x: (x + 0.25).astype(x.dtype), adapters)  # B ≠ 0
  merged = nnx.to_pure_dict(nnx.state(merge_lora(nnx.merge(graphdef, adapters, base))))
  f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  adapted = set()
  for path, a in jax.tree_util.tree_leaves_with_path(adapters):
    if path[-1].key != "lora_a":
      continue
    keys = [k.key for k in path[:-1]]
    node = lambda tree, keys=keys: functools.reduce(operator.getitem, keys, tree)
    lora_b = node(adapters)["lora_b"]
    want = f64(node(base)["kernel"]) + 2.0 * f64(a) @ f64(lora_b)
    got = node(merged)["kernel"]
    assert got.dtype == jnp.bfloat16, keys
    np.testing.assert_allclose(f64(got), want, rtol=2**-8, atol=1e-6, err_msg=str(keys))
    adapted.add(tuple(keys))
  assert {k[-1] for k in adapted} == {"q", "v", "down"} and len(adapted) == 6
  for path, x in jax.tree_util.tree_leaves_with_path(base):
    if tuple(k.key for k in path[:-1]) not in adapted:
      np.testing.assert_array_equal(
        f64(functools.reduce(operator.getitem, [k.key for k in path], merged)), f64(x)
      )


@pytest.mark.parametrize(
  "rope",
  [
    {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
    {  # Llama 3.1's own numbers: all three bands over 16 frequencies
      "rope_type": "llama3",
      "rope_theta": 500000.0,
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192,
    },
    # YaRN from a long original context, beta_fast and beta_slow at their defaults (32, 1): a
    # ramp over dimensions 2–6 (the tiny checkpoints' short contexts put every bound at 0).
    {
      "rope_type": "yarn",
      "rope_theta": 10000.0,
      "factor": 4.0,
      "original_max_position_embeddings": 4096,
    },
    {
      "rope_type": "yarn",
      "rope_theta": 10000.0,
      "factor": 4.0,
      "original_max_position_embeddings": 4096,
      "truncate": False,
    },
  ],
  ids=lambda r: r["rope_type"] + ("-untruncated" if "truncate" in r else ""),
)
def test_rope_frequencies_and_gain_equal_transformers(rope):
  """Each RoPE's inverse frequencies and YaRN's score gain (m²: its cos and sin each scale by m)
  against transformers' own functions, at head_dim 32 and context lengths of real checkpoints."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  from ppo_jax.models.rope import rope_inv_freq, rope_score_gain

  hf = tf.Qwen3Config(
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=32768,
    rope_parameters=rope,
  )
  want, gain = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf)
  cfg = ModelConfig.from_hf(hf)
  np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg)), np.asarray(want), rtol=1e-6)
  assert rope_score_gain(cfg) == pytest.approx(gain**2, rel=1e-12)


def test_fused_attention_scales_scores_as_attend_does(monkeypatch):
  """``attention="cudnn"`` hands the kernel the layer's own score scale (Gemma 2's
  1/√query_pre_attn_scalar: 1/√24 here, not 1/√head_dim; YaRN's gain takes the same way), in a
  full forward and in a decode step over the cache: the logits of ``attend``. Off a GPU the kernel's
  XLA lowering stands in for cuDNN, in float32 (the config's bf16 rule lifted)."""
  import dataclasses

  from ppo_jax.models import layers
  from ppo_jax.models.transformer import positions_from_mask

  monkeypatch.setitem(layers.FUSED, "cudnn", "xla")
  cfg = ModelConfig.from_hf(tiny_hf.CONFIGS["gemma2"]())  # cuDNN has no soft cap: none here
  cfg = cfg.replace(num_layers=1, full_attention_layers=(0,), attn_logit_softcap=None)
  model = pj.models.CausalLM(cfg, rngs=nnx.Rngs(0))
  fused_cfg = dataclasses.replace(cfg)
  object.__setattr__(fused_cfg, "attention", "cudnn")
  fused = pj.models.CausalLM(fused_cfg, rngs=nnx.Rngs(1))
  nnx.update(fused, nnx.state(model))
  ids, mask = (jnp.asarray(x) for x in tiny_hf.batch(seed=3, T=6))
  kv_mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], axis=1)

  @nnx.jit
  def full_and_step(m):  # a full forward; a prefill of 6 slots, then a decode step at slot 6
    _, cache = m.trunk(
      ids,
      positions_BxT=positions_from_mask(mask),
      kv_mask_BxS=kv_mask,
      cache=m.trunk.init_cache(ids.shape[0], 7),
    )
    step, _ = m.trunk(
      ids[:, -1:],
      positions_BxT=positions_from_mask(kv_mask)[:, -1:],
      kv_mask_BxS=kv_mask,
      cache=cache,
      cache_index=jnp.asarray(6),  # traced, as in the decode loop: the fused kernel's branch
    )
    return m(ids, mask), m.unembed(step)

  (got, got_step), (want, want_step) = full_and_step(fused), full_and_step(model)
  real = np.asarray(mask) > 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_step, want_step, rtol=1e-5, atol=1e-5)


def test_rope_rotates_each_pair_half_a_head_apart_and_keeps_the_dtype():
  """``apply_rope`` against the rotation written out: features ``i`` and ``i + D/2`` turn by
  ``position · inv_freq[i]``; in bfloat16 the result stays bfloat16 (a float32 one put query and
  key in float32 beside a bfloat16 value, which cuDNN's kernel refuses)."""
  from ppo_jax.models.rope import apply_rope

  x = np.random.default_rng(0).normal(size=(1, 3, 2, 4))  # [B, T, H, D]
  positions, inv_freq = np.array([[0, 1, 5]]), np.array([1.0, 0.1])
  angle = positions[0, :, None, None] * inv_freq  # [T, 1, D/2]
  lo, hi = x[..., :2], x[..., 2:]
  want = np.concatenate(
    [lo * np.cos(angle) - hi * np.sin(angle), hi * np.cos(angle) + lo * np.sin(angle)], -1
  )
  rope = lambda dtype: apply_rope(
    jnp.asarray(x, dtype), jnp.asarray(positions), jnp.asarray(inv_freq, jnp.float32)
  )
  np.testing.assert_allclose(rope(jnp.float32), want, rtol=1e-5, atol=1e-6)
  got16 = rope(jnp.bfloat16)
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got16, np.float64), want, atol=0.05)


def test_a_config_read_back_from_its_json_is_equal_and_hashable():
  """``from_dict`` of the JSON ``to_dict`` writes (an exported checkpoint's record) gives the
  config back: JSON lists become tuples again (the window's spared layers too), so it stays a
  usable jit static."""
  for name in ("gemma3", "olmo3", "llama3"):
    cfg = ModelConfig.from_hf(tiny_hf.CONFIGS[name]()).replace(extra_eos_token_ids=(9,))
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg), name


def test_a_fresh_model_starts_as_its_family_initialises_it():
  """Weights drawn with std ``initializer_range``, GPT-2's residual projections (``o``,
  ``down``) with std / √(2L) (Radford et al. 2019); biases zero; norms the identity (Gemma's
  weight 0, scaling by 1 + w); fresh LoRA adapters change nothing (B = 0, A drawn)."""
  from ppo_jax.models.lora import add_lora, split_lora

  cfg = ModelConfig.gpt2(vocab_size=64, hidden_size=64, num_layers=2, initializer_range=0.1)
  block = pj.models.CausalLM(cfg, rngs=nnx.Rngs(0)).trunk.layers[0]
  std = lambda p: float(np.std(np.asarray(p[...])))
  assert std(block.attn.q.kernel) == pytest.approx(0.1, rel=0.1)
  assert std(block.mlp.up.kernel) == pytest.approx(0.1, rel=0.1)
  for out in (block.attn.o.kernel, block.mlp.down.kernel):
    assert std(out) == pytest.approx(0.1 / 2, rel=0.1)  # √(2 · 2 layers)
  np.testing.assert_array_equal(block.attn.q.bias[...], 0.0)
  np.testing.assert_array_equal(block.attn_norm.scale[...], 1.0)
  gemma = pj.models.CausalLM(ModelConfig.from_hf(tiny_hf.CONFIGS["gemma2"]()), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(gemma.trunk.layers[0].attn_post_norm.scale[...], 0.0)
  llama = pj.models.CausalLM(ModelConfig.llama(num_layers=1), rngs=nnx.Rngs(0))
  _, adapters, _ = split_lora(add_lora(llama, rank=2, targets="q,k,v,o,gate,up,down"))
  for path, x in jax.tree_util.tree_leaves_with_path(adapters):
    assert (path[-1].key == "lora_a") == bool(np.any(np.asarray(x))), path


@pytest.mark.parametrize("family", ["llama", "olmo2", "gemma2"])
def test_rmsnorms_in_bfloat16_round_as_transformers_does(family):
  """In bfloat16, Llama's RMSNorm casts the normalised input, then scales in bfloat16; OLMo's
  scales by w in float32 and Gemma's by 1 + w, then cast: each the same bits as transformers'."""
  import importlib

  from ppo_jax.models.layers import Norm

  name = {"llama": "Llama", "olmo2": "Olmo2", "gemma2": "Gemma2"}[family]
  module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
  rng = np.random.default_rng(0)
  x = torch.tensor(rng.normal(size=(4, 64)), dtype=torch.bfloat16)
  w = torch.tensor(0.5 + rng.normal(size=64), dtype=torch.bfloat16)
  theirs = getattr(module, f"{name}RMSNorm")(64, eps=1e-6).to(torch.bfloat16)
  with torch.no_grad():
    theirs.weight.copy_(w)
    want = theirs(x).float().numpy()
  ours = Norm(
    64,
    eps=1e-6,
    rms=True,
    dtype="bfloat16",
    param_dtype="bfloat16",
    offset=family == "gemma2",
    f32_scale=family == "olmo2",
  )
  ours.scale[...] = jnp.asarray(w.float().numpy(), jnp.bfloat16)
  got = ours(jnp.asarray(x.float().numpy(), jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_a_bfloat16_model_caches_in_bfloat16_and_unembeds_in_float32():
  """An untied bf16 model: its decode cache holds bf16 keys and values (float32 would double
  the cache's memory), and its lm_head accumulates the logits in float32, as the tied
  embedding's transpose does."""
  cfg = ModelConfig.llama(vocab_size=64, hidden_size=32, num_layers=1, dtype="bfloat16")
  model = pj.models.CausalLM(cfg, rngs=nnx.Rngs(0))
  assert model.lm_head is not None  # untied
  for layer in model.trunk.init_cache(2, 5):
    assert layer.k.dtype == layer.v.dtype == jnp.bfloat16
  hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32)), jnp.bfloat16)
  logits = model.unembed(hidden)
  assert logits.dtype == jnp.float32
  kernel = model.lm_head.kernel[...].astype(jnp.bfloat16)  # read in the compute dtype
  want = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "gemma3", "olmo2", "olmo3"])
def test_attention_bias_is_saved_back_to_config_json(tmp_path, name):
  """A checkpoint of ``attention_bias=True`` (biases on q, k, v and o) writes the flag back:
  left out, transformers takes its default (False), builds no biases and drops the saved ones."""
  hf = tiny_hf.CONFIGS[name]()
  hf.attention_bias = True
  cfg = ModelConfig.from_hf(hf)
  assert cfg.qkv_bias and cfg.o_bias
  cfg.to_hf().save_pretrained(str(tmp_path))
  back = tf.AutoConfig.from_pretrained(str(tmp_path))
  assert back.attention_bias is True
  assert ModelConfig.from_hf(back) == cfg


def test_a_fresh_head_on_a_causal_lm_draws_at_its_initializer_range(tmp_path):
  """A causal LM loaded as a critic gets a head drawn at config.json's initializer_range (0.2
  here), not a fixed 0.02, in the parameter dtype of the trunk."""
  tiny_hf.make("llama3", tmp_path)
  critic = pj.models.from_pretrained(tmp_path, kind="value", dtype="bfloat16")
  kernel = critic.head.kernel[...]
  assert kernel.dtype == critic.trunk.embed.embedding[...].dtype == jnp.bfloat16
  assert kernel.shape == (32, 1) and 0.1 < float(jnp.std(kernel.astype(jnp.float32))) < 0.4


def test_a_reward_model_whose_pad_is_an_extra_eos_warns_on_save_and_load(tmp_path):
  """Pad equal to a second EOS id (config.json's eos_token_id a list) is pad == EOS too: said
  when saved (it saved quietly, then warned on load) and when loaded."""
  kw = dict(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16)
  rm = pj.models.RewardModel(
    ModelConfig.gpt2(**kw, eos_token_id=1, extra_eos_token_ids=(3,), pad_token_id=3),
    rngs=nnx.Rngs(0),
  )
  with pytest.warns(UserWarning, match="pad and EOS share id 3"):
    pj.models.save_pretrained(rm, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == [1, 3]
  with pytest.warns(UserWarning, match="pad and EOS share id 3"):
    pj.models.from_pretrained(tmp_path)


def test_options_ppo_jax_does_not_model_are_refused():
  """Each would load as a model that computes otherwise than transformers does, so is said."""
  full = {"rope_type": "default", "rope_theta": 10000.0}
  cases = [
    (tf.GPT2Config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    (tf.GPT2Config(scale_attn_weights=False), "scale_attn_weights=False"),
    (
      tf.Gemma3TextConfig(use_bidirectional_attention=True),
      "gemma3_text option use_bidirectional_attention=True",
    ),
    (
      tf.LlamaConfig(rope_parameters={**full, "partial_rotary_factor": 0.5}),
      "partial_rotary_factor != 1",
    ),
    (
      tf.Gemma3TextConfig(
        rope_parameters={
          "full_attention": full,
          "sliding_attention": {"rope_type": "linear", "rope_theta": 100.0, "factor": 2.0},
        }
      ),
      "rope_type 'linear' on gemma3_text's windowed layers",
    ),
  ]
  for hf, match in cases:
    with pytest.raises(ValueError, match=match):
      ModelConfig.from_hf(hf)
