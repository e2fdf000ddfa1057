"""fedmed: federated medical-imaging training across hospitals with NVIDIA FLARE and MONAI.

Pure modules (no ``nvflare`` import): atomic, aggregation, baselines, bundle, data, networks,
privacy, provenance, report, results, site_config, tasks, training, volumes. ``fedmed.simulate``
glues them to the FLARE simulator; FLARE adapters live in ``fedmed.flare`` and ``fedmed.deploy``.
"""

__version__ = "0.1.0"
