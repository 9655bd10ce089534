"""Model factory over MONAI networks."""

from fedhealth.models.factory import DP_READY, build_model, check_dp_compatible

__all__ = ["DP_READY", "build_model", "check_dp_compatible"]
