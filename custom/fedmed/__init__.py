"""fedmed: federated medical-imaging training across hospitals with NVIDIA FLARE and MONAI.

Pure modules (no ``nvflare`` import): data, site_config, networks, tasks, training, aggregation,
bundle, report, provenance, privacy. FLARE adapters live in ``fedmed.flare`` and ``fedmed.deploy``.
"""

__version__ = "0.1.0"
