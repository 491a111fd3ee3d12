"""micro_diffusion: diffusion transformers trained from scratch on a micro-budget."""
