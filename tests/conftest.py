"""Puts tests/ on sys.path so test folders share helper modules (report_checks) without packages."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(config, items):
    """A test is in the fast tier (`pytest -m unit`) or slow (real FLARE processes, rounds of training), never both."""
    import pytest

    both = [item.nodeid for item in items if item.get_closest_marker("unit") and item.get_closest_marker("slow")]
    if both:
        raise pytest.UsageError(f"marked both unit and slow (the fast tier must stay fast): {', '.join(both)}")
