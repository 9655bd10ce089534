"""fedhealth: federated MRI segmentation across hospitals with Flower, MONAI and Opacus."""

__version__ = "0.1.0"
