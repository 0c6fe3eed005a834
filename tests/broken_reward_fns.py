"""A reward module whose own code fails at import (tests/test_pipeline.py expects one line)."""

raise RuntimeError("reward module broken at import")
