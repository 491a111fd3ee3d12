"""EDM diffusion: preconditioning, noise sampling, losses (edm.py) and samplers (samplers.py). No Composer."""
