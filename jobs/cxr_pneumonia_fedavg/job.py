#!/usr/bin/env python
"""cxr_pneumonia_fedavg: Chest X-ray pneumonia classification, FedAvg (small CNN on 28x28; MONAI networks: simulate --set network=...).

The FLARE 2.9 recipe of this job (fedmed.flare.recipes.ClassificationFedAvgRecipe). The job folder beside this
file (meta.json, app/config/) is exported from it; tests/test_recipes.py checks they are equal.

    python jobs/cxr_pneumonia_fedavg/job.py --export jobs/cxr_pneumonia_fedavg   # rewrite the job folder from the settings below
    python jobs/cxr_pneumonia_fedavg/job.py --sites 2 --rounds 1   # run it in FLARE's SimEnv (workspace under runs/)
    python jobs/cxr_pneumonia_fedavg/job.py --env prod --startup-kit KIT   # submit to a running deployment (admin kit)

Change a setting here, then export; ``python -m fedmed simulate --job jobs/cxr_pneumonia_fedavg --set KEY=VALUE``
overrides one for a single simulated run without editing anything.
"""

import sys
from pathlib import Path

NAME = "cxr_pneumonia_fedavg"
# FedAvgController (fedmed.flare.controller): rounds, sites, network, task, aggregation
CONTROLLER_ARGS = {   'num_rounds': 20,
    'min_clients': 2,
    'round_timeout': 3600,
    'wait_after_min_clients': 30,
    'seed': 0,
    'job_name': 'cxr_pneumonia_fedavg',
    'aggregation': {'name': 'geometric_median', 'args': {'f': 'auto', 'norm_multiplier': 2.0}},
    'task': {   'name': 'classification',
                'args': {   'num_classes': 2,
                            'image_size': 28,
                            'class_names': ['normal', 'pneumonia'],
                            'augmentation': {   'prob': 0.5,
                                                'rotate_degrees': 10,
                                                'scale': 0.1,
                                                'translate': 0.08,
                                                'gamma': [0.7, 1.5],
                                                'intensity_scale': 0.1,
                                                'intensity_shift': 0.05,
                                                'noise_std': 0.02}}},
    'network': {'name': 'cxr_cnn', 'args': {'in_channels': 1, 'num_classes': 2, 'channels': [32, 64, 128]}}}
# FedMedExecutor (fedmed.flare.executor) at every site: the local training settings
EXECUTOR_ARGS = {'local_epochs': 1, 'lr': 0.003, 'batch_size': 32, 'fedprox_mu': 0.0, 'seed': 0, 'lr_schedule': 'cosine'}
# CrossSiteEvaluation (fedmed.flare.cross_site): every model on every site's validation data
CROSS_SITE_ARGS = {'model_file': 'global_model.pt', 'submit_timeout': 60, 'validation_timeout': 3600}
MIN_CLIENTS = 2
META = {}


def build_recipe(controller_overrides: dict | None = None):
    from fedmed.flare.recipes import ClassificationFedAvgRecipe

    controller_args = {**CONTROLLER_ARGS, **(controller_overrides or {})}
    return ClassificationFedAvgRecipe(name=NAME, controller_args=controller_args, executor_args=EXECUTOR_ARGS,
                        cross_site_args=CROSS_SITE_ARGS, min_clients=controller_args.get("min_clients", MIN_CLIENTS), meta=META or None)


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.argv[1:] = []  # FLARE's recipe module strips --export from sys.argv on import: parse ours first
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
    from fedmed.flare.recipes import run_job_script

    sys.exit(run_job_script(build_recipe, argv, __doc__.splitlines()[0]))
