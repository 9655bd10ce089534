"""Security: consortium certificates, SecAgg+ secure aggregation, validation of sites' replies."""
