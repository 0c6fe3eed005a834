"""The embedded review task: its simulated labeller follows τ, at any τ > 0."""

import json
import pathlib

from ppo_jax import synthetic
from ppo_jax.tokenizer import load_tokenizer


def _accuracy(tmp_path, tau):
  sizes = dict(num_prompts=8, num_sft=8, num_pairs=400, write_files=False)
  return synthetic.write_task(tmp_path, seed=0, label_noise=tau, **sizes)["label_accuracy"]


def test_a_sharper_labeller_agrees_more_with_gold_and_a_tiny_tau_does_not_overflow(tmp_path):
  noisy, default, sharp = (_accuracy(tmp_path, tau) for tau in (2.0, 0.2, 1e-4))
  assert 0.5 < noisy < default < sharp  # τ = 1e-4 overflowed math.exp before
  assert sharp == 1.0  # ties (equal gold, coin flips) are left out


def _rows(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_label_accuracy_is_the_agreement_on_the_written_pairs_whose_gold_differs(tmp_path):
  """Recomputed from preferences.jsonl with the gold scorer: chosen above rejected, over the
  pairs whose gold scores differ (the written pairs hold ties too)."""
  paths = synthetic.write_task(tmp_path, seed=3, num_prompts=4, num_sft=4, num_pairs=300)
  rows = _rows(paths["preferences"])
  gold = [synthetic.gold_score([r["prompt"]] * 2, [r["chosen"], r["rejected"]]) for r in rows]
  decided = [c > r for c, r in gold if c != r]
  assert len(rows) == 300 and 0 < len(decided) < 300
  assert paths["label_accuracy"] == sum(decided) / len(decided)


def test_the_task_is_written_once_and_not_again_when_it_is_the_same(tmp_path):
  """A finished run rerun (its workdir read-only, say) rewrote data/ and its tokenizer each
  time: the same files are left alone now, and other ones replaced."""
  sizes = dict(num_prompts=8, num_sft=8, num_pairs=8)
  paths = synthetic.write_task(tmp_path, seed=0, **sizes)
  files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
  assert {p.name for p in files} >= {"prompts.jsonl", "sft.jsonl", "tokenizer.json"}
  stamps = {p: p.stat().st_mtime_ns for p in files}
  assert synthetic.write_task(tmp_path, seed=0, **sizes) == paths
  assert {p: p.stat().st_mtime_ns for p in files} == stamps
  before = (tmp_path / "prompts.jsonl").read_text()
  synthetic.write_task(tmp_path, seed=1, **sizes)
  assert (tmp_path / "prompts.jsonl").read_text() != before
  assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files  # no partial files left


def test_gold_scores_a_review_of_another_item_lowest():
  """The hidden scorer: the mean sentiment of a response's adjectives, −1 when it does not name
  the prompt's item (however glowing)."""
  prompts = ["review the film :"] * 2
  assert synthetic.gold_score(prompts, ["the film was superb .", "the book was superb ."]) == [
    1.0,
    -1.0,
  ]


def test_equal_mean_sentiments_score_equal():
  """Means of 1, 2 and 3 adjectives that are all 0.2 score 0.2 exactly (a float sum made the
  third 0.19999999999999996, a "difference" the labeller at a tiny τ then ranked as real)."""
  reviews = [
    "the film was fine .",
    "the film was good but plain .",
    "the film was lovely and decent but odd .",
  ]
  assert synthetic.gold_score(["review the film :"] * 3, reviews) == [0.2, 0.2, 0.2]


def test_the_tasks_tokenizer_knows_every_word_of_its_files(tmp_path):
  paths = synthetic.write_task(tmp_path, seed=0, num_prompts=50, num_sft=50, num_pairs=50)
  tok = load_tokenizer(paths["tokenizer"])
  texts = [
    t for name in ("prompts", "sft", "preferences") for r in _rows(paths[name]) for t in r.values()
  ]
  assert len(texts) == 50 + 100 + 150
  assert not [
    t for t, ids in zip(texts, tok(texts)["input_ids"], strict=True) if tok.unk_token_id in ids
  ]


def test_sft_reviews_are_of_the_prompts_item_and_score_about_zero(tmp_path):
  """Adjectives drawn uniformly: the SFT reviews' mean gold score is near 0 (a review of another
  item scores −1)."""
  paths = synthetic.write_task(tmp_path, seed=0, num_prompts=1, num_sft=400, num_pairs=1)
  rows = _rows(paths["sft"])
  scores = synthetic.gold_score([r["prompt"] for r in rows], [r["response"] for r in rows])
  assert abs(sum(scores) / len(scores)) < 0.1


def test_off_topic_reviews_name_another_item(tmp_path):
  sizes = dict(num_prompts=1, num_sft=1, num_pairs=100, off_topic=1.0, truncated=0.0)
  rows = _rows(synthetic.write_task(tmp_path, seed=0, **sizes)["preferences"])
  for r in rows:
    gold = synthetic.gold_score([r["prompt"]] * 2, [r["chosen"], r["rejected"]])
    assert gold == [synthetic.WORST] * 2, r
