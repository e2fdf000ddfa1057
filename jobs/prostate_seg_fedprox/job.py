#!/usr/bin/env python
"""prostate_seg_fedprox: Prostate MRI segmentation (3D MONAI UNet, Dice), FedProx at the sites (fedprox_mu > 0).

This job's spec (fedmed.jobspec): prostate_seg_fedavg's, with the FedProx term at the sites. The job folder
beside this file is written from it by the one writer; tests/test_recipes.py checks they are equal.

    python jobs/prostate_seg_fedprox/job.py --sites 2 --rounds 1                 # run it in FLARE's SimEnv, as simulate does
    python jobs/prostate_seg_fedprox/job.py --export jobs/prostate_seg_fedprox   # rewrite the job folder after editing SPEC
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
from fedmed.jobspec import fedavg_job  # noqa: E402

import runpy  # noqa: E402

FEDAVG = runpy.run_path(str(Path(__file__).resolve().parents[1] / "prostate_seg_fedavg" / "job.py"))["SPEC"]
SPEC = fedavg_job("prostate_seg_fedprox", controller={**FEDAVG.controller, "job_name": "prostate_seg_fedprox"},
                  executor={**FEDAVG.executor, "fedprox_mu": 0.01})  # same task, network, aggregation; FedProx at the sites

if __name__ == "__main__":
    argv, sys.argv[1:] = sys.argv[1:], []  # FLARE's recipe module strips --export from sys.argv on import
    from fedmed.flare.recipes import run_job_script

    sys.exit(run_job_script(SPEC, argv, __doc__.splitlines()[0]))
