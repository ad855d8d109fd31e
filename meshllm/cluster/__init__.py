"""Cluster logic, pure: planning the split, electing the hub."""
