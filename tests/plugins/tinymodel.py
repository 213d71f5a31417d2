"""Pytest plugin: tinymodel fixtures (placeholder until its owner fills it)."""
