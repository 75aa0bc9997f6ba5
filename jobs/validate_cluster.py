"""Check a Ray cluster-launcher file offline, before `ray up` (which needs AWS to find most mistakes).

    python jobs/validate_cluster.py cluster.yaml

Prints "ok" and exits 0 when the file passes Ray's schema, Ray's own config validation and the project's rules;
otherwise prints one line naming the file, the key and the problem, and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from edsr_ray.cluster import validate_cluster_config
from edsr_ray.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default="cluster.yaml", help="cluster-launcher YAML (default: cluster.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        validate_cluster_config(args.path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
