"""Run the embedded S3 server (SeaweedFS) in the background on this machine.

    python jobs/objectstore.py up [--data-dir DIR] [--bucket NAME ...] [--port PORT]
    eval "$(python jobs/objectstore.py env)"      # point boto3, pyarrow, Ray and MLflow at it
    python jobs/objectstore.py status
    python jobs/objectstore.py down

The server listens on 127.0.0.1 only, keeps its data in DIR (default ~/.edsr-ray/objectstore) across restarts and
gets a new secret and new ports on every start. `up` prints the endpoint and the export lines; `env` prints the export
lines of the running server. Exits 0 on success, 1 when no server is running (status, env) or it cannot start.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from edsr_ray.errors import EdsrRayError
from edsr_ray.objectstore import DEFAULT_DATA_DIR, ObjectStoreState, find_running, start_detached, stop_running


def _exports(state: ObjectStoreState) -> str:
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in state.env().items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "status", "env", "down"])
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"server data folder (default {DEFAULT_DATA_DIR})")
    parser.add_argument(
        "--bucket", action="append", dest="buckets", help="bucket to create on `up` (repeatable; default edsr)"
    )
    parser.add_argument("--port", type=int, default=None, help="S3 port on `up` (default: a free one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "up":
            state, started = start_detached(args.data_dir, buckets=args.buckets or ["edsr"], port=args.port)
            verb = "started" if started else "already running"
            print(f"# object store {verb}: {state.endpoint_url} (pid {state.pid}, data in {state.data_dir})")
            print(_exports(state))
            return 0
        if args.command == "down":
            state = stop_running(args.data_dir)
            print(f"stopped the object store at {state.endpoint_url}" if state else "no object store was running")
            return 0
        state = find_running(args.data_dir)
        if state is None:
            print(f"no object store is running on {args.data_dir}", file=sys.stderr)
            return 1
        if args.command == "env":
            print(_exports(state))
        else:
            print(f"running: {state.endpoint_url} (pid {state.pid}, data in {state.data_dir})")
        return 0
    except EdsrRayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
