"""Bundled Hugging Face `evaluate` metric scripts, one directory per metric.

They are packages only so that setuptools ships them with flowmo_diffusers; load them with
`flowmo_diffusers.metrics.load_metric(name)` or `evaluate.load(<directory>)`, not by import.
"""
