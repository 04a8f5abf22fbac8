"""Fixtures of the reliability tests: ``ray_head``, a real Ray head on 127.0.0.1 (see
:mod:`ray_cluster`)."""

from ray_cluster import ray_head  # noqa: F401  (a fixture, found here by pytest)
