"""task2vec-zoo core library: TASK2VEC embeddings, distances and expert recommendation.

Pure library: numpy, torch and pyarrow in and out; no Ray, no MLflow server, no global state.
"""

__version__ = "0.1.0"
