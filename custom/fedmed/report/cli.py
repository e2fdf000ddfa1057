"""``python -m fedmed report PATH``: the command line around :func:`fedmed.report.build.build_report`."""

from __future__ import annotations

import sys

from fedmed.report.load import ReportError


def add_arguments(parser) -> None:
    parser.add_argument(
        "path",
        help="a `simulate --out` folder, or a folder a deployment job result was downloaded to "
        "(metrics.json / cross_site.json / baselines.json / provenance.json are searched inside it)",
    )
    parser.add_argument("--out", help="where to write the report (default: PATH/report)")


def main(args) -> int:
    from fedmed.report.build import build_report

    try:
        build_report(args.path, args.out)
    except ReportError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    return 0
