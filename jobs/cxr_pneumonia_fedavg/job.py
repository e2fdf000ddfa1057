#!/usr/bin/env python
"""cxr_pneumonia_fedavg: Chest X-ray pneumonia classification, FedAvg (CNN on 28x28; MONAI networks: --set network=...).

This job's spec (fedmed.jobspec). The job folder beside this file (meta.json, app/config/) is written from it
by the one writer; tests/test_recipes.py checks they are equal.

    python jobs/cxr_pneumonia_fedavg/job.py                                    # run it in FLARE's SimEnv, as simulate does
    python jobs/cxr_pneumonia_fedavg/job.py --sites 2 --rounds 1 --set lr=0.01 # simulate's options
    python jobs/cxr_pneumonia_fedavg/job.py --export jobs/cxr_pneumonia_fedavg # rewrite the job folder after editing SPEC
    python jobs/cxr_pneumonia_fedavg/job.py --env prod --startup-kit KIT       # submit to a running deployment (admin kit)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
from fedmed.jobspec import fedavg_job  # noqa: E402

AUGMENTATION = {"prob": 0.5, "rotate_degrees": 10, "scale": 0.1, "translate": 0.08, "gamma": [0.7, 1.5],
                "intensity_scale": 0.1, "intensity_shift": 0.05, "noise_std": 0.02}
SPEC = fedavg_job(
    "cxr_pneumonia_fedavg",
    controller={  # fedmed.flare.controller.FedAvgController: rounds, sites, network, task, aggregation
        "num_rounds": 20, "min_clients": 2, "round_timeout": 3600, "wait_after_min_clients": 30, "seed": 0,
        "job_name": "cxr_pneumonia_fedavg",
        "aggregation": {"name": "geometric_median", "args": {"f": "auto", "norm_multiplier": 2.0}},
        "task": {"name": "classification", "args": {"num_classes": 2, "image_size": 28, "class_names": ["normal", "pneumonia"],
                                                    "augmentation": AUGMENTATION}},
        "network": {"name": "cxr_cnn", "args": {"in_channels": 1, "num_classes": 2, "channels": [32, 64, 128]}},
    },
    # fedmed.flare.executor.FedMedExecutor at every site: the local training settings
    executor={"local_epochs": 1, "lr": 0.003, "batch_size": 32, "fedprox_mu": 0.0, "seed": 0, "lr_schedule": "cosine",
              "min_local_steps": 16},
)

if __name__ == "__main__":
    argv, sys.argv[1:] = sys.argv[1:], []  # FLARE's recipe module strips --export from sys.argv on import
    from fedmed.flare.recipes import run_job_script

    sys.exit(run_job_script(SPEC, argv, __doc__.splitlines()[0]))
