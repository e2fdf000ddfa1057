"""Checks shared by the tests that build a report: report.html is self-contained and its links resolve."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [value for key, value in attrs if key in ("src", "href") and value]


def check_report_links(report_dir: Path) -> tuple[int, list[str]]:
    """Assert that report.html embeds its PNGs, references no remote resource and links only existing
    files, and that report.md's images exist. Returns (number of embedded PNGs, local links)."""
    parser = _Refs()
    parser.feed((report_dir / "report.html").read_text())
    images = [r for r in parser.refs if r.startswith("data:image/png;base64,")]
    for ref in images:
        assert base64.b64decode(ref.split(",", 1)[1])[:4] == b"\x89PNG", "an embedded image is not a PNG"
    files = [r for r in parser.refs if not r.startswith(("data:", "#"))]
    for ref in files:
        assert not re.match(r"^[a-z]+://", ref), f"report.html references a remote resource {ref}"
        assert (report_dir / ref).is_file(), f"report.html references {ref}, which does not exist"
    for ref in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (report_dir / "report.md").read_text()):
        assert (report_dir / ref).is_file(), f"report.md shows {ref}, which does not exist"
    return len(images), files
