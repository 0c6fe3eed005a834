"""Reward functions by import path: each way one can fail is one line naming it."""

import numpy as np
import pytest

from ppo_jax.rewards import RewardError, call_reward_fn, load_reward_fn

PROMPTS, RESPONSES = ["a", "b", "c"], ["x", "y", "z"]


def test_scores_come_back_as_float32_one_per_response():
  scores = call_reward_fn(lambda p, r: [1, 2.5, -3], PROMPTS, RESPONSES)
  assert scores.dtype == np.float32
  np.testing.assert_array_equal(scores, [1.0, 2.5, -3.0])
  np.testing.assert_array_equal(call_reward_fn(lambda p, r: np.ones(3), PROMPTS, RESPONSES), 1.0)


def _raises(prompts, responses):
  raise RuntimeError("reward server unreachable")


def _exits(prompts, responses):
  raise SystemExit(0)


@pytest.mark.parametrize(
  "fn,message",
  [
    (_raises, r"my fn at step 7 raised RuntimeError: reward server unreachable"),
    (_exits, r"my fn at step 7 raised SystemExit: 0$"),  # not a quiet exit 0 of the whole run
    (lambda p, r: [0.0, 1.0], r"returned an array of shape \(2,\); expected \(3,\)"),
    (lambda p, r: [[0.0], [1.0], [2.0]], r"returned an array of shape \(3, 1\); expected \(3,\)"),
    (lambda p, r: None, r"returned None, not a sequence of 3 scores \(one per response\)"),
    (lambda p, r: 0.5, r"returned 0\.5, not a sequence of 3 scores"),
    (
      lambda p, r: [1.0, None, 2.0],
      r"returned None for 1 of 3 responses \(indices 1\), not a score$",
    ),
    (lambda p, r: ["good", "bad", "ok"], r"returned text \(\['good', 'bad', 'ok'\]\), not numbers"),
    (lambda p, r: ["1.5", 2, 3], r"returned text .*, not numbers"),  # not read as 1.5
    (
      lambda p, r: [0.0, 1e39, 1.0],
      r"beyond float32's range \(±3\.4e38\) for 1 of 3 responses \(indices 1\)",
    ),
    (lambda p, r: [[1.0], [2.0, 3.0], [4.0]], r"returned list, not a sequence of numbers"),
    (
      lambda p, r: [0.0, float("nan"), float("inf")],
      r"non-finite scores \(NaN or inf\) for 2 of 3 responses \(indices 1, 2\)$",
    ),
  ],
)
def test_bad_return_values_are_one_line(fn, message):
  with pytest.raises(RewardError, match=message) as e:
    call_reward_fn(fn, PROMPTS, RESPONSES, name="my fn", step=7)
  assert "\n" not in str(e.value)


def test_import_errors_name_the_path(tmp_path, monkeypatch):
  (tmp_path / "broken_reward_module.py").write_text('raise RuntimeError("broken at import")\n')
  (tmp_path / "fine_reward_module.py").write_text("score = 3\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  for path, message in [
    ("no_colon", r"expected 'package\.module:function'"),
    ("no_such_module:fn", r"cannot import 'no_such_module' \(ModuleNotFoundError"),
    ("broken_reward_module:fn", r"cannot import .* \(RuntimeError: broken at import\)"),
    ("fine_reward_module:missing", r"fine_reward_module has no function 'missing'"),
    ("fine_reward_module:score", r"fine_reward_module.score is a int, not a function"),
  ]:
    with pytest.raises(RewardError, match=message):
      load_reward_fn(path)


def test_a_module_in_the_current_folder_is_found_without_pythonpath(tmp_path, monkeypatch):
  """The ``ppo-jax`` console script does not put the current folder on ``sys.path`` (``python -m``
  does); a reward module there, as the README's example has it, is still found."""
  import sys

  package = tmp_path / "cwd_rewards_pkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "rewards.py").write_text("def score(prompts, responses):\n  return [2.0] * 3\n")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
  monkeypatch.delitem(sys.modules, "cwd_rewards_pkg", raising=False)
  fn = load_reward_fn("cwd_rewards_pkg.rewards:score")
  np.testing.assert_array_equal(call_reward_fn(fn, PROMPTS, RESPONSES), 2.0)
  assert sys.path[-1] == str(tmp_path)  # last: an installed package of the same name wins
  with pytest.raises(RewardError, match=r"cannot import 'cwd_rewards_pkg.nope'.*current folder"):
    load_reward_fn("cwd_rewards_pkg.nope:score")
  # Found, but it imports a package that is missing: that package is named, no "looked in".
  (package / "needs.py").write_text("import no_such_dependency_xyz\n")
  with pytest.raises(RewardError) as e:
    load_reward_fn("cwd_rewards_pkg.needs:score")
  assert "No module named 'no_such_dependency_xyz')" in str(e.value) and "looked" not in str(
    e.value
  )


def test_the_prompt_rows_other_fields_reach_a_function_that_takes_them():
  """As TRL passes dataset columns: by name, all with **kwargs, none to a function of two."""
  columns = {"answer": ["x", "q", "z"], "level": [1, 2, 3]}
  exact = lambda prompts, responses, answer: [
    float(r == a) for r, a in zip(responses, answer, strict=True)
  ]
  np.testing.assert_array_equal(
    call_reward_fn(exact, PROMPTS, RESPONSES, columns=columns), [1.0, 0.0, 1.0]
  )
  seen = {}

  def everything(prompts, responses, **fields):
    seen.update(fields)
    return [0.0] * len(responses)

  call_reward_fn(everything, PROMPTS, RESPONSES, columns=columns)
  assert seen == columns
  # An optional field it names but the rows lack keeps its default; two texts only stay two.
  optional = lambda p, r, tolerance=0.5: [tolerance] * 3
  np.testing.assert_array_equal(call_reward_fn(optional, PROMPTS, RESPONSES, columns=columns), 0.5)
  np.testing.assert_array_equal(
    call_reward_fn(lambda p, r: [1] * 3, PROMPTS, RESPONSES, columns=columns), 1
  )
  with pytest.raises(
    RewardError,
    match=r"^my fn takes 'solution', a field the prompt rows do not have \(theirs: answer, level",
  ):
    call_reward_fn(
      lambda p, r, solution: [0] * 3, PROMPTS, RESPONSES, columns=columns, name="my fn"
    )


def test_a_required_field_some_rows_lack_is_refused_before_training():
  """The run's check (``every_row``) before any training; a batch call passes the None on."""
  from ppo_jax.rewards import fields_taken

  columns = {"answer": ["x", None, "z", None], "note": [None, None, "n", None]}
  fn = lambda prompts, responses, answer, note=None: [0.0] * len(responses)
  with pytest.raises(
    RewardError,
    match=r"^cfg takes 'answer', a field 2 of the 4 prompt rows lack \(the first: prompt row 2\); "
    "give every row one$",
  ):
    fields_taken(fn, columns, "cfg", every_row=True)
  assert fields_taken(fn, columns, "cfg") == columns  # optional 'note' may be None
  columns["answer"][1] = columns["answer"][3] = "y"
  assert fields_taken(fn, columns, "cfg", every_row=True)["answer"] == ["x", "y", "z", "y"]


def test_many_bad_scores_are_counted_and_the_first_named():
  with pytest.raises(
    RewardError, match=r"for 12 of 12 responses \(indices 0, 1, 2, 3, 4, 5, 6, 7, …\)$"
  ):
    call_reward_fn(lambda p, r: [float("nan")] * 12, ["a"] * 12, ["b"] * 12)


def test_a_function_of_the_running_notebook_or_script_is_main(monkeypatch):
  """docs/config.md: a notebook's own function is ``"__main__:fn"`` (its kernel's module)."""
  import sys

  def my_score(prompts, responses):
    return [1.0] * len(responses)

  monkeypatch.setattr(sys.modules["__main__"], "my_score", my_score, raising=False)
  assert load_reward_fn("__main__:my_score") is my_score


def test_several_functions_score_their_weighted_sum_each_with_its_own_fields():
  """``"a:f,b:g"`` with weights: Σₖ wₖ·fₖ against a float64 sum by hand; each function gets the
  fields its own signature names; a lone path without weights stays the function itself."""
  from ppo_jax.rewards import call_reward_parts, load_reward_fns

  fns = load_reward_fns(
    "reward_fns:keyed, reward_fns:words_minus_prompt,reward_fns:shortness", "0.5,-2,1e-3"
  )
  assert fns.names == ("keyed", "words_minus_prompt", "shortness")
  prompts, responses = ["a b", "c", "d e f"], ["one two three", "", "four"]
  columns = {"key": list(prompts), "other": [1, 2, 3]}  # keyed takes `key`; the others none
  words = np.array([3.0, 0.0, 1.0], np.float64)
  parts = np.stack([words, words - 0.1 * np.array([2, 1, 3]), -words], 1)
  np.testing.assert_allclose(
    call_reward_parts(fns, prompts, responses, columns=columns, name="cfg"), parts, rtol=1e-6
  )
  expected = parts @ np.array([0.5, -2.0, 1e-3])
  got = call_reward_fn(fns, prompts, responses, columns=columns)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # Without weights: a plain sum; one path: the function itself; two paths of one name: whole.
  np.testing.assert_allclose(
    call_reward_fn(
      load_reward_fns("reward_fns:keyed,reward_fns:shortness"), prompts, responses, columns=columns
    ),
    0.0,
  )
  assert load_reward_fns("reward_fns:keyed") is load_reward_fn("reward_fns:keyed")
  assert load_reward_fns("reward_fns:keyed", "2").weights == (2.0,)
  from ppo_jax.rewards import RewardSum

  same_name = RewardSum((len, len), ("a:score", "b:score"), (1.0, 1.0))
  assert same_name.names == ("a.score", "b.score")


def test_each_of_several_functions_is_checked_and_named_on_its_own():
  from ppo_jax.rewards import load_reward_fns

  fns = load_reward_fns("reward_fns:superlatives,reward_fns:raises")
  with pytest.raises(
    RewardError, match=r"^reward_fns:raises at step 4 raised RuntimeError: reward server unreach"
  ):
    call_reward_fn(fns, PROMPTS, RESPONSES, name="cfg", step=4)
  big = load_reward_fns("reward_fns:superlatives,reward_fns:superlatives_twice", "1e38,1e38")
  with pytest.raises(
    RewardError,
    match=r"^cfg at step 4: the weighted sum is beyond float32's range \(±3\.4e38\) for 1 of 2 "
    r"responses \(indices 0\)$",
  ):
    call_reward_fn(big, ["p", "q"], ["superb superb", "fine"], name="cfg", step=4)


@pytest.mark.parametrize(
  "spec,weights,message",
  [
    ("m:f,", None, r"^--reward-fn 'm:f,': an empty entry; expected 'package\.module:function"),
    ("m:f,m:f", None, r"^--reward-fn 'm:f,m:f': 'm:f' is named twice$"),
    ("m:f,m:g", "1,x", r"^--reward-weights '1,x': 'x' is not a number$"),
    ("m:f,m:g", "1,nan", r"^--reward-weights '1,nan': 'nan' is not a finite number$"),
    ("m:f,m:g", "1", r"^--reward-weights '1': 1 weight for 2 functions$"),
    ("m:f,m:g", "0, 0.0", r"^--reward-weights '0, 0.0': every weight is 0, so every score would"),
    (None, "1", r"^--reward-weights is set, but no --reward-fn to weigh$"),
  ],
)
def test_bad_lists_of_functions_and_weights_are_one_line(spec, weights, message):
  from ppo_jax.rewards import load_reward_fns, reward_problems

  with pytest.raises(RewardError, match=message):
    load_reward_fns(spec, weights, prefix="--reward-")
  assert reward_problems(spec, weights)[0].startswith("config.reward.")


def test_several_functions_from_python_take_lists_and_refuse_what_is_no_path():
  from ppo_jax.rewards import RewardSum, load_reward_fns

  fns = load_reward_fns(["reward_fns:keyed", "reward_fns:shortness"], [0.2, 1])
  assert fns.paths == ("reward_fns:keyed", "reward_fns:shortness") and fns.weights == (0.2, 1.0)
  with pytest.raises(RewardError, match=r"^config\.reward\.fn: expected 'package\.module:function"):
    load_reward_fns(len)
  with pytest.raises(ValueError, match=r"^RewardSum: 2 functions, 2 paths and 1 weights"):
    RewardSum((len, len), ("a:f", "b:g"), (1.0,))


def test_without_weights_each_function_counts_once_and_a_lone_weight_scales_its_function():
  """Two paths without weights: the plain sum of their scores (not their mean); one path with a
  weight: that multiple of its scores, not the scores as they came."""
  from ppo_jax.rewards import load_reward_fns

  prompts, responses = ["a b", "c"], ["one two three", "four"]
  columns = {"key": list(prompts)}
  # keyed: 3, 1 words; words_minus_prompt: 3 − 0.2, 1 − 0.1.
  both = load_reward_fns("reward_fns:keyed,reward_fns:words_minus_prompt")
  np.testing.assert_allclose(
    call_reward_fn(both, prompts, responses, columns=columns), [5.8, 1.9], rtol=1e-6
  )
  lone = load_reward_fns("reward_fns:keyed", "2.5")
  np.testing.assert_allclose(
    call_reward_fn(lone, prompts, responses, columns=columns), [7.5, 2.5], rtol=1e-6
  )


def test_bad_scores_of_a_slice_are_named_by_their_place_in_the_whole_batch():
  """Rows 8:11 of 20 scored in one call: the NaN at index 1 is response 9 of 20."""
  for fn in (lambda p, r: [0.0, float("nan"), 1.0], lambda p, r: [0.0, None, 1.0]):
    with pytest.raises(RewardError, match=r"for 1 of 20 responses \(indices 9\)"):
      call_reward_fn(fn, PROMPTS, RESPONSES, first=8, total=20)


def test_a_field_named_as_one_of_the_two_texts_is_not_passed_again():
  """``def score(prompt, completion, **fields)`` over rows with a ``completion`` field: the two
  texts come positionally, the row's ``completion`` is not passed a second time by name."""
  seen = {}

  def score(prompt, completion, **fields):
    seen.update(fields)
    return [0.0] * len(completion)

  columns = {"completion": ["gold"] * 3, "answer": ["x", "y", "z"]}
  np.testing.assert_array_equal(call_reward_fn(score, PROMPTS, RESPONSES, columns=columns), 0.0)
  assert seen == {"answer": ["x", "y", "z"]}
