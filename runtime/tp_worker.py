"""A tensor-parallel worker process, started by TVM's disco for each shard but
the first (runtime/tensor_parallel.py; the first runs in the controller):
`python -m kiln.runtime.tp_worker WORKER_ID NUM_WORKERS NUM_GROUPS READ_FD WRITE_FD`."""

from __future__ import annotations

import sys

from ..tvm_compat import disco, runtime
from .tensor_parallel import register_worker_functions


def main() -> None:
    if len(sys.argv) != 6:
        sys.exit("usage: python -m kiln.runtime.tp_worker WORKER_ID NUM_WORKERS NUM_GROUPS READ_FD WRITE_FD (disco starts it)")
    disco()
    register_worker_functions()
    try:
        runtime().get_global_func("runtime.disco.WorkerProcess")(*[int(a) for a in sys.argv[1:6]])
    except (OSError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
