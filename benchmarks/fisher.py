"""Per-filter Fisher of ResNet-18 at 32 px on CPU: the hook engine vs a naive per-sample loop.

Both are measured in the same run on the same images and labels. The naive loop does one
forward and one backward per sample (and per class for the expected Fisher) and squares
autograd's parameter gradients; the engine does one batched backward per label drawn.

    python -m benchmarks.fisher [--images 512] [--classes 10]
"""

from __future__ import annotations

import argparse
import copy
import logging

import numpy as np
import torch

from benchmarks.common import report, timed
from t2v_core.embedding.fisher import fit_head, per_filter_fisher, per_filter_fisher_naive
from t2v_core.embedding.probes import build_probe, extract_features


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--expected-images", type=int, default=64,
                        help="images for the (C× costlier) expected-Fisher comparison")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    probe = build_probe("resnet18", seed=0)
    images = torch.randn(args.images, 3, args.size, args.size)
    labels = torch.randint(0, args.classes, (args.images,))
    head = fit_head(extract_features(probe.backbone, images), labels, args.classes)
    bb, n, ne = probe.backbone, args.images, args.expected_images

    rows = []
    for method, count in (("empirical", n), ("expected", ne)):
        x, y = images[:count], labels[:count]
        t_fast, fast = timed(per_filter_fisher, bb, head, x, y, method=method,
                             batch_size=args.batch_size)
        t_naive, naive = timed(per_filter_fisher_naive, bb, head, x, y, method=method)
        rel = float(np.abs(fast - naive).max() / np.abs(naive).max())
        rows.append({"method": method, "images": count, "engine_ms_per_image": 1e3 * t_fast / count,
                     "naive_ms_per_image": 1e3 * t_naive / count, "speedup": t_naive / t_fast,
                     "max_rel_diff": rel})
    # float32 forwards of a batch and of a single image round differently, and a confident
    # head amplifies that in 1 − p_y; in float64 the two computations must agree exactly.
    c64 = min(32, n)
    x64, y64 = images[:c64].double(), labels[:c64]
    bb64, head64 = copy.deepcopy(bb).double(), copy.deepcopy(head).double()
    t_fast, fast = timed(per_filter_fisher, bb64, head64, x64, y64, method="empirical",
                         batch_size=args.batch_size)
    t_naive, naive = timed(per_filter_fisher_naive, bb64, head64, x64, y64, method="empirical")
    rows.append({"method": "empirical (float64)", "images": c64,
                 "engine_ms_per_image": 1e3 * t_fast / c64, "naive_ms_per_image": 1e3 * t_naive / c64,
                 "speedup": t_naive / t_fast,
                 "max_rel_diff": float(np.abs(fast - naive).max() / np.abs(naive).max())})
    t_mc, _ = timed(per_filter_fisher, bb, head, images, labels, method="montecarlo",
                    batch_size=args.batch_size)
    t_floor, _ = timed(_forward_backward, bb, head, images, labels, args.batch_size)
    rows.append({"method": "montecarlo", "images": n, "engine_ms_per_image": 1e3 * t_mc / n,
                 "naive_ms_per_image": float("nan"), "speedup": float("nan"),
                 "max_rel_diff": float("nan")})
    rows.append({"method": "plain fwd+bwd (floor)", "images": n,
                 "engine_ms_per_image": 1e3 * t_floor / n, "naive_ms_per_image": float("nan"),
                 "speedup": float("nan"), "max_rel_diff": float("nan")})
    report("fisher", rows, {"arch": "resnet18", "size": args.size, "classes": args.classes,
                            "batch_size": args.batch_size, "goal": "speedup >= 5; max_rel_diff <= 1e-5 in float64 "
                            "(float32 differs by batch-size rounding of the forward pass)"})


def _forward_backward(backbone, head, images, labels, batch_size):
    """One ordinary batched forward+backward over all parameters: the cost floor."""
    params = [p for p in backbone.parameters()]
    for p in params:
        p.requires_grad_(True)
    try:
        for i in range(0, len(images), batch_size):
            loss = torch.nn.functional.cross_entropy(head(backbone(images[i:i + batch_size])),
                                                     labels[i:i + batch_size])
            torch.autograd.grad(loss, params)
    finally:
        for p in params:
            p.requires_grad_(False)


if __name__ == "__main__":
    main()
