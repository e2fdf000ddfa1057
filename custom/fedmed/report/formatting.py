"""How the report writes numbers (shared by :mod:`fedmed.report.render` and :mod:`fedmed.report.plot`).

Pure module: never imports ``nvflare``.
"""

from __future__ import annotations

import math
from typing import Any


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return "n/a" if value is None else str(value)


def pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:+.1f}%"


def f3(value: float | None) -> str:
    """Verdict numbers: three decimals, so differences of a few thousandths are still visible."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
