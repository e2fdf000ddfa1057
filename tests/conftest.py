"""Puts tests/ on sys.path so test folders share helper modules (report_checks) without packages."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
