"""Networks: MicroDiT (dit.py), its layers (layers.py), autoencoders, and the Composer wrapper (model.py)."""
