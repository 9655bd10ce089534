"""Security: update validation (later: certificates, enrollment, secure aggregation)."""
