"""Pytest plugin: kube fixtures (placeholder until its owner fills it)."""
