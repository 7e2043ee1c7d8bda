"""The timing loop every framework's worker runs (``benchmarks/vs_peers.py`` drives it).

A worker builds its models, then answers one JSON command per stdin line with one JSON
line on its protocol channel (the original stdout; everything else the framework prints
goes to stderr):

* ``{"cmd": "run", "model": name, "steps": n}`` -> ``{"wall": [s, ...], "cpu": [s, ...]}``,
  the wall-clock and process-CPU seconds of each of ``n`` training steps;
* ``{"cmd": "quit"}`` -> the worker exits.

A step callable runs ONE training step on a fixed synthetic batch and returns only when
its result is computed (frameworks that dispatch asynchronously block inside it).
Idle workers wait on stdin, so they take no CPU while another framework is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable


def serve(steps: dict[str, Callable[[], None]], info: dict | None = None) -> None:
    """Answers commands for the models in ``steps`` until ``quit`` or end of input."""
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the protocol
    sys.stdout = sys.stderr
    channel.write(json.dumps({"ready": sorted(steps), "info": info or {}}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        step = steps[cmd["model"]]
        wall, cpu = [], []
        for _ in range(int(cmd["steps"])):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        channel.write(json.dumps({"wall": wall, "cpu": cpu}) + "\n")


def worker_parser() -> argparse.ArgumentParser:
    """The options ``vs_peers.py`` passes every peer worker: ``--batch`` and ``--models``."""
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--models", default="vgg_small,bnn_mlp")
    return p
