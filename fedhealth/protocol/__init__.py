"""The coordinator <-> site contract, torch-free: keys, packing, error replies."""
