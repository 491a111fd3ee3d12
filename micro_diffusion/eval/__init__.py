"""Evaluation: feature extractors, Frechet distance, KID, CLIP score, shapes score."""
