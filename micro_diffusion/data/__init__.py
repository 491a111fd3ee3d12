"""Data: sources -> raw MDS (convert.py) -> latent MDS (precompute.py) -> training loader (loader.py)."""
