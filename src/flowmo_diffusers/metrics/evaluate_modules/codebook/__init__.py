"""Bundled `evaluate` module `codebook`: load with `flowmo_diffusers.metrics.load_metric("codebook")`."""
