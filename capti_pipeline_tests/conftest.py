"""Shared pytest fixtures; real services (sshd, PostgreSQL) live in support/ modules."""

pytest_plugins = [
    "capti_pipeline_tests.support.sshd",
    "capti_pipeline_tests.support.postgres",
]
