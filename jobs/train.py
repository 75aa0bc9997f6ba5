"""Train EDSR / MDSR on Ray Train.

    python jobs/train.py --config configs/edsr_baseline_x2.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/edsr_baseline_x2.yaml

Exits 0 when training finished, 1 when it failed (so the Ray job shows FAILED), 2 for a bad config.
"""

from __future__ import annotations

import argparse
import logging
import sys

from edsr_ray.config import load_config
from edsr_ray.errors import ConfigError, EdsrRayError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 workers.num_workers=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from edsr_ray.train import train

    try:
        outcome = train(cfg, source=args.config)
    except EdsrRayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"finished {outcome.steps} updates; metrics: {outcome.metrics}")
    for label, name in outcome.registered.items():
        print(f"registered {label} model: models:/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
