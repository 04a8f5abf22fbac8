"""Ray entrypoints: each module parses arguments, fans work out and calls ``t2v_core``."""
