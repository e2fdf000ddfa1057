"""``python -m fedmed results DOWNLOAD --out DIR``: a downloaded deployment job result -> what ``simulate`` writes.

``DOWNLOAD`` is what ``nvflare job download JOB_ID -o DIR`` wrote (``DIR/JOB_ID``), what the admin
console's ``download_job JOB_ID`` saved (the admin kit's ``transfer/JOB_ID``), or any folder inside
it. Writes ``OUT/bundle/``, ``OUT/models/``, ``OUT/metrics.json``, ``OUT/cross_site.json``,
``OUT/provenance.json``, ``OUT/run_config.json``, ``OUT/tb_events/`` and ``OUT/report/`` with the
same code as ``simulate`` (:func:`fedmed.results.export_run_outputs`, :func:`fedmed.report.build_report`).

Exit codes: 0 written; 1 the job did not finish (the reason: job status, the run's recorded error,
deployment detail, the server log's last errors); 2 not a job result, or ``--out`` not empty.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("download", help="the downloaded job result (DIR/JOB_ID from `nvflare job download`, the admin "
                        "kit's transfer/JOB_ID from the console's download_job), or any folder inside it")
    parser.add_argument("--out", required=True, help="output folder (bundle/, metrics.json, cross_site.json, "
                        "provenance.json, report/ ...)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--no-report", action="store_true", help="skip report/ (bundle, models and metrics only)")


def main(args: argparse.Namespace) -> int:
    from fedmed.results import ResultsError, locate_job_result, unfinished_reason

    try:
        result = locate_job_result(args.download)
    except ResultsError as exc:
        print(f"results: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.force:
            print(f"results: output folder {out} is not empty; choose another --out or pass --force", file=sys.stderr)
            return 2
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    where = f"job {result.job_id}" + (f" ({result.status})" if result.status else "")
    reason = unfinished_reason(result)
    if reason:
        print(f"results: {where} has no finished model: {reason}", file=sys.stderr)
        return 1
    print(f"results: {where} from {result.app_dir}", flush=True)
    from fedmed.report import build_report
    from fedmed.results import export_run_outputs

    try:
        metrics = export_run_outputs(result.app_dir, out,
                                     result.workspace / "tb_events" if result.workspace else None)
    except ResultsError as exc:
        print(f"results: {exc}", file=sys.stderr)
        return 1
    final = (metrics.get("evaluations") or [{}])[-1]
    key = metrics.get("key_metric", "val_auc")
    score = final.get("mean_" + key)
    print(f"  {len(metrics.get('sites', []))} sites, {metrics.get('num_rounds')} rounds; final global model mean "
          f"validation {key} {score if score is None else round(score, 4)}", flush=True)
    print(f"  bundle: {out / 'bundle'}", flush=True)
    if not args.no_report:
        build_report(out, log=lambda line: print("  " + line, flush=True))
        print(f"  report: {out / 'report' / 'report.html'}", flush=True)
    from fedmed.provenance import signing_note

    print(f"  provenance card: {out / 'provenance.json'} (python -m fedmed verify-provenance {out}; "
          f"{signing_note(out / 'provenance.json')})", flush=True)
    return 0
