"""The ServerApp: guarded strategy, reply polling, secure-aggregation grid, run config."""
