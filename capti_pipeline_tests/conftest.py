"""Shared pytest fixtures: real services (sshd, PostgreSQL) and the Capti test harness."""

pytest_plugins = [
    "capti_pipeline_tests.support.sshd",
    "capti_pipeline_tests.support.postgres",
    "capti_pipeline_tests.support.harness",
    "capti_pipeline_tests.support.operator",
]
