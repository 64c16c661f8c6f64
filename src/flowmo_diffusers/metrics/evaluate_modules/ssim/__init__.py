"""Bundled `evaluate` module `ssim`: load with `flowmo_diffusers.metrics.load_metric("ssim")`."""
