"""Train EDSR / MDSR on Ray Train.

    python jobs/train.py --config configs/edsr_baseline_x2.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/edsr_baseline_x2.yaml

Exit status as every command (README, "Exit status"); any failure is non-zero, so the Ray job shows FAILED: 2 for a bad
config, data, tracking server or initial weights (checked before any cluster work) or a loss that became NaN/Inf, 3
when the run failed on the cluster (running the same command again resumes it from its latest checkpoint).
"""

from __future__ import annotations

import argparse

from edsr_ray import cli
from edsr_ray.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 workers.num_workers=2")
    args = parser.parse_args(argv)
    cli.setup_logging()
    return cli.run(lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # a bad config stops here, before Ray is imported
    from edsr_ray.training.run import train

    outcome = train(cfg, source=args.config)
    print(f"finished {outcome.steps} updates; metrics: {outcome.metrics}")
    for label, name in outcome.registered.items():
        print(f"registered {label} model: models:/{name}")
    return cli.DONE


if __name__ == "__main__":
    cli.entry(main, "train")
