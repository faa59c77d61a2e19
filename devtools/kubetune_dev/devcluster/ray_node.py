"""`ray start --address=127.0.0.1:PORT`: a worker node joined to a stand-in Ray head on this machine's loopback.

Run as `python -m kubetune_dev.devcluster.ray_node start --address=... [ray start's flags]`
(`processes.RayWorkerNode`). Ray's CLI refuses to start a worker node unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is on, and with it on replaces 127.0.0.1 in `--address` by the
machine's outward address, where a head started with `--node-ip-address=127.0.0.1` does not listen.
This runs Ray's own CLI with the first check passed and the address kept, in this process only: the
node's raylet and the workers it starts get the loopback address as it is, and the environment
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, `processes.venv_path_env`) as the head's.
"""

from __future__ import annotations

import sys


def main() -> None:
    from ray._private import ray_constants, services
    from ray.scripts.scripts import main as ray_cli

    ray_constants.ENABLE_RAY_CLUSTER = True  # the CLI's "multi-node" check; the node runs on loopback
    services.canonicalize_bootstrap_address = lambda addr, temp_dir=None: addr
    sys.argv[0] = "ray"
    ray_cli()


if __name__ == "__main__":
    main()
