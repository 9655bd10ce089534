"""The Hydra configs, shipped in the wheel as ``fedhealth.configs``."""
