"""Bundled `evaluate` module `rfid`: load with `flowmo_diffusers.metrics.load_metric("rfid")`."""
