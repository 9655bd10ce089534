"""The coordinator's Flower ServerApp (wiring only; the logic lives in ``fedhealth``)."""
