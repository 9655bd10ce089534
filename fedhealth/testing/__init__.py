"""Test harnesses: real Flower processes on loopback and the compose topology run locally."""
