"""Entrypoint submitted by tests/reliability/test_submit.py: parse --root as every job does
(jobs._cli.add_common_args), then write a marker under it and print where it went."""

import argparse

from jobs._cli import add_common_args
from t2v_core.storage import StorageRoot

parser = argparse.ArgumentParser(prog="root_probe")
add_common_args(parser)
args = parser.parse_args()
print("marker written to", StorageRoot(args.root).write_bytes_atomic("probe/marker.txt", b"ok"))
