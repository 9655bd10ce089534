"""The hospital's long-running side: site daemon, paced SuperNode, warm ClientApp executor."""
