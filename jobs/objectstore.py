"""Run the embedded S3 server (SeaweedFS) in the background on this machine.

    python jobs/objectstore.py up [--data-dir DIR] [--bucket NAME ...] [--port PORT]
    eval "$(python jobs/objectstore.py env)"      # point boto3, pyarrow, Ray and MLflow at it
    python jobs/objectstore.py status
    python jobs/objectstore.py down

The server listens on 127.0.0.1 only, keeps its data in DIR (default: objectstore/ in the project home,
$EDSR_RAY_HOME or ~/.edsr-ray) across restarts and gets a new secret and new ports on every start. `up` prints the
endpoint and the export lines; `env` prints the export lines of the running server. Exit status as every command
(README, "Exit status"): 2 when no server is running (status, env) or it cannot start.
"""

from __future__ import annotations

import argparse
import shlex

from edsr_ray import cli
from edsr_ray.errors import StorageError
from edsr_ray.infra.objectstore import ObjectStoreState, data_folder, find_running, start_detached, stop_running


def _exports(state: ObjectStoreState) -> str:
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in state.env().items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "status", "env", "down"])
    parser.add_argument(
        "--data-dir", default=None, help="server data folder (default: objectstore/ in the project home)"
    )
    parser.add_argument(
        "--bucket", action="append", dest="buckets", help="bucket to create on `up` (repeatable; default edsr)"
    )
    parser.add_argument("--port", type=int, default=None, help="S3 port on `up` (default: a free one)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    return cli.run(lambda: _command(args))


def _command(args: argparse.Namespace) -> int:
    data_dir = data_folder(args.data_dir)
    if args.command == "up":
        state, started = start_detached(data_dir, buckets=args.buckets or ["edsr"], port=args.port)
        verb = "started" if started else "already running"
        print(f"# object store {verb}: {state.endpoint_url} (pid {state.pid}, data in {state.data_dir})")
        print(_exports(state))
        return cli.DONE
    if args.command == "down":
        state = stop_running(data_dir)
        print(f"stopped the object store at {state.endpoint_url}" if state else "no object store was running")
        return cli.DONE
    state = find_running(data_dir)
    if state is None:
        raise StorageError(f"no object store is running on {data_dir}; start one with `python jobs/objectstore.py up`")
    if args.command == "env":
        print(_exports(state))
    else:
        print(f"running: {state.endpoint_url} (pid {state.pid}, data in {state.data_dir})")
    return cli.DONE


if __name__ == "__main__":
    cli.entry(main, "objectstore")
