"""Print cluster/runtime_env.yaml as JSON for `ray job submit --runtime-env-json`, with the
variables named by --pass copied in from this shell.

Ray's runtime_env takes literal values, so credentials cannot sit in the YAML as references;
this passes them by name instead of pasting them into a file. The values travel with the job
and the Ray dashboard shows them: prefer the cluster's IAM role or Kubernetes Secret.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

DEFAULT = Path(__file__).with_name("runtime_env.yaml")


def runtime_env(path: Path, passed: list[str], environ: dict[str, str]) -> dict:
    """The runtime_env of ``path`` with ``environ``'s values of ``passed`` in its env_vars."""
    missing = [name for name in passed if name not in environ]
    if missing:
        raise KeyError(f"not set in this shell: {', '.join(missing)}")
    env = yaml.safe_load(path.read_text())
    env["env_vars"] = {**env.get("env_vars", {}), **{name: environ[name] for name in passed}}
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFAULT, help=f"default: {DEFAULT}")
    parser.add_argument("--pass", dest="passed", action="append", default=[], metavar="NAME",
                        help="a variable of this shell to pass to the job (repeatable)")
    args = parser.parse_args(argv)
    try:
        env = runtime_env(args.file, args.passed, dict(os.environ))
    except KeyError as exc:
        print(f"runtime_env.py: {exc.args[0]}", file=sys.stderr)
        return 2
    if args.passed:
        print(f"runtime_env.py: passing {', '.join(args.passed)} (shown in the Ray dashboard)",
              file=sys.stderr)
    print(json.dumps(env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
