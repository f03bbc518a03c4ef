"""torchrun with clean failure output: `python -m train.launch` takes torchrun's own flags.

    python -m train.launch --standalone --nproc_per_node=2 train/inscp.py --data zh.txt ...

What plain torchrun does when a worker fails (torch/distributed/launcher/api.py and
elastic/multiprocessing/errors): the agent logs "failed (exitcode: 1) local_rank: ...", raises
ChildFailedError, and torchrun's `@record`-decorated main lets it escape, so Python prints the
launcher's traceback and the ~30-line failure report; the exit code is 1 whatever code the
workers returned. This cannot be changed from inside the worker: a non-zero exit is the only
way to fail, and the worker's error file (`@record`) only adds its traceback to the report.

Our workers already say what went wrong in one `error: ...` line (rank 0 only, train.run_main),
so this launcher runs the same elastic agent (torch.distributed.run.run) and, when a worker
fails, prints nothing more unless that worker died from a signal (then one line naming rank and
signal) and exits with the first failed worker's exit code (1: a TrainError, 2: bad flags).
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import determine_local_world_size, get_args_parser, run


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if determine_local_world_size(args.nproc_per_node) > 1:
        # what torchrun sets for several workers per node, without its banner; one worker keeps
        # every core (setting 1 there would halve a CPU run on 2 cores)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the agent's own failure log
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal: the worker could not say anything itself
            name = signal.Signals(-failure.exitcode).name if -failure.exitcode in signal.valid_signals() else "?"
            print(f"error: rank {rank} (pid {failure.pid}) was killed by signal {-failure.exitcode} ({name})",
                  file=sys.stderr, flush=True)
            return 128 - failure.exitcode
        return failure.exitcode
    return 0


if __name__ == "__main__":
    sys.exit(main())
