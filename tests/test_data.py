"""Data files → token arrays: the layout, the batch stream, and bad files named by file and line."""

import json

import numpy as np
import pytest

from ppo_jax import data
from ppo_jax import rows as row_order
from ppo_jax.tokenizer import build_word_tokenizer

TOK = build_word_tokenizer(["good", "film", "bad", "plot"])  # ids: good 4, film 5, bad 6, plot 7
LAYOUT = data.Layout(prompt_len=3, response_len=3, pad_id=0, eos_id=1)


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_prompts_left_padded_and_responses_right_padded_with_eos(tmp_path):
  path = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "good", "response": "bad plot"}])
  seqs = data.load_sft(path, TOK, LAYOUT)
  np.testing.assert_array_equal(seqs.ids, [[0, 0, 4, 6, 7, 1]])
  np.testing.assert_array_equal(seqs.mask, [[0, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(seqs.response_mask, [[1, 1, 1]])
  assert seqs.truncated == 0


def test_half_an_emoji_is_named_with_its_line(tmp_path):
  """A JSON escape of a lone UTF-16 surrogate (scraped chat dumps hold them) decodes as JSON
  but no tokenizer takes it (a TypeError naming no row): named with FILE:LINE; a whole pair
  reads."""
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "ok \\ud83d\\ude00"}\n{"prompt": "hi \\ud83d there"}\n')
  with pytest.raises(data.DataError, match=r"p\.jsonl:2: \\ud83d is half a character"):
    data.read_objects(path)
  path.write_text('{"prompt": "ok \\ud83d\\ude00"}\n')
  assert data.read_objects(path)[0][1] == {"prompt": "ok \U0001f600"}


def test_long_response_is_cut_and_counted(tmp_path):
  path = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "good", "response": "bad plot film good"}])
  seqs = data.load_sft(path, TOK, LAYOUT)
  np.testing.assert_array_equal(seqs.ids[0, 3:], [6, 7, 5])  # no room left for EOS
  assert seqs.truncated == 1


def test_preference_responses_cut_into_one_sequence_are_said(tmp_path, capsys):
  """Responses cut at 3 tokens lose their EOS; a pair whose responses share their first 3 tokens
  becomes one sequence twice, which teaches nothing: both are counted when the split is made."""
  import types

  from ppo_jax.stages import load_preference_split

  rows = [
    {"prompt": "good", "chosen": "bad plot film good", "rejected": "bad plot film bad"},
    {"prompt": "film", "chosen": "good", "rejected": "bad"},
    {"prompt": "plot", "chosen": "good film bad plot", "rejected": "bad"},
  ]
  path = _jsonl(tmp_path / "pairs.jsonl", rows)
  inputs = types.SimpleNamespace(preferences=str(path), tokenizer=TOK, loaded={})
  load_preference_split(inputs, LAYOUT, 0.0, 0, tmp_path / "held_out.jsonl")
  out = capsys.readouterr().out.splitlines()
  assert out[-1] == (
    "note: 3 of the 6 responses cut at 3 tokens (data.max_response_len); 1 pairs are then the "
    "same sequence twice (no preference to learn)"
  )


def test_long_prompt_is_refused_or_keeps_its_end(capsys):
  with pytest.raises(data.DataError, match=r"row 1: prompt of 4 tokens .* data.max_prompt_len=3"):
    data.encode_prompts(TOK, ["good film bad plot"], LAYOUT)
  cut = data.Layout(3, 3, 0, 1, overflow="truncate")
  ids, mask = data.encode_prompts(TOK, ["good film bad plot", "good"], cut, source="p.jsonl")
  np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 4]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
  assert (
    capsys.readouterr().out == "p.jsonl: 1 of 2 prompts longer than 3 tokens keep their last 3\n"
  )
  data.encode_prompts(TOK, ["good zebra", "good", "okapi"], LAYOUT, source="p.jsonl")
  assert capsys.readouterr().out == (
    f"p.jsonl: 2 of 3 prompts hold text the tokenizer does not know (read as {TOK.unk_token})\n"
  )
  data.encode_responses(TOK, ["good zebra", "good"], LAYOUT, source="s.jsonl")  # responses too
  assert capsys.readouterr().out == (
    f"s.jsonl: 1 of 2 responses hold text the tokenizer does not know (read as {TOK.unk_token})\n"
  )
  ids, mask = data.encode_prompts(TOK, ["good", "", ""], LAYOUT, source="p.jsonl")
  assert mask.sum(1).tolist() == [1, 0, 0] and capsys.readouterr().out == (
    "note: p.jsonl: 2 of 3 prompts have no tokens (empty, and the tokenizer adds no BOS): the "
    "model reads only padding before their responses\n"
  )
  # A tokenizer that puts BOS first (Llama's, Gemma's): the cut keeps it, and the text's end.
  from tokenizers import processors

  bos_first = build_word_tokenizer(["good", "film", "bad", "plot"])
  bos_first.backend_tokenizer.post_processor = processors.TemplateProcessing(
    single="<bos> $A", special_tokens=[("<bos>", 2)]
  )
  ids, _ = data.encode_prompts(bos_first, ["good film bad plot", "good"], cut, source="p.jsonl")
  np.testing.assert_array_equal(ids, [[2, 6, 7], [0, 2, 4]])
  assert capsys.readouterr().out == (
    "p.jsonl: 1 of 2 prompts longer than 3 tokens keep their first 1 (the tokenizer's BOS) and "
    "last 2\n"
  )


CHAT_TOK = build_word_tokenizer(
  ["good", "film", "bad", "plot", "<sys>", "<user>", "<bot>", "<end>"]
)
CHAT_TOK.chat_template = (  # ids: <sys> 8, <user> 9, <bot> 10, <end> 11
  "{% for m in messages %}<{{ {'system': 'sys', 'assistant': 'bot'}.get(m.role, m.role) }}> "
  "{{ m.content }} <end> "
  "{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"
)


def test_a_template_turn_end_other_than_eos_ends_the_responses(tmp_path, capsys):
  """Gemma's template ends an assistant turn with <end_of_turn>, its tokenizer's EOS is <eos>:
  with the chat template, responses end with the turn's end (SFT here; preference pairs read
  the same), said in one line; nothing changes when the turn ends with no special token (as
  CHAT_TOK's <end> here) or without the template."""
  from ppo_jax.compat import turn_end_note

  assert turn_end_note(CHAT_TOK) is None
  assert data.Layout.of(CHAT_TOK, 6, 3, chat=True).eos_id == CHAT_TOK.eos_token_id == 1
  tok = build_word_tokenizer(["good", "bad", "<user>", "<bot>", "<end>"])
  tok.chat_template = CHAT_TOK.chat_template
  tok.add_special_tokens({"additional_special_tokens": ["<end>"]})
  end = tok.convert_tokens_to_ids("<end>")
  assert turn_end_note(tok) == (
    f"note: the chat template ends an assistant turn with <end> (id {end}), not the tokenizer's "
    "EOS <eos> (id 1): SFT, reward-model and DPO responses end with it, and sampling stops at it"
  )
  chat = data.Layout.of(tok, 6, 3, chat=True)
  assert chat.eos_id == end and data.Layout.of(tok, 6, 3).eos_id == 1
  rows = [{"prompt": "good", "response": r} for r in ("bad", "bad <eos>", "bad <end>")]
  seqs = data.load_sft(_jsonl(tmp_path / "sft.jsonl", rows), tok, chat)
  bad = tok.convert_tokens_to_ids("bad")
  assert seqs.ids[:, -3:].tolist() == [[bad, end, 0]] * 3  # one ending, whichever was written
  assert capsys.readouterr().out.endswith(
    "2 of 3 responses end with <eos> or <end> in their text, the end ppo_jax appends (<end>): "
    "it is kept once\n"
  )
  # Added as a special token without being listed among the special tokens (Llama 3's
  # <|eot_id|>, Phi-3's <|end|>): the same.
  from tokenizers import AddedToken

  tok = build_word_tokenizer(["good", "<user>", "<bot>"])
  tok.chat_template = CHAT_TOK.chat_template
  tok.add_tokens([AddedToken("<end>", special=True)])
  assert "<end>" not in tok.all_special_tokens
  assert turn_end_note(tok).startswith("note: the chat template ends an assistant turn with")
  assert data.Layout.of(tok, 6, 3, chat=True).eos_id == tok.convert_tokens_to_ids("<end>")


def test_chat_template_wraps_prompts_and_the_response_closes_the_turn(tmp_path):
  path = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "good", "response": "bad plot"}])
  chat = data.Layout(prompt_len=6, response_len=3, pad_id=0, eos_id=11, chat=True)
  seqs = data.load_sft(path, CHAT_TOK, chat)
  np.testing.assert_array_equal(seqs.ids, [[0, 0, 9, 4, 11, 10, 6, 7, 11]])
  np.testing.assert_array_equal(seqs.mask, [[0, 0, 1, 1, 1, 1, 1, 1, 1]])
  with_system = data.Layout(8, 3, 0, 11, chat=True, system="film")
  ids, mask = data.encode_prompts(CHAT_TOK, ["good"], with_system)
  np.testing.assert_array_equal(ids, [[0, 8, 5, 11, 9, 4, 11, 10]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 1, 1, 1, 1]])
  # The template's tokens count towards data.max_prompt_len.
  with pytest.raises(data.DataError, match=r"row 1: prompt of 4 tokens .* data\.max_prompt_len=3"):
    data.encode_prompts(CHAT_TOK, ["good"], data.Layout(3, 3, 0, 11, chat=True))
  with pytest.raises(ValueError, match=r"'truncate' would cut the chat template's start"):
    data.Layout(3, 3, 0, 11, overflow="truncate", chat=True)
  strict = build_word_tokenizer(["good"])
  strict.chat_template = (
    "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{{ messages[0].content }}"
  )
  with pytest.raises(data.DataError, match=r"system_prompt: the tokenizer's template refused: no"):
    data.encode_prompts(strict, ["good"], data.Layout(6, 3, 0, 1, chat=True, system="be kind"))
  with pytest.raises(
    data.DataError, match=r"data\.chat_template: the tokenizer has no chat template"
  ):
    data.encode_prompts(TOK, ["good"], data.Layout(6, 3, 0, 1, chat=True))


CHAT = data.Layout(prompt_len=12, response_len=3, pad_id=0, eos_id=11, chat=True)
USER = lambda text: {"role": "user", "content": text}
BOT = lambda text: {"role": "assistant", "content": text}


def _arrays(seqs):
  return seqs.ids.tolist(), seqs.mask.tolist(), seqs.response_mask.tolist()


def test_conversations_encode_as_the_texts_they_hold(tmp_path):
  """Each conversational form of an SFT row gives the arrays of its plain form; an earlier turn
  stays in the prompt, the last assistant message is the response."""
  plain = data.load_sft(
    _jsonl(tmp_path / "a.jsonl", [{"prompt": "good", "response": "bad"}]), CHAT_TOK, CHAT
  )
  for row in [
    {"messages": [USER("good"), BOT("bad")]},
    {"prompt": [USER("good")], "completion": [BOT("bad")]},
    {"prompt": "good", "completion": [BOT("bad")]},
    {"prompt": [USER("good")], "response": "bad"},
  ]:
    assert _arrays(data.load_sft(_jsonl(tmp_path / "b.jsonl", [row]), CHAT_TOK, CHAT)) == _arrays(
      plain
    ), row
  turns = [{"messages": [USER("good"), BOT("film"), USER("plot"), BOT("bad")]}]
  seqs = data.load_sft(_jsonl(tmp_path / "c.jsonl", turns), CHAT_TOK, CHAT)
  # <user> good <end> <bot> film <end> <user> plot <end> <bot> | bad <end>
  assert seqs.ids[0, :12].tolist() == [0, 0, 9, 4, 11, 10, 5, 11, 9, 7, 11, 10]
  assert seqs.ids[0, 12:].tolist() == [6, 11, 0]


def test_preference_conversations_with_and_without_a_prompt_field(tmp_path):
  plain = [{"prompt": "good", "chosen": "film", "rejected": "bad"}]
  explicit = [{"prompt": [USER("good")], "chosen": [BOT("film")], "rejected": [BOT("bad")]}]
  implicit = [{"chosen": [USER("good"), BOT("film")], "rejected": [USER("good"), BOT("bad")]}]
  want = [
    _arrays(x) for x in data.load_preferences(_jsonl(tmp_path / "p.jsonl", plain), CHAT_TOK, CHAT)
  ]
  for rows in (explicit, implicit):
    got = data.load_preferences(_jsonl(tmp_path / "q.jsonl", rows), CHAT_TOK, CHAT)
    assert [_arrays(x) for x in got] == want
  apart = [{"chosen": [USER("good"), BOT("film")], "rejected": [USER("plot"), BOT("bad")]}]
  with pytest.raises(data.DataError, match=r"q\.jsonl:1: 'chosen' and 'rejected' differ before"):
    data.load_preferences(_jsonl(tmp_path / "q.jsonl", apart), CHAT_TOK, CHAT)


H, A = "\n\nHuman:", "\n\nAssistant:"


@pytest.mark.parametrize(
  "chosen,rejected,want",
  [  # HH-RLHF's form: the prompt ends after the last "Assistant:" before the texts differ
    (f"{H} hi{A} It is 4.", f"{H} hi{A} It is 5.", (f"{H} hi{A}", " It is 4.", " It is 5.")),
    (  # they differ in the last human turn: the cut is at the assistant's turn before it
      f"{H} hi{A} yo{H} w1{A} w2",
      f"{H} hi{A} yo{H} w3{A} w4",
      (f"{H} hi{A}", f" yo{H} w1{A} w2", f" yo{H} w3{A} w4"),
    ),
    ("Assistant: w1 w2", "Assistant: w1 w3", ("Assistant:", " w1 w2", " w1 w3")),
    # with no marker, at the last whitespace before they differ (a word is not cut)
    ("good film bad", "good film badly", ("good film", " bad", " badly")),
    ("good film  bad", "good film plot", ("good film", "  bad", " plot")),
    ("see https://a.b/c", "see https://a.b/d", ("see", " https://a.b/c", " https://a.b/d")),
    ("Note: w1 w2", "Note: w1 w3", ("Note: w1", " w2", " w3")),  # only Assistant: is a turn
    ("good film", "good film", ("good", " film", " film")),  # a tie
  ],
)
def test_pairs_without_a_prompt_field_share_their_start(chosen, rejected, want):
  from ppo_jax.conversations import preference_row

  assert preference_row({"chosen": chosen, "rejected": rejected}, "f:1") == want


def test_sft_and_preference_rows_serve_as_prompts(tmp_path):
  """An SFT or preference file read as the prompts file gives the prompts of its rows."""
  rows = [
    {"prompt": "good film", "response": "bad"},
    {"messages": [USER("good"), BOT("film"), USER("plot"), BOT("bad")]},
    {"conversations": [{"from": "human", "value": "good"}, {"from": "gpt", "value": "bad"}]},
    {"conversations": [{"from": "human", "value": "good"}, {"from": "chatgpt", "value": "film"}]},
    {"chosen": [USER("good"), BOT("film")], "rejected": [USER("good"), BOT("bad")]},
    {"chosen": "good film bad", "rejected": "good film plot"},
  ]
  texts = data.load_prompts(_jsonl(tmp_path / "p.jsonl", rows), CHAT_TOK, CHAT)[0]
  assert texts == [
    "good film",
    "<user> good <end> <bot> film <end> <user> plot <end> <bot>",
    "<user> good <end> <bot>",
    "<user> good <end> <bot>",  # ShareGPT's chatgpt turn is the assistant's, as gpt's
    "<user> good <end> <bot>",
    "good film",
  ]
  for turns, what in (
    ([BOT("a")], "holds only"),
    ([USER("a"), BOT("b"), BOT("c")], "ends with two"),
  ):
    with pytest.raises(data.DataError, match=rf"p\.jsonl:1: messages {what} assistant messages; a"):
      data.load_prompts(_jsonl(tmp_path / "p.jsonl", [{"messages": turns}]), CHAT_TOK, CHAT)
  texts = data.load_prompts(_jsonl(tmp_path / "p.jsonl", [{"messages": "good"}]), TOK, LAYOUT)[0]
  assert texts == ["good"]


def test_prompt_conversations_read_as_the_template_writes_them(tmp_path):
  rows = [
    {"messages": [USER("good"), BOT("film"), USER("plot")]},
    {"prompt": [USER("bad")]},
    {"prompt": "bad"},
  ]
  texts, ids, mask = data.load_prompts(_jsonl(tmp_path / "p.jsonl", rows), CHAT_TOK, CHAT)
  assert texts == [
    "<user> good <end> <bot> film <end> <user> plot <end> <bot>",
    "<user> bad <end> <bot>",
    "bad",
  ]
  assert ids[0].tolist() == [0, 0, 9, 4, 11, 10, 5, 11, 9, 7, 11, 10]
  np.testing.assert_array_equal(ids[1], ids[2])
  np.testing.assert_array_equal(mask[1], mask[2])
  # data.system_prompt goes first unless the conversation has a system turn of its own.
  system = data.Layout(12, 3, 0, 11, chat=True, system="film")
  own = [
    {"prompt": [{"role": "system", "content": "plot"}, USER("good")]},
    {"prompt": [USER("good")]},
  ]
  texts = data.load_prompts(_jsonl(tmp_path / "s.jsonl", own), CHAT_TOK, system)[0]
  assert texts == [
    "<sys> plot <end> <user> good <end> <bot>",
    "<sys> film <end> <user> good <end> <bot>",
  ]


@pytest.mark.parametrize(
  "loader,row,message",
  [
    ("prompts", {"prompt": [USER("good"), BOT("film")]}, r"prompt ends with an assistant message"),
    ("prompts", {"messages": []}, r"field 'messages' must be a string or a non-empty list"),
    (
      "prompts",
      {"prompt": [{"role": "user"}]},
      r"prompt\[0\] \(user\) must have a string 'content'",  # 0-based, as JSON's readers count
    ),
    (
      "prompts",
      {"prompt": [{"content": "good"}]},
      r"prompt\[0\] must be an object with a string 'role'",
    ),
    (
      "prompts",
      {"text": "good"},
      r"missing field 'prompt' \(expected 'prompt', 'messages' or 'conv",
    ),
    ("sft", {"messages": [BOT("film")]}, r"messages must end with an assistant message after"),
    (
      "sft",
      {"messages": [USER("good"), USER("film")]},
      r"messages must end with an assistant message, got 'user'",
    ),
    ("sft", {"prompt": "good", "completion": [USER("film")]}, r"completion must be one assistant"),
    (
      "sft",
      {"prompt": "good", "completion": [BOT("film"), BOT("bad")]},
      r"completion must be one assistant message, got roles \['assistant', 'assistant'\]",
    ),
    ("sft", {"prompt": "good"}, r"missing field 'response' \(expected 'prompt' and 'response'"),
    (
      "pairs",
      {"chosen": "film", "rejected": "bad"},
      r"without a 'prompt' field, 'chosen' and 'rejected' must start with the same prompt",
    ),
    (
      "pairs",
      {"chosen": 3, "rejected": "bad"},
      r"'chosen' and 'rejected' must be texts or conversations, got int and str",
    ),
    (
      "pairs",
      {"chosen": [BOT("film")], "rejected": [BOT("bad")]},
      r"missing field 'prompt' \(expected 'prompt', 'chosen' and 'rejected', or",
    ),
    (
      "pairs",
      {"prompt": "good", "chosen": [BOT("a"), BOT("b")], "rejected": "bad"},
      r"one of 'chosen' and 'rejected' is a conversation, the other not",
    ),
    (  # the valid side was blamed: "rejected must end with an assistant message after ..."
      "pairs",
      {"prompt": [USER("good")], "chosen": [BOT("a"), BOT("b")], "rejected": [BOT("bad")]},
      r"'chosen' is a conversation \(roles \['assistant', 'assistant'\]\), 'rejected' one assis",
    ),
    (  # a message without a role is named as such, not as the pair's shapes
      "pairs",
      {"prompt": "good", "chosen": [{"content": "a"}], "rejected": [BOT("bad")]},
      r"chosen\[0\] must be an object with a string 'role'",
    ),
    ("pairs", {"chosen": [], "rejected": [BOT("bad")]}, r"'chosen' is an empty list; expected"),
  ],
)
def test_bad_conversations_are_named_with_their_line(tmp_path, loader, row, message):
  path = _jsonl(tmp_path / "f.jsonl", [row])
  load = {"prompts": data.load_prompts, "sft": data.load_sft, "pairs": data.load_preferences}
  with pytest.raises(data.DataError, match=rf"f\.jsonl:1: {message}"):
    load[loader](path, CHAT_TOK, CHAT)


def test_the_shapes_of_common_hub_datasets(tmp_path):
  """ultrachat_200k (a prompt string beside the messages), ultrafeedback_binarized (a prompt
  string beside whole conversations), ShareGPT, text parts, a tool call earlier in the prompt."""
  plain = _arrays(
    data.load_sft(
      _jsonl(tmp_path / "a.jsonl", [{"prompt": "good", "response": "bad"}]), CHAT_TOK, CHAT
    )
  )
  for row in [
    {"prompt": "good", "prompt_id": "x", "messages": [USER("good"), BOT("bad")]},
    {"conversations": [{"from": "human", "value": "good"}, {"from": "gpt", "value": "bad"}]},
    {
      "messages": [
        {
          "role": "user",
          "content": [{"type": "text", "text": "go"}, {"type": "text", "text": "od"}],
        },
        BOT("bad"),
      ]
    },
  ]:
    assert _arrays(data.load_sft(_jsonl(tmp_path / "b.jsonl", [row]), CHAT_TOK, CHAT)) == plain, row
  pairs = [
    {
      "prompt": "good",
      "chosen": [USER("good"), BOT("film")],
      "rejected": [USER("good"), BOT("bad")],
    }
  ]
  want = [{"prompt": "good", "chosen": "film", "rejected": "bad"}]
  assert [
    _arrays(x) for x in data.load_preferences(_jsonl(tmp_path / "p.jsonl", pairs), CHAT_TOK, CHAT)
  ] == [
    _arrays(x) for x in data.load_preferences(_jsonl(tmp_path / "q.jsonl", want), CHAT_TOK, CHAT)
  ]
  call = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"type": "function", "function": {"name": "f"}}],
  }
  texts = data.load_prompts(
    _jsonl(tmp_path / "t.jsonl", [{"messages": [USER("good"), call, USER("plot")]}]), CHAT_TOK, CHAT
  )[0]
  assert texts == [
    "<user> good <end> <bot>  <end> <user> plot <end> <bot>"
  ]  # the template's choice


@pytest.mark.parametrize(
  "row,message",
  [
    (
      {"messages": [USER("good"), {**BOT(""), "tool_calls": []}]},
      r"messages: the assistant message carries \['tool_calls'\]; a response is the text",
    ),
    (
      {"messages": [USER("good"), {"role": "assistant", "content": None, "tool_calls": [1]}]},
      r"messages: the assistant message carries \['tool_calls'\]",
    ),
    (
      {"messages": [{"role": "user", "content": [{"type": "image"}]}, BOT("a")]},
      r"messages\[0\]\.content\[0\] is 'image'; only text parts are read",
    ),
    (
      {"conversations": [{"value": "good"}]},
      r"conversations\[0\] must be an object with a string 'from'",
    ),
  ],
)
def test_what_a_response_cannot_hold_is_refused(tmp_path, row, message):
  with pytest.raises(data.DataError, match=rf"f\.jsonl:1: {message}"):
    data.load_sft(_jsonl(tmp_path / "f.jsonl", [row]), CHAT_TOK, CHAT)


def test_a_template_that_refuses_a_row_names_it(tmp_path):
  strict = build_word_tokenizer(["good"])
  strict.chat_template = (
    "{% for m in messages %}{% if loop.index0 and m.role == messages[loop.index0 - 1].role %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}{{ m.content }} {% endfor %}"
  )
  rows = ["good", [USER("good"), USER("good")]]
  with pytest.raises(
    data.DataError,
    match=r"^f\.jsonl: row 2: data\.chat_template: the tokenizer's template refused: roles must "
    r"alternate$",
  ):
    data.encode_prompts(strict, rows, CHAT, source="f.jsonl")
  # Read from a file: its line (a blank line before it), as every other data error names it.
  path = tmp_path / "f.jsonl"
  path.write_text('{"prompt": "good"}\n\n' + json.dumps({"messages": [USER("good")] * 2}) + "\n")
  with pytest.raises(data.DataError, match=rf"^{path}:3: data\.chat_template: .* roles must"):
    data.load_prompts_and_columns(path, strict, CHAT)
  # A system prompt is blamed only where it was added; one of the row's own is kept, wherever.
  with_system = data.Layout(12, 3, 0, 11, chat=True, system="film")
  own = [{"role": "system", "content": "x"}, USER("good"), USER("good")]
  with pytest.raises(
    data.DataError, match=r"row 1: data\.chat_template: the tokenizer's template refused: roles"
  ):
    data.encode_prompts(strict, [own], with_system, source="f.jsonl")
  assert data.chat_prompts(
    CHAT_TOK, [[USER("good"), {"role": "system", "content": "plot"}]], "film"
  ) == ["<user> good <end> <sys> plot <end> <bot>"]
  broken = build_word_tokenizer(["good"])
  broken.chat_template = "{% for m in messages %}{{ m.content }"  # the template's fault
  with pytest.raises(
    data.DataError, match=r"^data\.chat_template: the tokenizer's chat template does not parse: "
  ):
    data.encode_prompts(broken, ["good"], CHAT, source="f.jsonl")


def test_a_conversation_needs_the_chat_template(tmp_path):
  path = _jsonl(tmp_path / "f.jsonl", [{"prompt": "good"}, {"messages": [USER("good")]}])
  with pytest.raises(
    data.DataError, match=r"f\.jsonl:2: a conversation .* needs data\.chat_template=True"
  ):
    data.load_prompts(path, TOK, LAYOUT)
  with pytest.raises(data.DataError, match=r"conversations .* need data\.chat_template=True"):
    data.encode_prompts(TOK, [[USER("good")]], LAYOUT)


def test_a_leading_byte_order_mark_is_accepted(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "good film"}).encode() + b"\n")
  assert data.load_prompts(path, TOK, LAYOUT)[0] == ["good film"]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["unix", "windows", "classic-mac"])
def test_any_line_ending_reads_the_same_rows(tmp_path, ending):
  path = tmp_path / "p.jsonl"
  rows = [{"prompt": "good film"}, {"prompt": "bad plot"}]
  path.write_bytes(ending.join(json.dumps(r).encode() for r in rows) + ending)
  assert data.read_jsonl(path, ["prompt"]) == rows
  path.write_bytes(ending.join([b'{"prompt": "good"}', b"", b'{"prompt": 3}']))
  with pytest.raises(data.DataError, match=r"p\.jsonl:3: field 'prompt' must be a string"):
    data.read_jsonl(path, ["prompt"])  # line numbers as an editor shows them


@pytest.mark.parametrize(
  "content,message",
  [
    (b'{"prompt": "good"}\n{"prompt": "ba\xe9d"}\n', r"p\.jsonl:2: not UTF-8 text \(byte 0xe9\)"),
    (b'{"prompt": "good"}\n{"prompt": \n', r"p\.jsonl:2: not valid JSON"),
    (b'["good"]\n', r"p\.jsonl:1: expected a JSON object, got list"),
    (b'{"text": "good"}\n', r"p\.jsonl:1: missing field 'prompt'"),
    (b'{"prompt": 3}\n', r"p\.jsonl:1: field 'prompt' must be a string, got int"),
    (b"\n\n", r"p\.jsonl: no rows"),
  ],
)
def test_bad_files_are_named_with_their_line(tmp_path, content, message):
  path = tmp_path / "p.jsonl"
  path.write_bytes(content)
  with pytest.raises(data.DataError, match=message):
    data.read_jsonl(path, ["prompt"])


def test_a_folder_or_a_missing_file_is_named(tmp_path):
  with pytest.raises(data.DataError, match="is a folder; expected a JSONL file"):
    data.read_jsonl(tmp_path, ["prompt"])
  with pytest.raises(data.DataError, match=r"nowhere\.jsonl: no such file"):
    data.read_jsonl(tmp_path / "nowhere.jsonl", ["prompt"])


def test_batches_cover_each_epoch_once_and_depend_on_the_step_alone():
  n, b = 10, 5
  epoch = np.concatenate([row_order.batch_indices(n, b, step, seed=3) for step in range(2)])
  assert sorted(epoch.tolist()) == list(range(n))  # two batches: a permutation of the rows
  # Step 7 (epoch 3's second half) read first, as a resumed run reads it, is the step 7 read
  # after steps 0–6; with step 6 it covers its epoch; another seed draws another order.
  late = row_order.batch_indices(n, b, 7, seed=3)
  in_order = [row_order.batch_indices(n, b, step, seed=3) for step in range(8)]
  np.testing.assert_array_equal(in_order[7], late)
  assert sorted([*in_order[6].tolist(), *late.tolist()]) == list(range(n))
  assert not np.array_equal(row_order.batch_indices(n, b, 7, seed=4), late)
  assert not np.array_equal(
    row_order.batch_indices(n, b, 2, seed=3), row_order.batch_indices(n, b, 0, seed=3)
  )
  # batch size not dividing n: the stream is still one shuffle per epoch, read in order
  stream = np.concatenate([row_order.batch_indices(n, 4, step, seed=3) for step in range(5)])
  assert sorted(stream[:n].tolist()) == list(range(n))
  assert sorted(stream[n:].tolist()) == list(range(n))


def test_holdout_split_is_disjoint_and_keeps_a_training_row():
  train, held = row_order.split_holdout(10, 0.25, seed=0)
  assert len(held) == 2 and not set(train) & set(held) and len(train) + len(held) == 10
  assert len(row_order.split_holdout(3, 0.01, seed=0)[1]) == 1  # at least one when asked for any
  assert len(row_order.split_holdout(2, 0.9, seed=0)[0]) == 1  # never all of them
  assert len(row_order.split_holdout(10, 0.0, seed=0)[1]) == 0


def test_holdout_split_keeps_each_prompt_on_one_side(capsys):
  """Two to four responses per prompt: held-out rows are whole prompts (none of their responses
  trained on), about the fraction asked; prompts of one row each give the row split; data of one
  prompt is split by rows."""
  rng = np.random.default_rng(0)
  groups = np.repeat(np.arange(40), rng.integers(2, 5, 40))
  n = len(groups)
  train, held = row_order.split_holdout(n, 0.2, seed=3, groups=groups)
  assert sorted([*train, *held]) == list(range(n))
  assert not set(groups[train]) & set(groups[held])
  assert round(0.2 * n) <= len(held) < round(0.2 * n) + 4  # at most one group over
  for seed in range(3):
    plain = row_order.split_holdout(30, 0.2, seed=seed)
    distinct = row_order.split_holdout(30, 0.2, seed=seed, groups=np.arange(30)[::-1] * 7)
    assert all(np.array_equal(a, b) for a, b in zip(plain, distinct, strict=True))
  train, held = row_order.split_holdout(10, 0.2, seed=0, groups=np.zeros(10, int))
  assert len(held) == 2 and len(train) == 8
  # Two prompts of 50 rows and 5 % asked: half the rows held out would be too many, so by rows,
  # and said.
  two = data.Sequences(np.repeat([[4], [5]], 50, 0), np.ones((100, 1)), np.ones((100, 0)))
  train, held = row_order.holdout_by_prompt(two, 0.05, seed=0, what="p.jsonl")
  assert len(held) == 5 and len(train) == 95
  assert capsys.readouterr().out.startswith("note: p.jsonl: 2 prompts over 100 rows, too few")
  # Prompt groups of encoded rows: equal prompt tokens, whatever the padding holds.
  ids = np.array([[0, 5, 6, 1], [9, 5, 6, 2], [0, 0, 5, 1], [7, 7, 5, 1]])
  mask = np.array([[0, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
  g = data.Sequences(ids, mask, np.ones((4, 1))).prompt_groups()
  assert g[0] == g[1] and len(set(g.tolist())) == 3  # row 2: a real 0 where 0, 1 pad


def test_preference_margins_reach_the_reward_models_loss(tmp_path):
  """A ``margin`` on every row (Llama 2's graded labels) travels with its pair through ``take``
  and the batches into the reward model's loss; one row without, or a non-number, is refused."""
  from flax import nnx

  from ppo_jax import supervised
  from ppo_jax.actor_critic import reward_scores
  from ppo_jax.models import ModelConfig, RewardModel
  from ppo_jax.preference import bradley_terry_loss

  rows = [
    {"prompt": "good", "chosen": "film", "rejected": "bad plot", "margin": 1.5},
    {"prompt": "bad", "chosen": "good film", "rejected": "plot", "margin": 0},
    {"prompt": "film", "chosen": "good", "rejected": "bad", "margin": 3},
  ]
  chosen, rejected = data.load_preferences(_jsonl(tmp_path / "m.jsonl", rows), TOK, LAYOUT)
  np.testing.assert_array_equal(chosen.margin, [1.5, 0, 3])
  np.testing.assert_array_equal(chosen.take(np.array([2, 0])).margin, [3, 1.5])
  batch = supervised.pair_batch((chosen, rejected), np.array([2, 0, 1]))
  np.testing.assert_array_equal(batch["margin"], [3, 1.5, 0])
  cfg = ModelConfig.gpt2(
    vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, max_position_embeddings=8
  )
  graphdef, state = nnx.split(RewardModel(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  loss, _ = supervised.reward_loss(params, graphdef, batch)
  ids = np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
  mask = np.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
  s = np.asarray(reward_scores(graphdef, params, ids, mask))
  want, _ = bradley_terry_loss(s[:3], s[3:], np.array([3, 1.5, 0]))
  assert float(loss) == pytest.approx(float(want), rel=1e-6)
  assert float(loss) != pytest.approx(float(bradley_terry_loss(s[:3], s[3:])[0]), rel=1e-3)
  assert data.load_preferences(_jsonl(tmp_path / "n.jsonl", rows[:1]), TOK, LAYOUT)[0].margin.size
  for bad, got in (
    (None, "none"),
    ("1", "'1'"),
    (float("nan"), "nan"),
    (True, "True"),
    (1e39, "1e"),
  ):
    row = {k: v for k, v in rows[1].items() if k != "margin"}
    if bad is not None:
      row["margin"] = bad
    with pytest.raises(
      data.DataError,
      match=rf"x\.jsonl:2: 'margin' must be a finite float32 number on every row \(or on "
      rf"none\), got {got}",
    ):
      data.load_preferences(_jsonl(tmp_path / "x.jsonl", [rows[0], row]), TOK, LAYOUT)


def test_preferences_with_no_preference_are_refused(tmp_path, capsys):
  same = [{"prompt": "good", "chosen": "film", "rejected": "film"}] * 2
  with pytest.raises(data.DataError, match=r"every pair has chosen == rejected"):
    data.load_preferences(_jsonl(tmp_path / "pairs.jsonl", same), TOK, LAYOUT)
  one_tie = [*same[:1], {"prompt": "good", "chosen": "film", "rejected": "bad plot"}]
  chosen, rejected = data.load_preferences(_jsonl(tmp_path / "p2.jsonl", one_tie), TOK, LAYOUT)
  assert len(chosen) == len(rejected) == 2  # a tie among real pairs is harmless, and noted
  assert capsys.readouterr().out.endswith("p2.jsonl: 1 of 2 pairs have chosen == rejected (no "
                                          "preference)\n")  # fmt: skip


def test_the_templates_own_variables_reach_it():
  """data.chat_template_kwargs, Qwen3's enable_thinking say: an empty thought after the header."""
  tok = build_word_tokenizer(["good", "<user>", "<bot>", "<think>", "</think>"])
  tok.chat_template = (  # ids: good 4, <user> 5, <bot> 6, <think> 7, </think> 8
    "{% for m in messages %}<user> {{ m.content }} {% endfor %}<bot>"
    "{% if enable_thinking is defined and not enable_thinking %} <think> </think>{% endif %}"
  )
  plain = data.Layout(6, 3, 0, 1, chat=True)
  no_thinking = data.Layout(6, 3, 0, 1, chat=True, chat_kwargs='{"enable_thinking": false}')
  assert data.encode_prompts(tok, ["good"], plain)[0].tolist() == [[0, 0, 0, 5, 4, 6]]
  assert data.encode_prompts(tok, ["good"], no_thinking)[0].tolist() == [[0, 5, 4, 6, 7, 8]]
  with pytest.raises(ValueError, match=r"chat_template_kwargs: expected a JSON object such as"):
    data.Layout(6, 3, 0, 1, chat=True, chat_kwargs="[1]")


def test_the_prompt_rows_other_fields_are_columns(tmp_path):
  rows = [
    {"prompt": "good", "answer": "film", "id": 1},
    {"messages": [USER("bad")], "answer": "plot"},
    {"prompt": "plot", "id": 3},
  ]
  path = _jsonl(tmp_path / "p.jsonl", rows)
  texts, ids, mask, columns = data.load_prompts_and_columns(path, CHAT_TOK, CHAT)
  assert (texts, ids.tolist(), mask.tolist()) == tuple(
    x if isinstance(x, list) else x.tolist() for x in data.load_prompts(path, CHAT_TOK, CHAT)
  )
  assert columns == {
    "answer": ["film", "plot", None],
    "id": [1, None, 3],
  }


def test_a_chat_prompt_gets_one_bos_from_a_tokenizer_that_adds_its_own():
  """A Llama-like tokenizer adds BOS to any text it encodes, and its chat template writes one: the
  rendered template is encoded without the tokenizer's, so the row holds exactly one."""
  from tokenizers import processors

  tok = build_word_tokenizer(["good", "<user>", "<bot>"])
  bos = tok.convert_tokens_to_ids("<bos>")
  tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
    single="<bos> $A", special_tokens=[("<bos>", bos)]
  )
  tok.chat_template = "<bos> {% for m in messages %}<user> {{ m.content }} {% endfor %}<bot>"
  assert tok("good")["input_ids"][0] == bos  # it adds its own
  ids, mask = data.encode_prompts(tok, ["good"], data.Layout(8, 2, 0, 1, chat=True))
  assert (ids[mask == 1] == bos).sum() == 1


def test_fitted_preferences_are_as_wide_as_the_longer_side(tmp_path):
  """fit=True (rm-eval): the responses' width is the longest of both sides, so a rejected
  response longer than its chosen one keeps all its tokens and its EOS."""
  path = _jsonl(
    tmp_path / "p.jsonl", [{"prompt": "film", "chosen": "good", "rejected": "bad bad bad"}]
  )
  chosen, rejected = data.load_preferences(path, TOK, data.Layout(4, 8, 0, 1), fit=True)
  assert chosen.response_mask.sum() == 2 and rejected.response_mask.sum() == 4  # + EOS
  assert rejected.truncated == 0


def test_a_group_overshoots_the_held_out_share_rather_than_split():
  """3 prompts × 3 responses at 20 %: one whole prompt (3 rows) is held out, more than 20 % of
  9, rather than a row of a prompt whose other rows train."""
  groups = np.repeat(np.arange(3), 3)
  train, held = row_order.split_holdout(9, 0.2, seed=0, groups=groups)
  assert len(held) == 3 and not set(groups[train]) & set(groups[held])


def test_empty_prompts_fit_one_column():
  ids, mask = data.encode_prompts(TOK, ["", ""], data.Layout(4, 2, 0, 1), fit=True)
  assert ids.shape == mask.shape == (2, 1)


def test_unknown_text_is_counted_once_per_prompt(capsys):
  data.encode_prompts(TOK, ["zebra okapi", "good"], LAYOUT, source="p.jsonl")
  assert capsys.readouterr().out == (
    f"p.jsonl: 1 of 2 prompts hold text the tokenizer does not know (read as {TOK.unk_token})\n"
  )


def test_an_empty_prompt_given_a_bos_is_not_said_to_have_no_tokens(capsys):
  from tokenizers import processors

  bos_first = build_word_tokenizer(["good", "film", "bad", "plot"])
  bos_first.backend_tokenizer.post_processor = processors.TemplateProcessing(
    single="<bos> $A", special_tokens=[("<bos>", 2)]
  )
  ids, mask = data.encode_prompts(bos_first, ["", "good"], LAYOUT, source="p.jsonl")
  assert ids.tolist() == [[0, 0, 2], [0, 2, 4]] and mask.sum(1).tolist() == [1, 2]
  assert capsys.readouterr().out == ""


def test_preference_rows_are_appended_after_the_rows_already_read(tmp_path):
  earlier = {"prompt": "plot", "chosen": "good", "rejected": "bad"}
  pairs = [
    {"prompt": "good", "chosen": "film", "rejected": "bad", "margin": 2},
    {"prompt": "bad", "chosen": "plot", "rejected": "film", "margin": 0.5},
  ]
  read = [earlier]
  chosen, rejected = data.load_preferences(
    _jsonl(tmp_path / "p.jsonl", pairs), TOK, LAYOUT, rows=read
  )
  assert read == [earlier, *pairs]
  assert chosen.margin.tolist() == rejected.margin.tolist() == [2, 0.5]


def test_whole_prompts_held_out_always_leave_a_training_row():
  """Three rows, two of one prompt, 90 % asked: whichever prompt is drawn first, the other stays
  to train on."""
  groups = np.array([0, 0, 1])
  for seed in range(20):
    train, held = row_order.split_holdout(3, 0.9, seed=seed, groups=groups)
    assert len(train) and sorted([*train, *held]) == [0, 1, 2]
    assert not set(groups[train]) & set(groups[held])


def test_a_split_of_whole_prompts_says_nothing(capsys):
  four = data.Sequences(np.repeat([[4], [5], [6], [7]], 5, 0), np.ones((20, 1)), np.ones((20, 0)))
  train, held = row_order.holdout_by_prompt(four, 0.25, seed=0, what="p.jsonl")
  assert len(held) == 5 and len(train) == 15
  assert capsys.readouterr().out == ""


def test_a_split_holding_out_no_pairs_deletes_an_earlier_runs_held_out_file(tmp_path, capsys):
  """The held-out pairs are written for ``ppo-jax rm-eval``; a split that holds out none deletes
  the file an earlier split wrote, whose rows would now be training rows."""
  import types

  from ppo_jax.stages import load_preference_split

  rows = [
    {"prompt": p, "chosen": "good", "rejected": "bad"} for p in ("good", "film", "plot", "bad")
  ]
  path = _jsonl(tmp_path / "pairs.jsonl", rows)
  held_out = tmp_path / "held_out.jsonl"
  inputs = lambda: types.SimpleNamespace(preferences=str(path), tokenizer=TOK, loaded={})
  _, (chosen, _) = load_preference_split(inputs(), LAYOUT, 0.5, 0, held_out)
  written = [json.loads(line) for line in held_out.read_text().splitlines()]
  assert len(written) == len(chosen) > 0 and all(row in rows for row in written)
  load_preference_split(inputs(), LAYOUT, 0.0, 0, held_out)
  assert not held_out.exists()
