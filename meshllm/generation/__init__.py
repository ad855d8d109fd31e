"""Sampling and the decode loop shared by every backend."""
