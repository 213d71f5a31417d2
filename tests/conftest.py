"""Shared pytest configuration: fixtures live in tests/plugins/ (one module per real service)."""

pytest_plugins = [
    "tests.plugins.s3",
    "tests.plugins.tinymodel",
    "tests.plugins.kube",
    "tests.plugins.cluster",
    "tests.plugins.prometheus",
]
