#!/usr/bin/env python
"""prostate_seg_fedavg: Prostate MRI segmentation (3D MONAI UNet, Dice), FedAvg.

The FLARE 2.9 recipe of this job (fedmed.flare.recipes.SegmentationFedAvgRecipe). The job folder beside this
file (meta.json, app/config/) is exported from it; tests/test_recipes.py checks they are equal.

    python jobs/prostate_seg_fedavg/job.py --export jobs/prostate_seg_fedavg   # rewrite the job folder from the settings below
    python jobs/prostate_seg_fedavg/job.py --sites 2 --rounds 1   # run it in FLARE's SimEnv (workspace under runs/)
    python jobs/prostate_seg_fedavg/job.py --env prod --startup-kit KIT   # submit to a running deployment (admin kit)

Change a setting here, then export; ``python -m fedmed simulate --job jobs/prostate_seg_fedavg --set KEY=VALUE``
overrides one for a single simulated run without editing anything.
"""

import sys
from pathlib import Path

NAME = "prostate_seg_fedavg"
# FedAvgController (fedmed.flare.controller): rounds, sites, network, task, aggregation
CONTROLLER_ARGS = {   'num_rounds': 10,
    'min_clients': 2,
    'round_timeout': 3600,
    'wait_after_min_clients': 30,
    'seed': 0,
    'job_name': 'prostate_seg_fedavg',
    'aggregation': {'name': 'geometric_median', 'args': {'f': 'auto', 'norm_multiplier': 2.0}},
    'task': {   'name': 'segmentation',
                'args': {   'spatial_dims': 3,
                            'in_channels': 1,
                            'num_classes': 2,
                            'class_names': ['background', 'prostate'],
                            'roi_size': [32, 32, 32],
                            'pixdim': [1.0, 1.0, 1.0],
                            'orientation': 'RAS',
                            'crop_samples': 2,
                            'sw_batch_size': 4,
                            'sw_overlap': 0.25,
                            'modality': 'MR'}},
    'network': {   'name': 'unet',
                   'args': {   'spatial_dims': 3,
                               'in_channels': 1,
                               'out_channels': 2,
                               'channels': [8, 16, 32, 64],
                               'strides': [2, 2, 2],
                               'num_res_units': 1,
                               'norm': 'instance'}}}
# FedMedExecutor (fedmed.flare.executor) at every site: the local training settings
EXECUTOR_ARGS = {'local_epochs': 2, 'lr': 0.01, 'batch_size': 2, 'fedprox_mu': 0.0, 'seed': 0, 'lr_schedule': 'cosine'}
# CrossSiteEvaluation (fedmed.flare.cross_site): every model on every site's validation data
CROSS_SITE_ARGS = {'model_file': 'global_model.pt', 'submit_timeout': 60, 'validation_timeout': 3600}
MIN_CLIENTS = 2
META = {}


def build_recipe(controller_overrides: dict | None = None):
    from fedmed.flare.recipes import SegmentationFedAvgRecipe

    controller_args = {**CONTROLLER_ARGS, **(controller_overrides or {})}
    return SegmentationFedAvgRecipe(name=NAME, controller_args=controller_args, executor_args=EXECUTOR_ARGS,
                        cross_site_args=CROSS_SITE_ARGS, min_clients=controller_args.get("min_clients", MIN_CLIENTS), meta=META or None)


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.argv[1:] = []  # FLARE's recipe module strips --export from sys.argv on import: parse ours first
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
    from fedmed.flare.recipes import run_job_script

    sys.exit(run_job_script(build_recipe, argv, __doc__.splitlines()[0]))
