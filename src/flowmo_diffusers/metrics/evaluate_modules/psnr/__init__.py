"""Bundled `evaluate` module `psnr`: load with `flowmo_diffusers.metrics.load_metric("psnr")`."""
