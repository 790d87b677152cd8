"""Fusion policies: one module per algorithm, the shared interface in `base`, the loop in `train`."""
