#!/usr/bin/env python
"""cxr_pneumonia_client_api: chest X-ray classification where every site runs its own PyTorch loop (FLARE Client API).

This job's spec (fedmed.jobspec): FedAvgController on the server as in cxr_pneumonia_fedavg, and at every site
FLARE's Client API executor running app/custom/train.py (fedmed.flare.client_api bridges its replies to the
controller's contract). The job folder beside this file is written from it; tests/test_recipes.py checks they are equal.

    python jobs/cxr_pneumonia_client_api/job.py --sites 2 --rounds 1                     # run it in FLARE's SimEnv
    python jobs/cxr_pneumonia_client_api/job.py --export jobs/cxr_pneumonia_client_api   # rewrite the job folder
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
from fedmed.jobspec import CLIENT_API_EXECUTOR_PATH, fedavg_job  # noqa: E402

SPEC = fedavg_job(
    "cxr_pneumonia_client_api",
    controller={"num_rounds": 10, "min_clients": 2, "round_timeout": 3600, "wait_after_min_clients": 30, "seed": 0,
                "job_name": "cxr_pneumonia_client_api",
                "task": {"name": "classification", "args": {"num_classes": 2, "image_size": 28, "class_names": ["normal", "pneumonia"]}},
                "network": {"name": "small_cnn", "args": {"in_channels": 1, "num_classes": 2, "width": 16}}},
    # fedmed.flare.client_api.FedMedClientAPIExecutor: the script's settings, passed as --lr ... --seed
    executor={"lr": 0.003, "local_epochs": 1, "batch_size": 32, "seed": 0},
    executor_path=CLIENT_API_EXECUTOR_PATH, script=str(Path(__file__).resolve().parent / "app" / "custom" / "train.py"),
)

if __name__ == "__main__":
    argv, sys.argv[1:] = sys.argv[1:], []  # FLARE's recipe module strips --export from sys.argv on import
    from fedmed.flare.recipes import run_job_script

    sys.exit(run_job_script(SPEC, argv, __doc__.splitlines()[0]))
