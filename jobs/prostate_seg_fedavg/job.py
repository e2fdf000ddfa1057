#!/usr/bin/env python
"""prostate_seg_fedavg: Prostate MRI segmentation (3D MONAI UNet, Dice), FedAvg.

This job's spec (fedmed.jobspec). The job folder beside this file (meta.json, app/config/) is written from it
by the one writer; tests/test_recipes.py checks they are equal.

    python jobs/prostate_seg_fedavg/job.py --sites 2 --rounds 1                # run it in FLARE's SimEnv, as simulate does
    python jobs/prostate_seg_fedavg/job.py --export jobs/prostate_seg_fedavg   # rewrite the job folder after editing SPEC
    python jobs/prostate_seg_fedavg/job.py --env prod --startup-kit KIT        # submit to a running deployment (admin kit)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
from fedmed.jobspec import fedavg_job  # noqa: E402

TASK = {"name": "segmentation", "args": {"spatial_dims": 3, "in_channels": 1, "num_classes": 2,
                                         "class_names": ["background", "prostate"], "roi_size": [32, 32, 32],
                                         "pixdim": [1.0, 1.0, 1.0], "orientation": "RAS", "crop_samples": 2,
                                         "sw_batch_size": 4, "sw_overlap": 0.25, "modality": "MR"}}
UNET = {"name": "unet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32, 64],
                                 "strides": [2, 2, 2], "num_res_units": 1, "norm": "instance"}}
CONTROLLER = {"num_rounds": 10, "min_clients": 2, "round_timeout": 3600, "wait_after_min_clients": 30, "seed": 0,
              "job_name": "prostate_seg_fedavg",
              "aggregation": {"name": "geometric_median", "args": {"f": "auto", "norm_multiplier": 2.0}},
              "task": TASK, "network": UNET}
SPEC = fedavg_job("prostate_seg_fedavg", controller=CONTROLLER,
                  executor={"local_epochs": 2, "lr": 0.01, "batch_size": 2, "fedprox_mu": 0.0, "seed": 0, "lr_schedule": "cosine"})

if __name__ == "__main__":
    argv, sys.argv[1:] = sys.argv[1:], []  # FLARE's recipe module strips --export from sys.argv on import
    from fedmed.flare.recipes import run_job_script

    sys.exit(run_job_script(SPEC, argv, __doc__.splitlines()[0]))
