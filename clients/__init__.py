"""The hospital's Flower ClientApp (wiring only; the logic lives in ``fedhealth``)."""
