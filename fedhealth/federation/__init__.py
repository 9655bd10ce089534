"""Flower glue shared by the coordinator and the sites."""
