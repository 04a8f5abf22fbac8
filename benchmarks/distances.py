"""Pairwise distances of 1,460 ResNet-34-sized embeddings: vectorized matrices vs a Python loop.

The loop is timed on a subset of pairs and extrapolated to the full 1,460 × 1,460 matrix.

    python -m benchmarks.distances [--tasks 1460] [--dim 8512]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from benchmarks.common import report, timed
from t2v_core.embedding.distance import cosine, d_asym, d_sym, normalized_cosine


def _loop_d_sym(emb: np.ndarray) -> np.ndarray:
    n = len(emb)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            a, b = emb[i], emb[j]
            u, v = a / (a + b), b / (a + b)
            out[i, j] = 1 - u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1460)
    parser.add_argument("--dim", type=int, default=8512)
    parser.add_argument("--loop-tasks", type=int, default=40)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rng = np.random.default_rng(0)
    emb = rng.gamma(0.5, 1.0, size=(args.tasks, args.dim)).astype(np.float32) + 1e-8
    pairs = args.tasks**2
    t_loop, ref = timed(_loop_d_sym, emb[: args.loop_tasks])
    loop_full = t_loop * pairs / args.loop_tasks**2
    sub = np.asarray(d_sym(emb[: args.loop_tasks]))
    np.fill_diagonal(ref, 0)
    rows = [{"distance": "d_sym (python loop, extrapolated)", "seconds": loop_full,
             "speedup_vs_loop": 1.0, "max_abs_diff": float(np.abs(sub - ref).max())}]
    for name, fn in (("d_sym", d_sym), ("d_asym", d_asym), ("cosine", cosine),
                     ("normalized_cosine", normalized_cosine)):
        t, _ = timed(fn, emb)
        rows.append({"distance": name, "seconds": t, "speedup_vs_loop": loop_full / t,
                     "max_abs_diff": float("nan")})
    report("distances", rows, {"tasks": args.tasks, "dim": args.dim, "loop_tasks": args.loop_tasks})


if __name__ == "__main__":
    main()
