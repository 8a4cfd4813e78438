"""Pipelines built from the stages: the online loop (`iterate`) and the embedded demos."""
