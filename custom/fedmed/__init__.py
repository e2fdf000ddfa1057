"""fedmed: federated medical-imaging training across hospitals with NVIDIA FLARE and MONAI.

Pure modules (no ``nvflare`` import): atomic, aggregation, attacks, baselines, bundle, data, networks,
privacy, provenance, report, results, rounds, server_optim, site_config, tasks, training, volumes. ``fedmed.simulate``
glues them to the FLARE simulator; FLARE adapters live in ``fedmed.flare`` and ``fedmed.deploy``.
"""

__version__ = "0.1.0"
