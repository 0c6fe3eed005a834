"""ppo-jax sample (ppo_jax.inference): greedy responses and reward-model scores equal
transformers', a reward function's scores and the best-of-n summary recomputed from the written
rows, one output per seed, and bad input named in one line."""

import copy
import json
import shutil
import signal

import numpy as np
import pytest
import tiny_hf
import torch

from ppo_jax import file_batches, inference, sampler_settings
from ppo_jax.main import cli
from ppo_jax.rewards import RewardError
from ppo_jax.tokenizer import build_word_tokenizer, load_tokenizer

WORDS = [f"w{i}" for i in range(tiny_hf.VOCAB - 8)]
PROMPTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9", "w10 w11", "w3 w3 w3 w3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """(policy folder, reward-model folder, prompts file, torch policy, torch reward model)."""
  root = tmp_path_factory.mktemp("sample")
  tok = build_word_tokenizer(WORDS)
  policy = tiny_hf.make("gpt2", root / "policy", seed=3)
  rm = tiny_hf.make("gpt2", root / "rm", seed=4, kind="sequence_cls")
  # The tokenizer's EOS: a word the policy says greedily after the third prompt, so that
  # responses stop at it as well as at config.json's EOS.
  ids = torch.tensor([tok(PROMPTS[2])["input_ids"]])
  with torch.no_grad():
    for _ in range(4):
      ids = torch.cat([ids, policy(ids).logits[:, -1:].argmax(-1)], 1)
  said = [
    t for t in ids[0, -4:].tolist() if t != tiny_hf.EOS and tok.convert_ids_to_tokens(t) in WORDS
  ]
  tok.eos_token = tok.convert_ids_to_tokens(said[0])
  for folder in ("policy", "rm"):
    tok.save_pretrained(str(root / folder))
  prompts = root / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  return root / "policy", root / "rm", prompts, policy, rm


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_responses_and_scores_equal_transformers(folders, tmp_path):
  """Each prompt alone, unpadded, through torch: greedy tokens up to the first stop id, and the
  reward model's score at the last token; here in batches of 2 (the last one padded)."""
  policy_dir, rm_dir, prompts, policy, rm = folders
  out = tmp_path / "greedy.jsonl"
  summary = inference.sample_file(
    policy_dir, prompts, out, greedy=True, max_new_tokens=6, reward_model=rm_dir, batch_size=2
  )
  rows = _rows(out)
  tok = load_tokenizer(policy_dir)
  stops = [tok.eos_token_id, tiny_hf.EOS]  # the tokenizer's, then the checkpoint's config.json
  assert [(r["index"], r["sample"], r["prompt"]) for r in rows] == [
    (i, 0, p) for i, p in enumerate(PROMPTS)
  ]
  for row, text in zip(rows, PROMPTS, strict=True):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
      full = policy.generate(
        ids, do_sample=False, max_new_tokens=6, eos_token_id=stops, pad_token_id=tiny_hf.PAD
      )[0]
      new = full[ids.shape[1] :].tolist()
      length = next((k + 1 for k, t in enumerate(new) if t in stops), len(new))
      scored = torch.tensor([ids[0].tolist() + new[:length]])
      want = rm.score(rm.transformer(scored).last_hidden_state)[0, -1, 0].item()
    assert row["response"] == tok.decode(new[:length], skip_special_tokens=True)
    assert (row["tokens"], row["stopped"]) == (length, new[length - 1] in stops)
    np.testing.assert_allclose(row["score"], want, rtol=1e-4, atol=1e-4)
  assert rows[2]["stopped"] and rows[2]["tokens"] < 6  # at the tokenizer's EOS
  scores = np.array([r["score"] for r in rows], np.float64)
  assert summary["score_mean"] == pytest.approx(scores.mean())
  assert summary["mean_tokens"] == pytest.approx(np.mean([r["tokens"] for r in rows]))
  assert "best_of_1" not in summary


def test_kl_to_a_reference_equals_transformers(folders, tmp_path):
  """--ref-model: each greedy response's Σₜ log π(yₜ) − log π_ref(yₜ) (EOS included), against
  both models in torch float64 on the unpadded sequence; the mean in the summary; the model as
  its own reference: 0."""
  policy_dir, _, prompts, policy, _ = folders
  reference = tiny_hf.make("gpt2", tmp_path / "ref", seed=5)
  out = tmp_path / "kl.jsonl"
  summary = inference.sample_file(
    policy_dir, prompts, out, greedy=True, max_new_tokens=6, ref_model=tmp_path / "ref",
    batch_size=2,
  )  # fmt: skip
  rows, tok = _rows(out), load_tokenizer(policy_dir)
  stops = [tok.eos_token_id, tiny_hf.EOS]
  for row, text in zip(rows, PROMPTS, strict=True):
    ids = tok(text)["input_ids"]
    with torch.no_grad():
      full = policy.generate(
        torch.tensor([ids]), do_sample=False, max_new_tokens=6, eos_token_id=stops,
        pad_token_id=tiny_hf.PAD,
      )[0, len(ids) :].tolist()  # fmt: skip
      new = full[: next((k + 1 for k, t in enumerate(full) if t in stops), len(full))]
      seq = torch.tensor([ids + new])
      logp = [
        torch.log_softmax(m(seq).logits[0, len(ids) - 1 : -1], -1)[range(len(new)), new]
        for m in (copy.deepcopy(policy).double(), reference.double())  # the fixture's stays fp32
      ]
    assert row["tokens"] == len(new)
    np.testing.assert_allclose(row["kl"], float((logp[0] - logp[1]).sum()), rtol=1e-4, atol=1e-4)
  assert summary["kl_mean"] == pytest.approx(np.mean([r["kl"] for r in rows]))
  assert abs(summary["kl_mean"]) > 0.1  # two different models: the test has teeth
  itself = inference.sample_file(  # sampled at τ 0.7: the reference is scored at it too
    policy_dir, prompts, tmp_path / "self.jsonl", max_new_tokens=6, ref_model=policy_dir, seed=3,
    temperature=0.7,
  )  # fmt: skip
  assert abs(itself["kl_mean"]) < 1e-4


def test_best_of_n_and_a_reward_function(folders, tmp_path):
  policy_dir, _, prompts, _, _ = folders
  kw = dict(n=3, max_new_tokens=5, reward_fn="reward_fns:words_minus_prompt", batch_size=4)
  summary = inference.sample_file(policy_dir, prompts, tmp_path / "a.jsonl", seed=7, **kw)
  rows = _rows(tmp_path / "a.jsonl")
  assert [(r["index"], r["sample"]) for r in rows] == [(i, j) for i in range(5) for j in range(3)]
  for r in rows:
    assert r["score"] == pytest.approx(len(r["response"].split()) - 0.1 * len(r["prompt"].split()))
  best = np.mean([max(r["score"] for r in rows if r["index"] == i) for i in range(5)])
  assert summary["best_of_3"] == pytest.approx(best)
  assert summary["best_of_3"] > summary["score_mean"]  # not a tie here: the test has teeth
  assert len({r["response"] for r in rows if r["index"] == 2}) > 1  # samples, not one greedy
  # The same seed writes the same file; another seed other responses.
  inference.sample_file(policy_dir, prompts, tmp_path / "b.jsonl", seed=7, **kw)
  assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
  inference.sample_file(policy_dir, prompts, tmp_path / "c.jsonl", seed=8, **kw)
  assert _rows(tmp_path / "c.jsonl") != rows
  # Each response has its own key: other batch sizes (other batches, other places in them, other
  # widths) sample the same responses.
  for batch_size in (1, 8):
    kw["batch_size"] = batch_size
    out = tmp_path / f"e{batch_size}.jsonl"
    inference.sample_file(policy_dir, prompts, out, seed=7, **kw)
    assert [r["response"] for r in _rows(out)] == [r["response"] for r in rows]
  kw["batch_size"] = 4
  # The rows' other fields reach the function, each with its own prompt (reward_fns.keyed).
  keyed = tmp_path / "keyed.jsonl"
  keyed.write_text("".join(json.dumps({"prompt": p, "key": p}) + "\n" for p in PROMPTS))
  kw["reward_fn"] = "reward_fns:keyed"
  gold = "reward_fns:shortness"
  judged = inference.sample_file(
    policy_dir, keyed, tmp_path / "d.jsonl", seed=7, gold_fn=gold, **kw
  )
  got = _rows(tmp_path / "d.jsonl")
  assert [r["score"] for r in got] == [len(r["response"].split()) for r in rows]
  # A judge of its own: the best of n by the score, read on the judge's scale.
  assert [r["gold"] for r in got] == [-r["score"] for r in got]
  longest = [max(r["score"] for r in got if r["index"] == i) for i in range(5)]
  assert judged["best_of_3_gold"] == pytest.approx(-np.mean(longest))
  assert judged["gold_mean"] == pytest.approx(-judged["score_mean"])
  assert judged["best_of_3_gold"] < judged["gold_mean"]  # the judge disagrees: picks score worse
  # Several functions score their weighted sum; each one's score is in the rows, its mean in the
  # summary.
  kw.update(reward_fn="reward_fns:keyed,reward_fns:words_minus_prompt", reward_weights="0.5,2")
  summed = inference.sample_file(policy_dir, keyed, tmp_path / "sum.jsonl", seed=7, **kw)
  for r in _rows(tmp_path / "sum.jsonl"):
    words, less = len(r["response"].split()), 0.1 * len(r["prompt"].split())
    assert r["score"] == pytest.approx(0.5 * words + 2 * (words - less))
    assert r["scores/keyed"] == words and r["scores/words_minus_prompt"] == pytest.approx(
      words - less
    )
  assert summed["scores/keyed"] == pytest.approx(np.mean([r["score"] for r in got]))
  assert summed["score_mean"] == pytest.approx(
    0.5 * summed["scores/keyed"] + 2 * summed["scores/words_minus_prompt"]
  )
  # A field some rows lack, which a function requires: refused before sampling, as training does.
  lacking = tmp_path / "lacking.jsonl"
  lacking.write_text("".join(json.dumps({"prompt": p, "key": p}) + "\n" for p in PROMPTS[:-1]))
  lacking.write_text(lacking.read_text() + json.dumps({"prompt": PROMPTS[-1]}) + "\n")
  with pytest.raises(
    RewardError, match=r"^--reward-fn reward_fns:keyed takes 'key', a field 1 of the 5 prompt rows"
  ):
    inference.sample_file(policy_dir, lacking, tmp_path / "never.jsonl", seed=7, **kw)
  assert not (tmp_path / "never.jsonl").exists()


def test_the_summary_reads_every_response_to_every_prompt(folders, tmp_path):
  """With n responses a prompt, the summary's fraction stopped, score spread and mean KL are
  those of all the rows written (not of each prompt's first response, nor of the prompts' means)."""
  policy_dir, _, prompts, _, _ = folders
  tiny_hf.make("gpt2", tmp_path / "ref", seed=5)
  out = tmp_path / "s.jsonl"
  summary = inference.sample_file(
    policy_dir, prompts, out, n=4, max_new_tokens=5, batch_size=4, temperature=1.5, seed=1,
    reward_fn="reward_fns:words_minus_prompt", ref_model=tmp_path / "ref", progress=False,
  )  # fmt: skip
  rows = _rows(out)
  column = lambda key: np.array([r[key] for r in rows], np.float64)
  assert len(rows) == 20 and 0 < summary["stopped"] < 1  # some stopped, some did not
  assert summary["stopped"] == pytest.approx(column("stopped").mean())
  assert summary["mean_tokens"] == pytest.approx(column("tokens").mean())
  assert summary["score_std"] == pytest.approx(column("score").std())
  assert summary["kl_mean"] == pytest.approx(column("kl").mean())


def test_a_prompts_responses_do_not_depend_on_the_other_prompts_of_the_file(folders, tmp_path):
  """The j-th response to prompt i samples with a key of the seed, i and j: a file with one more
  prompt at its end (the longest: it is sampled first, ahead of all the others) gives the others
  the same responses."""
  policy_dir, _, prompts, _, _ = folders
  longer = tmp_path / "longer.jsonl"
  longer.write_text(prompts.read_text() + json.dumps({"prompt": "w20 w21 w22 w23 w24 w25"}) + "\n")
  kw = dict(n=2, max_new_tokens=5, batch_size=4, seed=7, progress=False)
  inference.sample_file(policy_dir, prompts, tmp_path / "a.jsonl", **kw)
  inference.sample_file(policy_dir, longer, tmp_path / "b.jsonl", **kw)
  a, b = _rows(tmp_path / "a.jsonl"), _rows(tmp_path / "b.jsonl")
  assert len(b) == len(a) + 2 and len({r["response"] for r in a}) > 2  # sampled, not greedy
  assert [(r["index"], r["response"]) for r in b[: len(a)]] == [
    (r["index"], r["response"]) for r in a
  ]


def test_sampling_settings_default_to_the_checkpoints(tmp_path):
  settings = lambda **kw: sampler_settings.sampling_settings(tmp_path, **kw)
  plain = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "greedy": False, "greedy_from": None}
  assert settings() == plain
  config = tmp_path / "generation_config.json"
  config.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95}))
  assert settings(top_p=0.5) == {**plain, "temperature": 0.6, "top_p": 0.5}
  assert settings(greedy=True) == {**plain, "top_p": 0.95, "greedy": True}
  # The file's greedy (do_sample false, or a temperature of 0) holds until a sampling flag.
  config.write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
  assert settings() == {**plain, "greedy": True, "greedy_from": str(config)}
  assert settings(temperature=0.7) == {**plain, "temperature": 0.7}
  assert settings(top_k=5) == {**plain, "temperature": 0.6, "top_k": 5}
  config.write_text(json.dumps({"temperature": 0}))
  assert settings() == {**plain, "greedy": True, "greedy_from": str(config)}
  with pytest.raises(ValueError, match=r"temperature 0 means greedy decoding: give --temperature"):
    settings(top_k=5)
  for bad, message in (
    ({"top_p": 0.0}, r"json's top_p \(--top-p to override\): 0.0 must be in \(0, 1\]"),
    ({"temperature": "0.7"}, r"json's temperature \(--temperature to override\): '0.7' is not a"),
    ({"temperature": -1}, r"json's temperature \(--temperature to override\): -1 must be ≥ 0"),
  ):
    config.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=message):
      settings()
  with pytest.raises(ValueError, match=r"^--temperature: 0 must be > 0 \(--greedy\)"):
    settings(temperature=0)
  # What transformers' generate would apply and ppo_jax's sampler does not: said, each named.
  config.write_text(
    json.dumps({"do_sample": False, "repetition_penalty": 1.5, "num_beams": 1, "max_length": 9})
  )
  with pytest.warns(UserWarning, match=r"does not apply repetition_penalty=1\.5, max_length=9 \("):
    assert settings()["greedy"]
  with pytest.warns(UserWarning, match=r"does not apply repetition_penalty=1\.5 \("):
    settings(max_new_tokens=4)  # --max-new-tokens: transformers too leaves max_length unread
  import warnings

  config.write_text(json.dumps({"repetition_penalty": 1.0, "max_length": 9, "max_new_tokens": 4}))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # neutral values, and max_new_tokens read before max_length
    settings()


def test_sampling_settings_from_the_file_take_the_samplers_types(tmp_path):
  """generation_config.json's numbers as the sampler takes them whatever the file wrote: a
  ``top_k`` of 40.0 is the integer 40, a ``temperature`` of 1 the float 1.0."""
  config = {"do_sample": True, "temperature": 1, "top_p": 1, "top_k": 40.0}
  (tmp_path / "generation_config.json").write_text(json.dumps(config))
  settings = sampler_settings.sampling_settings(tmp_path)
  plain = {"temperature": 1.0, "top_p": 1.0, "top_k": 40, "greedy": False, "greedy_from": None}
  assert settings == plain
  assert [type(settings[k]) for k in ("temperature", "top_p", "top_k")] == [float, float, int]


def test_bad_input_is_one_line(folders, tmp_path, capsys):
  policy_dir, rm_dir, prompts, _, _ = folders
  base = ["ppo-jax", "sample", f"--prompts={prompts}", "--max-new-tokens=4"]
  other = tmp_path / "other_rm"  # the reward model's weights, another vocabulary
  shutil.copytree(rm_dir, other)
  build_word_tokenizer([f"x{i}" for i in range(50)]).save_pretrained(str(other))
  short = tmp_path / "short_rm"  # 8 learned positions: a 5-token prompt + 4 do not fit
  tiny_hf.make("gpt2", short, kind="sequence_cls", n_positions=8)
  taken = tmp_path / "taken.jsonl"
  taken.write_text("keep me\n")
  chat = tmp_path / "chat.jsonl"
  chat.write_text(json.dumps({"messages": [{"role": "user", "content": "w1"}]}) + "\n")
  capsys.readouterr()  # transformers' progress bar as it saved the short model
  cases = [
    (  # the command's switch, not the config field's data.chat_template=True
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", f"--prompts={chat}"],
      1,
      f"{chat}:1: a conversation (a list of messages) needs --chat-template\n",
    ),
    ([f"--model={policy_dir}", f"--out={taken}"], 1, f"--out {taken} exists; pick another"),
    (
      [f"--model={policy_dir}", f"--out={tmp_path / 'new'}/"],
      1,
      f"--out {tmp_path / 'new'}/ is a folder; give the file to write",
    ),
    (
      [f"--model={policy_dir}", f"--out={taken / 'o.jsonl'}"],
      1,
      f"--out {taken / 'o.jsonl'}: cannot make its folder (",
    ),
    (
      [f"--model={rm_dir}", f"--out={tmp_path / 'o'}"],
      1,
      "rm: holds a sequence-classification model; it has no LM head",
    ),
    (
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", f"--reward-model={policy_dir}"],
      1,
      "is not a reward model (architectures ['GPT2LMHeadModel']; expected a *ForSequence",
    ),
    (
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", "--reward-fn=reward_fns:nothing"],
      1,
      "--reward-fn 'reward_fns:nothing': reward_fns has no function 'nothing'",
    ),
    (
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", "--max-prompt-len=2"],
      1,
      ":1: prompt of 3 tokens is longer than --max-prompt-len=2",
    ),
    (  # no --max-prompt-len: the fix is fewer new tokens
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", "--max-new-tokens=45"],
      1,
      f"{prompts}:3: prompt of 5 tokens is longer than the 3 positions 45 new tokens "
      "(--max-new-tokens) leave of the model's 48 (lower --max-new-tokens, or set "
      "--prompt-overflow=truncate)",
    ),
    ([f"--model={policy_dir}", f"--out={tmp_path / 'o'}", "--n=x"], 2, "argument --n: invalid int"),
    (  # a negative first weight, with a space: read as the value, not as a flag
      [
        f"--model={policy_dir}",
        f"--out={tmp_path / 'o'}",
        "--reward-fn=reward_fns:keyed,reward_fns:shortness",
        "--reward-weights",
        "-1",
      ],
      1,
      "--reward-weights '-1': 1 weight for 2 functions",
    ),
    (  # a flag's value out of range is a flag error, as one that does not parse
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", "--n=0"],
      2,
      "argument --n: must be ≥ 1, got 0",
    ),
    (  # 0 read as "the default", -3 blamed --max-new-tokens
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", "--max-prompt-len=0"],
      2,
      "argument --max-prompt-len: must be ≥ 1, got 0",
    ),
    ([f"--model={tmp_path / 'nope'}", f"--out={tmp_path / 'o'}"], 1, "nope: no such folder"),
    (  # a workdir, which holds the policy in policy/
      [f"--model={policy_dir.parent}", f"--out={tmp_path / 'o'}"],
      1,
      f"--model {policy_dir.parent} is a ppo_jax workdir; its model is {policy_dir}",
    ),
    (  # the same for its tokenizer
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", f"--tokenizer={policy_dir.parent}"],
      1,
      f"--tokenizer {policy_dir.parent}: no tokenizer files; it is a ppo_jax workdir, its "
      f"tokenizer is in {policy_dir}",
    ),
    (
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", f"--reward-model={other}"],
      1,
      "its tokenizer gives other ids to the tokens the texts are encoded with",
    ),
    (
      [
        f"--model={policy_dir}",
        f"--out={tmp_path / 'o'}",
        f"--reward-model={short}",
        "--max-prompt-len=9",
      ],
      1,
      "the longest prompt's 5 tokens + --max-new-tokens 4 = 9 exceeds the reward model's 8 "
      "positions (lower --max-new-tokens or --max-prompt-len)",
    ),
    (
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", "--n=2", "--greedy"],
      1,
      "greedy decoding gives one response per prompt, not --n 2",
    ),
    (
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", "--greedy", "--top-k=0"],
      2,
      "--greedy takes the most likely token: --top-k would not apply",
    ),
    (
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", "--system-prompt=Be brief."],
      2,
      "--system-prompt needs --chat-template (without it prompts are read as plain text)",
    ),
    (
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", "--mesh=1,2"],
      2,
      "argument --mesh: '1,2' is not DATA,FSDP,TENSOR (three integers)",
    ),
    (
      [f"--model={policy_dir}", f"--out={tmp_path / 'o'}", "--mesh=2,-1,1"],
      1,
      "--mesh (2, -1, 1) does not divide the 1 devices",
    ),
  ]
  for args, status, message in cases:
    assert cli([*base, *args]) == status, args
    err = capsys.readouterr().err
    assert err.startswith("ppo-jax sample: error: ") and message in err, err
    assert err.count("\n") == 1
  assert taken.read_text() == "keep me\n" and not (tmp_path / "o").exists()
  assert cli(["ppo-jax", "sample", "--help"]) == 0
  assert "--reward-model" in capsys.readouterr().out


def test_a_failed_sample_keeps_what_it_wrote_beside_the_file_it_would_write(
  folders, tmp_path, capsys, terminal_sigint
):
  """The scorer fails on the second batch: --out is not written (a rerun may write it), the
  first batch's rows are kept in OUT.partial and stderr says so; a rerun refuses to replace them
  until they are moved away. A Ctrl-C whose exception Python discarded stops at the next batch."""
  # Longest prompts first: 5, 4 and 3 tokens (prompts 2, 4, 0), then 2 (w10 w11) and 1 token.
  policy_dir, _, prompts, _, _ = folders
  out = tmp_path / "s.jsonl"
  base = ["ppo-jax", "sample", f"--model={policy_dir}", f"--prompts={prompts}", f"--out={out}"]
  base += ["--max-new-tokens=3", "--batch-size=3"]
  assert cli([*base, "--reward-fn=reward_fns:fails_at_w10"]) == 1
  err = capsys.readouterr().err.splitlines()
  partial = tmp_path / "s.jsonl.partial"
  kept = f"kept the 3 responses written before the stop in {partial} (move it away or delete it "
  kept += f"before writing {out} again)"
  assert err[0] == kept
  assert err[1].startswith("ppo-jax sample: error: ") and "judge crashed" in err[1]
  assert not out.exists() and [r["index"] for r in _rows(partial)] == [2, 4, 0]
  assert cli([*base, "--reward-fn=reward_fns:superlatives"]) == 1
  assert capsys.readouterr().err == (
    f"ppo-jax sample: error: {partial} holds what an interrupted run wrote; move it away (or "
    f"delete it) to write {out}\n"
  )
  assert len(_rows(partial)) == 3
  partial.unlink()
  assert cli([*base, "--reward-fn=reward_fns:superlatives"]) == 0
  assert [r["index"] for r in _rows(out)] == [0, 1, 2, 3, 4] and not partial.exists()
  out.unlink()
  assert cli([*base, "--reward-fn=reward_fns:interrupted_at_w10"]) == 130  # Ctrl-C: no traceback
  err = capsys.readouterr().err.splitlines()
  assert err == [kept, "ppo-jax sample: interrupted by Ctrl-C"]
  assert not out.exists() and len(_rows(partial)) == 3
  partial.unlink()
  # Discarded in the last batch (of w10 and the 1-token prompt): the output is whole, and said.
  assert cli([*base, "--reward-fn=reward_fns:ctrl_c_discarded_at_w10"]) == 130
  err = capsys.readouterr().err.splitlines()
  assert err == ["ppo-jax sample: Ctrl-C came as it finished: its output is whole"]
  assert len(_rows(out)) == 5 and not partial.exists()
  out.unlink()
  # In batches of 2 ([2, 4], [0, w10], [the 1-token prompt]): the stop comes at the third.
  two = [*base[:-1], "--batch-size=2", "--reward-fn=reward_fns:ctrl_c_discarded_at_w10"]
  assert cli(two) == 130
  err = capsys.readouterr().err.splitlines()
  assert err == [kept.replace("the 3", "the 4"), "ppo-jax sample: interrupted by Ctrl-C"]
  assert not out.exists() and len(_rows(partial)) == 4
  partial.unlink()
  assert cli([*base, "--reward-fn=reward_fns:terminated_at_w10"]) == 143  # a scheduler's stop
  err = capsys.readouterr().err.splitlines()
  assert err[-1] == "ppo-jax sample: interrupted by SIGTERM" and len(_rows(partial)) == 3
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  # Started with SIGINT ignored (nohup, a shell's `&`): it stays ignored.
  partial.unlink()
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  assert cli(two) == 0 and len(_rows(out)) == 5
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_empty_prompts_are_sampled_from_nothing(folders, tmp_path):
  """A prompt of no tokens (a file of them alone: batches one padding column wide)."""
  policy_dir = folders[0]
  for name, texts in (("mixed", ["", "w1 w2"]), ("empty", [""])):
    prompts = tmp_path / f"{name}.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    out = tmp_path / f"{name}_out.jsonl"
    args = [f"--model={policy_dir}", f"--prompts={prompts}", f"--out={out}", "--max-new-tokens=3"]
    assert cli(["ppo-jax", "sample", *args, "--seed=1"]) == 0
    rows = _rows(out)
    assert [r["prompt"] for r in rows] == texts and all(1 <= r["tokens"] <= 3 for r in rows)


def test_the_default_response_length_fits_the_model(tmp_path, capsys):
  """Without --max-new-tokens: the checkpoint's generation_config.json max_new_tokens, else 64,
  or half the positions when the model has fewer than 128 (the default run's 32: 16)."""
  model = tmp_path / "short"
  tiny_hf.make("gpt2", model, n_positions=20)
  build_word_tokenizer(WORDS).save_pretrained(str(model))
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"prompt": "w1 w2"}) + "\n")
  base = ["ppo-jax", "sample", f"--model={model}", f"--prompts={prompts}", "--greedy"]
  assert cli([*base, f"--out={tmp_path / 'a.jsonl'}"]) == 0
  out = capsys.readouterr().out
  assert "sampling 1 prompt × 1 from" in out and "(1 response of at most 10 tokens" in out
  (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3}))
  assert cli([*base, f"--out={tmp_path / 'b.jsonl'}"]) == 0
  assert "1 response of at most 3 tokens" in capsys.readouterr().out
  assert _rows(tmp_path / "b.jsonl")[0]["tokens"] <= 3


def test_rm_eval_scores_equal_transformers(folders, tmp_path, capsys):
  """ppo-jax rm-eval: each side of each pair (prompt, response, EOS: reward-model training's
  encoding; a response over --max-response-len cut there) scored by torch at its last token,
  and the summary's Bradley–Terry metrics from those scores in float64."""
  from ppo_jax import rm_eval

  HH = "\n\nHuman: w1 w1\n\nAssistant:"
  _, rm_dir, _, _, rm = folders
  pairs = [
    {"prompt": "w1 w2", "chosen": "w3", "rejected": "w4 w5"},
    {"prompt": "w6", "chosen": "w7 w8 w9 w10 w11 w12", "rejected": "w13"},  # cut at 4
    {"chosen": f"{HH} w2 w3", "rejected": f"{HH} w4"},  # HH-RLHF's form
    {"prompt": "w9", "chosen": "w2", "rejected": "w2"},  # a tie
  ]
  split = [("w1 w2", "w3", "w4 w5"), ("w6", "w7 w8 w9 w10 w11 w12", "w13")]
  split += [(HH, " w2 w3", " w4"), ("w9", "w2", "w2")]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
  out = tmp_path / "scores.jsonl"
  args = ["ppo-jax", "rm-eval", f"--reward-model={rm_dir}", f"--pairs={path}", f"--out={out}"]
  assert cli([*args, "--max-response-len=4", "--batch-size=2"]) == 0
  printed = capsys.readouterr().out
  tok = load_tokenizer(rm_dir)

  def torch_score(prompt, response):
    eos = tok.eos_token_id
    ids = (
      tok(prompt)["input_ids"] + [*tok(response, add_special_tokens=False)["input_ids"], eos][:4]
    )
    with torch.no_grad():
      x = torch.tensor([ids])
      return rm.score(rm.transformer(x).last_hidden_state)[0, -1, 0].item()

  want = np.array([[torch_score(p, c), torch_score(p, r)] for p, c, r in split], np.float64)
  got = np.array([[r["chosen"], r["rejected"]] for r in _rows(out)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert _rows(out)[3]["margin"] == 0.0  # the two sides of a tie score alike
  margin = got[:, 0] - got[:, 1]  # float32 scores, as the summary reads them
  summary = rm_eval.evaluate_pairs(rm_dir, path, max_response_len=4, progress=False)
  assert summary["accuracy"] == pytest.approx(np.mean(margin > 0))
  assert summary["margin"] == pytest.approx(margin.mean(), abs=1e-5)
  assert summary["loss"] == pytest.approx(np.mean(np.log1p(np.exp(-margin))), abs=1e-5)
  assert (summary["pairs"], summary["ties"], summary["cut"]) == (4, 1, 1)
  assert f"4 pairs: accuracy {summary['accuracy']:.4f}" in printed and "1 responses cut" in printed
  assert cli(args) == 1  # --out exists
  assert "scores.jsonl exists; pick another file" in capsys.readouterr().err

  # A reward model whose run read prompts in a chat template with a system turn: rm-eval reads
  # them so unless told --no-chat-template (the run's system prompt dropped with it); a system
  # prompt alone takes the run's template.
  chat_dir = tmp_path / "rm_chat"
  shutil.copytree(rm_dir, chat_dir)
  tok.chat_template = (
    "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}w30 {% endif %}"
  )
  tok.save_pretrained(str(chat_dir))
  record = {"config": {"data": {"chat_template": True, "system_prompt": "w20"}}}
  (chat_dir / "ppo_jax_stage.json").write_text(json.dumps(record))
  plain = summary["loss"]
  chat_args = [*args[:2], f"--reward-model={chat_dir}", f"--pairs={path}", "--max-response-len=4"]
  run_chat = rm_eval.evaluate_pairs(chat_dir, path, max_response_len=4, progress=False)
  assert run_chat["loss"] != pytest.approx(plain, abs=1e-4)  # the template changes the inputs
  assert cli([*chat_args, "--no-chat-template"]) == 0
  assert "as the run that trained it" not in capsys.readouterr().out
  no_chat = rm_eval.evaluate_pairs(chat_dir, path, max_response_len=4, chat_template=False)
  assert no_chat["loss"] == pytest.approx(plain, abs=1e-6)
  other = rm_eval.evaluate_pairs(chat_dir, path, max_response_len=4, system_prompt="w21")
  assert other["loss"] != pytest.approx(run_chat["loss"], abs=1e-4)  # its own system turn
  assert cli([*chat_args, "--no-chat-template", "--system-prompt=w21"]) == 2
  assert "--system-prompt needs --chat-template" in capsys.readouterr().err
  assert cli([*args[:2], f"--reward-model={rm_dir}", f"--pairs={path}", "--system-prompt=w2"]) == 1
  assert "--system-prompt needs --chat-template (neither given nor the run's" in (
    capsys.readouterr().err
  )
  # A run that cut long prompts: rm-eval cuts them too, unless told --prompt-overflow=error.
  record = {"config": {"data": {"max_prompt_len": 1, "prompt_overflow": "truncate"}}}
  (chat_dir / "ppo_jax_stage.json").write_text(json.dumps(record))
  rm_eval.evaluate_pairs(chat_dir, path, max_response_len=4, chat_template=False, progress=False)
  assert cli([*chat_args, "--no-chat-template", "--prompt-overflow=error"]) == 1
  assert "prompt of 2 tokens is longer than --max-prompt-len=1" in capsys.readouterr().err


def test_rm_eval_reads_each_pairs_margin_and_counts_every_cut_response(folders, tmp_path):
  """rm-eval --out: each row's margin is its chosen score less its rejected one; the summary's
  loss takes the file's ``margin`` fields as training does (−log σ(s_c − s_r − m), Llama 2's),
  and a rejected response cut at --max-response-len counts in ``cut`` as a chosen one does."""
  from ppo_jax import rm_eval

  rm_dir = folders[1]
  pairs = [  # the first rejected response is cut at 4 tokens
    {"prompt": "w1", "chosen": "w2 w3", "rejected": "w4 w5 w6 w7 w8 w9", "margin": 1.5},
    {"prompt": "w6", "chosen": "w7", "rejected": "w8", "margin": 0.0},
    {"prompt": "w9 w10", "chosen": "w11", "rejected": "w12 w13", "margin": -2.0},
  ]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
  out = tmp_path / "scores.jsonl"
  summary = rm_eval.evaluate_pairs(rm_dir, path, out=out, max_response_len=4, progress=False)
  scored = _rows(out)
  diff = np.array([r["chosen"] - r["rejected"] for r in scored])
  assert [r["margin"] for r in scored] == pytest.approx(diff) and np.all(np.abs(diff) > 1e-3)
  want = np.mean(np.log1p(np.exp(-(diff - [r["margin"] for r in pairs]))))
  assert summary["loss"] == pytest.approx(want, abs=1e-5)
  assert abs(summary["loss"] - np.mean(np.log1p(np.exp(-diff)))) > 1e-2  # the margins count
  assert (summary["pairs"], summary["cut"]) == (3, 1)


def test_batches_are_cut_to_their_longest_prompt(folders, tmp_path, monkeypatch):
  """Rows go longest prompt first, and a batch of short prompts is not padded to the file's
  longest: it is cut to 16 columns (its longest rounded up to a power of two); the samples and
  scores are those of all prompts in one batch, at the longest's width, and the file is in
  prompt order. rm-eval alike."""
  from ppo_jax import rm_eval

  policy_dir, rm_dir, _, _, _ = folders
  long = " ".join(f"w{i}" for i in range(20, 45))  # 25 tokens
  texts = ["w1 w2", long, "w3", "w4 w5 w6", "w7"]
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
  widths, generate = [], inference.generate

  def spy(model, ids, mask, **kw):
    widths.append(ids.shape[1])
    return generate(model, ids, mask, **kw)

  monkeypatch.setattr(inference, "generate", spy)
  kw = dict(n=2, max_new_tokens=5, reward_model=rm_dir, seed=3, progress=False)
  inference.sample_file(policy_dir, path, tmp_path / "a.jsonl", batch_size=4, **kw)
  assert widths == [25, 16, 16]  # (long, long, w4…, w4…), (w1 w2, w1 w2, w3, w3), (w7, w7)
  a = _rows(tmp_path / "a.jsonl")
  assert [(r["index"], r["sample"]) for r in a] == [(i, k) for i in range(5) for k in range(2)]
  assert [r["prompt"] for r in a[::2]] == texts and len({r["response"] for r in a}) > 2
  # Other batches sample with other keys: compare each row's greedy continuation instead.
  kw["n"] = 1
  for name, batch_size in (("c", 3), ("d", 5)):
    inference.sample_file(
      policy_dir, path, tmp_path / f"{name}.jsonl", batch_size=batch_size, greedy=True, **kw
    )
  assert widths[3:] == [25, 16] + [25]  # (long, w4…, w1 w2), (w3, w7); all five
  c, d = _rows(tmp_path / "c.jsonl"), _rows(tmp_path / "d.jsonl")
  assert [r["response"] for r in c] == [r["response"] for r in d]
  np.testing.assert_allclose([r["score"] for r in c], [r["score"] for r in d], rtol=1e-5, atol=1e-5)

  pairs = tmp_path / "pairs.jsonl"
  rows = [{"prompt": t, "chosen": "w2 w3", "rejected": "w4"} for t in texts]
  pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
  seen, scorer = [], rm_eval.rm_scorer

  def spy_scorer(rm, mesh):
    score = scorer(rm, mesh)
    return lambda ids, mask: seen.append(ids.shape) or score(ids, mask)

  monkeypatch.setattr(rm_eval, "rm_scorer", spy_scorer)
  for name, batch_size in (("e", 2), ("f", 5)):
    rm_eval.evaluate_pairs(
      rm_dir,
      pairs,
      out=tmp_path / f"{name}.jsonl",
      batch_size=batch_size,
      max_response_len=4,
      progress=False,
    )
  # [prompt | response] columns: 25 + 3 for the long prompt's batch, 16 + 3 for the others.
  assert seen == [(4, 28), (4, 19), (4, 19), (10, 28)]
  e, f = _rows(tmp_path / "e.jsonl"), _rows(tmp_path / "f.jsonl")
  assert [r["index"] for r in e] == list(range(5))  # in file order, whatever the batches
  for side in ("chosen", "rejected"):
    np.testing.assert_allclose([r[side] for r in e], [r[side] for r in f], rtol=1e-5, atol=1e-5)


def test_with_the_chat_template_sampling_stops_at_its_turn_end(folders, tmp_path, capsys):
  """A template that ends a turn with a special token of its own (Gemma's <end_of_turn>):
  responses stop there, as the run's SFT trained them to end (``token_edges.turn_end_id``),
  also for a checkpoint whose config.json does not list it."""
  # The same template twice: w30 a plain word (no turn end), then the turn's special end token.
  plain_dir, policy_dir = tmp_path / "plain", tmp_path / "policy"
  for folder in (plain_dir, policy_dir):
    shutil.copytree(folders[0], folder)
    tok = load_tokenizer(folder)
    tok.chat_template = (
      "{% for m in messages %}{{ m.content }} w30 {% endfor %}{% if add_generation_prompt %}w31 "
      "{% endif %}"
    )
    if folder == policy_dir:
      tok.add_special_tokens({"additional_special_tokens": ["w30"]})  # the turn's end
    tok.save_pretrained(str(folder))
  end = tok.convert_tokens_to_ids("w30")
  # Hot sampling, 32 responses a prompt: w30 comes up (the same prompt tokens and keys, so the
  # same draws in both runs until one stops).
  kw = dict(n=32, max_new_tokens=3, temperature=2.0, batch_size=160, chat_template=True)
  for folder in (plain_dir, policy_dir):
    inference.sample_file(folder, folders[2], tmp_path / f"{folder.name}.jsonl", **kw)
    out = capsys.readouterr().out
  assert f"stop ids {[tok.eos_token_id, tiny_hf.EOS, end]})" in out
  cut = 0
  for a, b in zip(_rows(tmp_path / "plain.jsonl"), _rows(tmp_path / "policy.jsonl"), strict=True):
    words = a["response"].split()[: a["tokens"]]
    if "w30" in words:  # the plain run went on past it; the turn-end run stopped there
      assert (b["tokens"], b["stopped"]) == (words.index("w30") + 1, True), (a, b)
      cut += 1
    else:
      same = ("tokens", "stopped", "response")
      assert [b[k] for k in same] == [a[k] for k in same]
  assert cut > 0


def test_a_batch_is_as_wide_as_its_longest_row_rounded_up_to_a_power_of_two():
  widths = [file_batches.trimmed([1, n], 64) for n in (0, 3, 16, 17, 32, 33, 64)]
  assert widths == [16, 16, 16, 32, 32, 64, 64]
  assert file_batches.trimmed([33], 40) == 40 and file_batches.trimmed([3], 8, floor=1) == 4


def test_a_stop_before_any_row_is_written_leaves_no_partial_file(tmp_path):
  out = file_batches.output_file(tmp_path / "s.jsonl")
  with pytest.raises(RuntimeError), file_batches.written_when_done(out, "responses"):
    raise RuntimeError("judge crashed")
  assert list(tmp_path.iterdir()) == []
  assert file_batches.output_file(out) == out  # a rerun may write it


def test_progress_is_said_once_every_row_is_done():
  said = []
  tick = file_batches.ticker(lambda line, flush: said.append(line), 5, "responses")
  tick(2)
  tick(5)
  assert len(said) == 1 and said[0].startswith("  5/5 responses, ")
