"""What the benchmarks that train share with ``experiments.run`` on the command line."""

from __future__ import annotations

import contextlib
import signal
import sys


@contextlib.contextmanager
def resumable(module: str):
    """Ctrl-C or SIGTERM ends benchmark ``module`` like ``experiments.run``: the training
    loop has saved a checkpoint (``binax.train.loop.StopRequested``), so one line gives the
    command that goes on (``python -m module`` with this run's arguments) instead of a
    traceback, and the exit status is the shell's for the signal (128 + signum: 130 for
    Ctrl-C, 143 for SIGTERM)."""
    command = " ".join(["python", "-m", module, *sys.argv[1:]])
    try:
        yield
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"stopped by {signal.Signals(signum).name}; finished runs are kept, the interrupted one resumes "
              f"from its checkpoint: run `{command}` again", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
