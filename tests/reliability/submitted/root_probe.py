"""Entrypoint submitted by tests/reliability/test_submit.py: parse --root as every job does
(the root option of jobs._cli.CommonOptions), then write a marker under it and print where it
went."""

import argparse

from jobs._cli import CommonOptions, add_options
from t2v_core.storage import StorageRoot

parser = argparse.ArgumentParser(prog="root_probe")
add_options(parser, CommonOptions)
args = parser.parse_args()
print("marker written to", StorageRoot(args.root).write_bytes_atomic("probe/marker.txt", b"ok"))
