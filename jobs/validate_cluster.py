"""Check a Ray cluster-launcher file offline, before `ray up` (which needs AWS to find most mistakes).

    python jobs/validate_cluster.py cluster.yaml

Prints "ok" when the file passes Ray's schema, Ray's own config validation and the project's rules; otherwise one
"error:" line naming the file, the key and the problem (exit status 2, as every command: README, "Exit status").
"""

from __future__ import annotations

import argparse

from edsr_ray import cli
from edsr_ray.infra.launcher import validate_cluster_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default="cluster.yaml", help="cluster-launcher YAML (default: cluster.yaml)")
    args = parser.parse_args(argv)
    cli.setup_logging(quiet=True)
    return cli.run(lambda: _validate(args.path))


def _validate(path: str) -> int:
    validate_cluster_config(path)
    print("ok")
    return cli.DONE


if __name__ == "__main__":
    cli.entry(main, "validate_cluster")
