#!/usr/bin/env python
"""cxr_pneumonia_client_api: chest X-ray classification where every site runs its own PyTorch loop (FLARE Client API).

The FLARE 2.9 recipe of this job (fedmed.flare.recipes.ClientAPIFedAvgRecipe): FedAvgController on
the server as in cxr_pneumonia_fedavg, and at every site FLARE's Client API executor running
app/custom/train.py (fedmed.flare.client_api bridges its replies to the controller's contract).
The job folder beside this file is exported from it; tests/test_recipes.py checks they are equal.

    python jobs/cxr_pneumonia_client_api/job.py --export jobs/cxr_pneumonia_client_api   # rewrite the job folder
    python jobs/cxr_pneumonia_client_api/job.py --sites 2 --rounds 1                      # run it in FLARE's SimEnv
    python -m fedmed simulate --job jobs/cxr_pneumonia_client_api --set lr=0.01           # or through simulate
"""

import sys
from pathlib import Path

NAME = "cxr_pneumonia_client_api"
SCRIPT = Path(__file__).resolve().parent / "app" / "custom" / "train.py"  # the sites' training script
# FedAvgController (fedmed.flare.controller): rounds, sites, network, task, aggregation
CONTROLLER_ARGS = {
    "num_rounds": 10,
    "min_clients": 2,
    "round_timeout": 3600,
    "wait_after_min_clients": 30,
    "seed": 0,
    "job_name": NAME,
    "task": {"name": "classification", "args": {"num_classes": 2, "image_size": 28, "class_names": ["normal", "pneumonia"]}},
    "network": {"name": "small_cnn", "args": {"in_channels": 1, "num_classes": 2, "width": 16}},
}
# FedMedClientAPIExecutor (fedmed.flare.client_api): the script's settings, passed as --lr ... --seed
EXECUTOR_ARGS = {"lr": 0.003, "local_epochs": 1, "batch_size": 32, "seed": 0}
# CrossSiteEvaluation (fedmed.flare.cross_site): every model on every site's validation data
CROSS_SITE_ARGS = {"model_file": "global_model.pt", "submit_timeout": 60, "validation_timeout": 3600}


def build_recipe(controller_overrides: dict | None = None):
    from fedmed.flare.recipes import ClientAPIFedAvgRecipe

    controller_args = {**CONTROLLER_ARGS, **(controller_overrides or {})}
    return ClientAPIFedAvgRecipe(name=NAME, script=str(SCRIPT), controller_args=controller_args,
                                 executor_args=EXECUTOR_ARGS, cross_site_args=CROSS_SITE_ARGS)


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.argv[1:] = []  # FLARE's recipe module strips --export from sys.argv on import: parse ours first
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
    from fedmed.flare.recipes import run_job_script

    sys.exit(run_job_script(build_recipe, argv, __doc__.splitlines()[0]))
