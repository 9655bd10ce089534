"""The Hydra configs, shipped in the wheel as ``fedhealth.configs`` (``configs/`` in the source tree)."""
