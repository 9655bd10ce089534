"""Site data: synthetic cohorts on disk and loading a site through its ``dataset.json``."""
