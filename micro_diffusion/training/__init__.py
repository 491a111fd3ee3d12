"""Composer-side training pieces: callbacks and optimiser/schedule construction."""
