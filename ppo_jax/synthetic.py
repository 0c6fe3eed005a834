"""The embedded task of the default experiment: short reviews, a hidden gold scorer, noisy labels.

A prompt asks for a review of an item (``"write a review of the film :"``); the SFT data answers
with a template (``"the film was dull and quite lovely ."``) whose adjectives are drawn uniformly,
so the SFT policy's reviews score about 0 on average. The hidden gold scorer is the mean sentiment
of a response's adjectives, in [−1, 1], and −1 for a review that does not name the prompt's item.
Preference pairs of two reviews (a few naming the wrong item) are labelled the way a noisy human
would, ``P(a ≻ b) = σ((gold(a) − gold(b)) / τ)``; the reward model learns from those labels
alone, and PPO against it should raise the gold score while the KL penalty keeps the reviews on
topic and grammatical.

Everything is generated from a seed (no downloads) and written as the JSONL files a user would
bring (``prompts.jsonl``, ``sft.jsonl``, ``preferences.jsonl``), plus a word-level tokenizer.
"""

from __future__ import annotations

import json
import math
import pathlib
import random
import tempfile
from collections.abc import Sequence

from ppo_jax import writers

ITEMS = (
  "film",
  "book",
  "song",
  "meal",
  "hotel",
  "game",
  "show",
  "play",
  "album",
  "phone",
  "car",
  "poem",
)
SENTIMENT = {
  "superb": 1.0,
  "wonderful": 0.9,
  "great": 0.8,
  "lovely": 0.7,
  "good": 0.5,
  "nice": 0.4,
  "fine": 0.2,
  "decent": 0.1,
  "plain": -0.1,
  "odd": -0.2,
  "slow": -0.4,
  "dull": -0.5,
  "weak": -0.6,
  "bad": -0.8,
  "awful": -0.9,
  "terrible": -1.0,
}
ADVERBS = ("very", "quite", "really", "rather")
REQUESTS = ("write a review of the", "review the", "what about the", "describe the")
WORDS = tuple(
  dict.fromkeys(
    [w for r in REQUESTS for w in r.split()]
    + list(ITEMS)
    + list(SENTIMENT)
    + list(ADVERBS)
    + ["the", "was", "and", "but", "too", ":", "."]
  )
)
WORST = -1.0  # off-topic review, or no adjective


def prompt(rng: random.Random) -> str:
  return f"{rng.choice(REQUESTS)} {rng.choice(ITEMS)} :"


def review(rng: random.Random, item: str) -> str:
  """An SFT-style review: two or three uniformly drawn adjectives, optional adverbs."""

  def adj():
    word = rng.choice(list(SENTIMENT))
    return f"{rng.choice(ADVERBS)} {word}" if rng.random() < 0.3 else word

  parts = [f"the {item} was {adj()}", rng.choice(("and", "but")), adj()]
  if rng.random() < 0.3:
    parts += ["and", "too", adj()]
  return " ".join(parts) + " ."


def gold_score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
  """The hidden gold scorer: mean sentiment of the response's adjectives; −1 if it has none or
  does not name the prompt's item. Summed in whole tenths, so equal means are equal floats.

  A reward function in the form ppo_jax imports by path
  (``--config.reward.fn=ppo_jax.synthetic:gold_score``).
  """
  scores = []
  for p, text in zip(prompts, responses, strict=True):
    words = text.split()
    tenths = [round(10 * SENTIMENT[w]) for w in words if w in SENTIMENT]
    on_topic = _item_of(p) in words
    scores.append(sum(tenths) / (10 * len(tenths)) if tenths and on_topic else WORST)
  return scores


def _item_of(prompt_text: str) -> str:
  words = prompt_text.split()
  return words[-2] if len(words) >= 2 else ""


def _write_if_other(path: pathlib.Path, content: bytes) -> None:
  """``writers.write_whole`` unless ``path`` holds ``content`` already: a finished run rerun
  writes nothing (its workdir may be read-only)."""
  if not (path.is_file() and path.read_bytes() == content):
    writers.write_whole(path, content)


def write_task(
  folder: str | pathlib.Path,
  *,
  seed: int = 0,
  num_prompts: int = 2048,
  num_sft: int = 4096,
  num_pairs: int = 4096,
  label_noise: float = 0.2,
  off_topic: float = 0.15,
  truncated: float = 0.1,
  write_files: bool = True,
) -> dict:
  """Writes the task's JSONL files and tokenizer under ``folder``; returns their paths.

  Args:
    folder: output folder (created).
    seed: all randomness.
    num_prompts: PPO prompts.
    num_sft: SFT (prompt, response) pairs.
    num_pairs: preference pairs.
    label_noise: τ of the labeller, ``P(a ≻ b) = σ((g(a) − g(b)) / τ)``; smaller is less noisy.
    off_topic: fraction of the compared reviews that name a wrong item.
    truncated: fraction of the compared reviews cut short at a random word (as a sampled
      response that stopped early).
    write_files: False returns the paths and statistics without writing (the other processes
      of a multi-process run, while the first one writes).

  Returns:
    dict with paths ``prompts``, ``sft``, ``preferences``, ``tokenizer`` and the labeller's
    agreement with the gold scorer on the written pairs whose gold scores differ
    (``label_accuracy``).
  """
  from ppo_jax.tokenizer import build_word_tokenizer

  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = random.Random(seed)

  def write(name, rows):
    path = folder / name
    if write_files:
      _write_if_other(path, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return str(path)

  prompts = [prompt(rng) for _ in range(num_prompts)]
  sft = []
  for _ in range(num_sft):
    p = prompt(rng)
    sft.append({"prompt": p, "response": review(rng, _item_of(p))})
  pairs, agree, decided = [], 0, 0

  def compared(p):
    item = _item_of(p)
    if rng.random() < off_topic:
      item = rng.choice([i for i in ITEMS if i != item])
    text = review(rng, item)
    if rng.random() < truncated:
      words = text.split()
      text = " ".join(words[: rng.randrange(1, len(words))])
    return text

  for _ in range(num_pairs):
    p = prompt(rng)
    a, b = compared(p), compared(p)
    ga, gb = gold_score([p, p], [a, b])
    p_a = 1.0 / (1.0 + math.exp(min(-(ga - gb) / label_noise, 700.0)))  # no overflow at tiny τ
    a_wins = rng.random() < p_a
    if ga != gb:  # a tie has no right label: a coin flip, left out of the agreement
      decided += 1
      agree += a_wins == (ga > gb)
    chosen, rejected = (a, b) if a_wins else (b, a)
    pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
  tok_dir = folder / "tokenizer"
  if write_files:
    with tempfile.TemporaryDirectory() as built:
      build_word_tokenizer(WORDS).save_pretrained(built)
      tok_dir.mkdir(exist_ok=True)
      for file in sorted(pathlib.Path(built).iterdir()):
        _write_if_other(tok_dir / file.name, file.read_bytes())
  return {
    "prompts": write("prompts.jsonl", [{"prompt": p} for p in prompts]),
    "sft": write("sft.jsonl", sft),
    "preferences": write("preferences.jsonl", pairs),
    "tokenizer": str(tok_dir),
    "label_accuracy": agree / max(decided, 1),
  }
