"""Tokenizers from local folders: the special tokens the pipeline relies on."""

import json

import pytest

from ppo_jax.tokenizer import build_word_tokenizer, load_tokenizer, same_ids


def _saved(tmp_path, **special):
  tok = build_word_tokenizer(["good", "film"])
  for name, value in special.items():
    setattr(tok, name, value)
  tok.save_pretrained(tmp_path)
  return tmp_path


def test_word_tokenizer_round_trips_through_a_folder(tmp_path):
  tok = load_tokenizer(_saved(tmp_path))
  assert tok.padding_side == "left"
  assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
  assert tok("good film mystery")["input_ids"] == [4, 5, 3]  # unknown word → <unk>
  assert tok.decode([4, 5]) == "good film"


def test_word_tokenizer_ids_follow_the_special_tokens_once_per_word():
  """Ids 0–3 are <pad>, <eos>, <bos>, <unk>; each word then gets the next id, a repeated word
  none (no two words share one)."""
  tok = build_word_tokenizer(["good", "film", "good", "bad"])
  assert tok.get_vocab() == {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "good": 4, "film": 5, "bad": 6,
  }  # fmt: skip
  assert len(tok) == 7
  assert tok("bad good film")["input_ids"] == [6, 4, 5]
  assert tok.decode([6, 4, 5]) == "bad good film"


@pytest.mark.parametrize("word", ["", "two words", "##dull"])
def test_word_tokenizer_refuses_words_it_cannot_decode(word):
  """A word with whitespace would never be one token; one starting with '##' decoded glued to
  the word before ('the ##dull film' → 'thedull film')."""
  with pytest.raises(ValueError, match=r"^word .* (is empty|starts with '##')"):
    build_word_tokenizer(["the", word, "film"])


def test_missing_pad_token_becomes_eos(tmp_path):
  tok = load_tokenizer(_saved(tmp_path, pad_token=None))
  assert tok.pad_token_id == tok.eos_token_id == 1


@pytest.mark.parametrize("pad", ["<pad>", None])
def test_tokenizer_without_eos_is_refused(tmp_path, pad):
  folder = _saved(tmp_path, eos_token=None, pad_token=pad)
  with pytest.raises(ValueError, match=r"the tokenizer has no EOS token; responses need one"):
    load_tokenizer(folder)


def test_missing_folder_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"tokenizer folder .*nowhere does not exist"):
    load_tokenizer(tmp_path / "nowhere")


def test_a_folder_without_tokenizer_files_says_so(tmp_path):
  # A model folder saved without its tokenizer: from its config.json alone transformers builds
  # an empty GPT-2 tokenizer (one token), which sampled empty responses.
  (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
  with pytest.raises(FileNotFoundError, match=r"no tokenizer files \(none of tokenizer.json"):
    load_tokenizer(tmp_path)


def test_a_damaged_tokenizer_is_one_line_naming_its_folder(tmp_path):
  """transformers' own errors named no file (a JSON decode error), or were a KeyError traceback;
  a vocabulary without its unknown token failed only at the first text."""
  (tmp_path / "tokenizer.json").write_text("{")
  with pytest.raises(ValueError, match=rf"^{tmp_path}: cannot load its tokenizer \(.*Error: "):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(ValueError, match=rf"^{tmp_path}: cannot load its tokenizer \("):
    load_tokenizer(tmp_path)
  # A vocabulary without its unknown token: transformers loads it and fails at the first text.
  words = _saved(tmp_path / "no_unk")
  tokenizer_json = json.loads((words / "tokenizer.json").read_text())
  del tokenizer_json["model"]["vocab"]["<unk>"]
  (words / "tokenizer.json").write_text(json.dumps(tokenizer_json))
  with pytest.raises(ValueError, match=rf"^{words}: cannot load its tokenizer \(.*\[UNK\]"):
    load_tokenizer(words)
  # A sound tokenizer beside a damaged config.json (which transformers reads too): the config
  # is named, not the tokenizer.
  build_word_tokenizer(["a", "b"]).save_pretrained(tmp_path)
  load_tokenizer(tmp_path)
  (tmp_path / "config.json").write_text('{"model_type": "gpt2",')
  with pytest.raises(ValueError, match=rf"^{tmp_path / 'config.json'}: not valid JSON \(Expect"):
    load_tokenizer(tmp_path)


def test_same_ids_allows_tokens_of_its_own_but_no_other_ids():
  """A reward model's tokenizer may add tokens (a pad); it may not lack or renumber the texts'."""
  texts = build_word_tokenizer(["good", "film"])
  assert same_ids(build_word_tokenizer(["good", "film", "plot"]), texts)
  assert not same_ids(texts, build_word_tokenizer(["good", "film", "plot"]))
  assert not same_ids(build_word_tokenizer(["film", "good"]), texts)
