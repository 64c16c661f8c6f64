"""Bundled `evaluate` module `lpips`: load with `flowmo_diffusers.metrics.load_metric("lpips")`."""
