"""TASK2VEC: probe networks and safe weights, per-filter Fisher estimators, the distances
between embeddings, and the embeddings store. Imports only ``zoo`` and ``storage``."""
