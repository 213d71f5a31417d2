"""Pytest plugin: s3 fixtures (placeholder until its owner fills it)."""
