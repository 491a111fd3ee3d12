"""Readers yielding (image, caption, label) records."""
