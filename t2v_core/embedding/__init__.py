"""TASK2VEC: probe networks and safe weights, per-filter Fisher estimators, the distances
between embeddings, and the embeddings store; two small worlds with known structure, the
unit-square toy and a synthetic zoo. Imports only ``zoo`` and ``storage``."""
