"""Frozen encoders: images <-> latents (vae.py) and captions -> token states (text.py)."""
