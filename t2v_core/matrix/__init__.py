"""The task × expert performance matrix: experts, cached features, fine-tuning and probe
heads, and the matrix rows. Imports only ``embedding``, ``zoo`` and ``storage``."""
