"""Special tokens already written in the data's text (BOS, EOS) are kept once, a response's leading
space reads as in the whole text, and prompts ending in a space the tokenizer keeps are said
(ppo_jax/token_edges.py through ppo_jax/data.py)."""

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
from tokenizers import (
  Tokenizer,
  decoders,
  models,
  normalizers,
  pre_tokenizers,
  processors,
  trainers,
)
from transformers import PreTrainedTokenizerFast

from ppo_jax import data
from ppo_jax.tokenizer import build_word_tokenizer

WORDS = ["good", "film", "bad", "plot"]  # ids 4..7 after <pad> <eos> <bos> <unk>
LAYOUT = data.Layout(prompt_len=4, response_len=3, pad_id=0, eos_id=1)


def _bos_first():
  tok = build_word_tokenizer(WORDS)
  tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
    single="<bos> $A", special_tokens=[("<bos>", 2)]
  )
  return tok


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_a_prompt_written_with_its_bos_gets_no_second_one(tmp_path, capsys):
  path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "<bos> good film"}, {"prompt": "good film"}])
  texts, ids, mask = data.load_prompts(path, _bos_first(), LAYOUT)
  np.testing.assert_array_equal(ids, [[0, 2, 4, 5], [0, 2, 4, 5]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 1, 1, 1]])
  assert texts == ["<bos> good film", "good film"]  # what reward functions read: as written
  assert capsys.readouterr().out == (
    f"{path}: 1 of 2 prompts begin with <bos> in their text, which the tokenizer adds itself: "
    "it is kept once\n"
  )
  # A tokenizer that adds no BOS keeps the text's (the only one) and says nothing.
  ids, _ = data.encode_prompts(build_word_tokenizer(WORDS), ["<bos> good film"], LAYOUT)
  np.testing.assert_array_equal(ids, [[0, 2, 4, 5]])
  assert capsys.readouterr().out == ""


def test_a_response_written_with_its_eos_gets_no_second_one(tmp_path, capsys):
  tok = build_word_tokenizer(WORDS)
  path = _jsonl(
    tmp_path / "sft.jsonl",
    [{"prompt": "good", "response": "bad plot <eos>"}, {"prompt": "good", "response": "bad plot"}],
  )
  seqs = data.load_sft(path, tok, LAYOUT)
  np.testing.assert_array_equal(seqs.ids[:, 4:], [[6, 7, 1], [6, 7, 1]])  # not cut: [6, 7, 1, 1]
  assert seqs.truncated == 0 and seqs.response_mask.sum() == 6
  assert capsys.readouterr().out == (
    f"{path}: 1 of 2 responses end with <eos> in their text, the EOS ppo_jax appends: it is "
    "kept once\n"
  )
  # Preference pairs: one note for both sides; the pair's sides as if written without it.
  pairs = _jsonl(
    tmp_path / "pairs.jsonl",
    [
      {"prompt": "good", "chosen": "film <eos>", "rejected": "bad <eos>"},
      {"prompt": "bad", "chosen": "plot", "rejected": "film"},
    ],
  )
  chosen, rejected = data.load_preferences(pairs, tok, LAYOUT, fit=True)
  np.testing.assert_array_equal(chosen.ids[:, -2:], [[5, 1], [7, 1]])  # fit: 1 word + EOS
  np.testing.assert_array_equal(rejected.ids[:, -2:], [[6, 1], [5, 1]])
  assert capsys.readouterr().out == (
    f"{pairs}: 2 of 4 responses end with <eos> in their text, the EOS ppo_jax appends: it is "
    "kept once\n"
  )


def _with_turn_end(end="<end>"):
  """The word tokenizer with a chat template whose turns end with ``end``, and ``<end>`` a special
  token (as Gemma's ``<end_of_turn>``)."""
  tok = build_word_tokenizer([*WORDS, "<user>", "<bot>", "<end>"])
  tok.add_special_tokens({"additional_special_tokens": ["<end>"]})
  tok.chat_template = (
    "{% for m in messages %}<{{ 'bot' if m.role == 'assistant' else m.role }}> {{ m.content }} "
    f"{end} {{% endfor %}}{{% if add_generation_prompt %}}<bot>{{% endif %}}"
  )
  return tok


def test_a_response_ending_in_the_eos_gets_the_turn_end_in_its_place(capsys):
  """``with_eos`` with a turn end of its own: a response already ending with the tokenizer's EOS
  (data written for another library) or the turn end ends with one turn end, not the EOS and a
  turn end after it; the others get it appended. Said once, naming both."""
  from ppo_jax.token_edges import with_eos

  tok = _with_turn_end()
  end = tok.convert_tokens_to_ids("<end>")
  good, bad = tok.convert_tokens_to_ids(["good", "bad"])
  assert tok.eos_token_id == 1 and end not in (1, good, bad)
  got = with_eos([[good, 1], [good, bad, end], [bad], [], [1, good]], end, tok, "r.jsonl")
  assert got == [[good, end], [good, bad, end], [bad, end], [end], [1, good, end]]
  assert capsys.readouterr().out == (
    "r.jsonl: 2 of 5 responses end with <eos> or <end> in their text, the end ppo_jax appends "
    "(<end>): it is kept once\n"
  )


def test_a_template_that_ends_turns_with_the_eos_has_no_turn_end_of_its_own():
  """``turn_end_id`` is the special token after an assistant turn only where it is not the EOS
  (responses end with the EOS then, as without the template): None, and no note; the same
  template ending turns with ``<end>`` names it."""
  from ppo_jax.compat import turn_end_note
  from ppo_jax.token_edges import turn_end_id

  tok = _with_turn_end("<end>")
  assert turn_end_id(tok) == tok.convert_tokens_to_ids("<end>")
  assert turn_end_note(tok) is not None
  tok = _with_turn_end("<eos>")
  assert tok.apply_chat_template(
    [{"role": "user", "content": "good"}, {"role": "assistant", "content": "bad"}], tokenize=False
  ).endswith("bad <eos> ")
  assert turn_end_id(tok) is None
  assert turn_end_note(tok) is None


def _trained(pre_tokenizer, decoder, *, legacy_sentencepiece=False):
  """A tiny BPE tokenizer trained here (no download) with a GPT-2-like or Llama-like split;
  ``legacy_sentencepiece``: Llama 2's and Mistral's tokenizer.json form, a normalizer that puts
  ``▁`` before the text and for each space (no pre-tokenizer once trained)."""
  core = Tokenizer(models.BPE(unk_token="<unk>"))
  core.pre_tokenizer, core.decoder = pre_tokenizer, decoder
  if legacy_sentencepiece:
    core.normalizer = normalizers.Sequence(
      [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=["<pad>", "<eos>", "<unk>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    if isinstance(pre_tokenizer, pre_tokenizers.ByteLevel)
    else list("abcdefghijklmnopqrstuvwxyz:▁\n"),
  )
  # A newline in the alphabet but in no merge (Llama 2 writes it as a byte token of its own).
  core.train_from_iterator(["the answer is paris", "question : what is the capital"] * 20, trainer)
  if legacy_sentencepiece:
    core.pre_tokenizer = None
  return PreTrainedTokenizerFast(
    tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
  )


BYTE_LEVEL = (pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())
METASPACE = (pre_tokenizers.Metaspace(prepend_scheme="first"), decoders.Metaspace())


def test_a_response_that_continues_its_prompts_text_reads_as_in_the_whole_text(capsys):
  """HH-RLHF's responses begin with a space (``Assistant:`` `` I think``), others with a newline:
  tokenized apart, as in the whole text, whatever the tokenizer. Llama 2's legacy form made a
  lone ``▁`` token of the space; both SentencePiece forms put one before the newline."""
  layout = data.Layout(prompt_len=32, response_len=8, pad_id=0, eos_id=1)
  prompt = "question :"
  for tok, legacy, notes in (
    (_trained(*BYTE_LEVEL), False, 0),
    (_trained(*METASPACE), False, 1),  # its ▁ before the newline too
    (_trained(*METASPACE, legacy_sentencepiece=True), True, 2),
  ):
    alone = tok(prompt, add_special_tokens=False)["input_ids"]
    for response in (" the answer", "\nthe answer"):
      whole = tok(prompt + response, add_special_tokens=False)["input_ids"]
      assert whole[: len(alone)] == alone  # the prompt's tokens begin the whole text's
      ids, mask, _ = data.encode_responses(tok, [response], layout, source="r.jsonl")
      assert ids[0, : mask.sum() - 1].tolist() == whole[len(alone) :], (legacy, response)
      if legacy:  # the bug it fixes: a lone ▁ first
        plain = tok(response, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(plain[0]) == "▁" and plain[1:] == whole[len(alone) :]
    said = capsys.readouterr().out.splitlines()
    assert len(said) == notes, said
  assert said == [
    "r.jsonl: 1 of 1 responses begin with a space, which this tokenizer puts before a text "
    "itself: read as their first word's, not a token of its own",
    "r.jsonl: 1 of 1 responses begin with no word (a newline, say): the space this tokenizer "
    "puts before a text is dropped, as in the whole text",
  ]


def test_a_response_of_a_space_then_a_newline_reads_as_in_the_whole_text():
  """`` \nthe answer``: it begins with a space, so the SentencePiece-like tokenizers' ``▁`` before
  a text is the whole text's (the space's own), not one to drop as before a newline."""
  layout = data.Layout(prompt_len=32, response_len=8, pad_id=0, eos_id=1)
  prompt, response = "question :", " \nthe answer"
  for tok in (_trained(*METASPACE), _trained(*METASPACE, legacy_sentencepiece=True)):
    alone = tok(prompt, add_special_tokens=False)["input_ids"]
    whole = tok(prompt + response, add_special_tokens=False)["input_ids"]
    assert whole[: len(alone)] == alone
    with redirect_stdout(io.StringIO()):
      ids, mask, _ = data.encode_responses(tok, [response], layout, source="r.jsonl")
    assert ids[0, : mask.sum() - 1].tolist() == whole[len(alone) :]


@pytest.mark.parametrize(
  "pre_tokenizer, decoder, space",
  [(*BYTE_LEVEL, "Ġ"), (*METASPACE, "▁")],
  ids=["byte_level", "sentencepiece_like"],
)
def test_a_prompt_ending_in_a_space_the_tokenizer_keeps_is_said(pre_tokenizer, decoder, space):
  tok = _trained(pre_tokenizer, decoder)
  layout = data.Layout(prompt_len=32, response_len=4, pad_id=0, eos_id=1)
  prompts = ["question : the answer is ", "question : the answer is", "   "]
  with_space, without, _ = tok(prompts, add_special_tokens=True)["input_ids"]
  assert with_space[-1] == tok.convert_tokens_to_ids(space) and with_space[:-1] == without
  with redirect_stdout(io.StringIO()) as out:
    ids, _ = data.encode_prompts(tok, prompts, layout, source="p.jsonl")
  assert out.getvalue() == (
    f"p.jsonl: 1 of 3 prompts end in a space, a token of its own ({space!r}): the response's "
    "first word then follows it, unlike in the whole text (where the word carries its space); "
    "strip it unless meant\n"
  )
  assert ids[0, -1] == tok.convert_tokens_to_ids(space)  # said, not changed
  # Whitespace-split words (the embedded task's tokenizer) lose the space: nothing to say.
  with redirect_stdout(io.StringIO()) as out:
    data.encode_prompts(build_word_tokenizer(WORDS), ["good film "], LAYOUT)
  assert out.getvalue() == ""


def test_a_chat_policy_stops_at_the_templates_turn_end():
  """With ``data.chat_template``, the policy stops sampling at the turn end its responses are
  trained to end with (``token_edges.turn_end_id``), and lists it among a saved model's EOS ids;
  without the template, at EOS alone."""
  from conftest import smoke_config

  from ppo_jax.config import Settings
  from ppo_jax.stages import init_policy

  tok = build_word_tokenizer([*WORDS, "<user>", "<bot>", "<end>"])
  tok.chat_template = (
    "{% for m in messages %}<{{ 'bot' if m.role == 'assistant' else m.role }}> {{ m.content }} "
    "<end> {% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"
  )
  tok.add_special_tokens({"additional_special_tokens": ["<end>"]})
  end = tok.convert_tokens_to_ids("<end>")
  for chat, stops in ((True, (1, end)), (False, (1,))):
    s = Settings.from_config(
      smoke_config(
        task__name="files",
        data__prompts="p.jsonl",
        data__preferences="pairs.jsonl",
        model__tokenizer="tok",
        data__chat_template=chat,
      )
    )
    assert init_policy(s, tok, 32).cfg.stop_ids == stops
