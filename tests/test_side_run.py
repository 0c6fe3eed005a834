"""The single-device files that run in a process of their own in the whole suite
(``conftest.SIDE_FILES``, ``conftest.SideRun``)."""

from conftest import SideRun


def test_side_files():
  """Started by conftest when collection selected this test, beside the tests before it; their
  tests were deselected here. Run alone (``pytest tests/test_models.py``) they run in-process."""
  passed, out = SideRun.start("side").passed()
  # Every test of the side files ran (162 when this was written: a file lost would lower it).
  assert passed >= 160, out[-2000:]
  assert "skipped" not in out and "deselected" not in out, out[-2000:]
