"""What reviewers see: MLflow tracking helpers, plots, and the registered pyfunc
recommender. The top of the stack: nothing in ``t2v_core`` imports it."""
