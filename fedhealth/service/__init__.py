"""Long-running services: the hospital's site daemon and the consortium's coordinator."""
