"""Dagster objects only; each module composes functions from capti_pipeline.lib."""
