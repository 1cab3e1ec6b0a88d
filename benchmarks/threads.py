"""Benchmark: how many torch threads a small-model attack should use (the thread policy).

One workload: the recommended attack on one LFW face through the paper's LeNet (32x32, grey,
100 classes), a fixed 60 L-BFGS steps (no stopping rule, no restarts, so every run does the same
work), repeated ``--repeats`` times; and the same 8 attacks as one vectorised problem
(``attacks.reconstruct_many``). Each is timed

- alone, with 1 thread and with all the machine's cores (``os.cpu_count()``);
- as two processes at once (the second started with the first), each with 1 thread and each
  with all the cores: what happens when two notebooks, two benchmark jobs, or a test run and a
  book build share a machine.

The table gives the wall time of one run (the mean over the processes when two run). The
policy that :func:`dlgkit.budget.threads_for` implements (all the cores for one process, an
equal share when several run at once) is read off it.

Run: ``python benchmarks/threads.py`` (CPU; writes ``benchmarks/results/threads.md``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_table  # noqa: E402


def work(kind: str, threads: int, repeats: int, start_at: float | None = None) -> float:
    """One timed run of ``kind`` ('single' or 'vectorised') with ``threads`` torch threads."""
    import torch

    from dlgkit import attacks, data, federated, models

    torch.set_num_threads(threads)
    faces, labels = data.lfw_faces(8, size=32, num_classes=100)
    nets = [models.LeNet(channels=1, num_classes=100, image_size=32, seed=i) for i in range(8)]
    grads = [federated.client_gradient(net, faces[i : i + 1], labels[i : i + 1]) for i, net in enumerate(nets)]
    config = attacks.RECOMMENDED.with_(iterations=60, tol=None, patience=None, restarts=1)
    if start_at is not None:  # both processes start their clocks together
        time.sleep(max(0.0, start_at - time.time()))
    begin = time.perf_counter()
    if kind == "single":
        for r in range(repeats):
            attacks.reconstruct(nets[r % 8], grads[r % 8], (1, 1, 32, 32), config, seed=r, history_every=None, progress=False)
    else:
        attacks.reconstruct_many(nets, grads, (1, 1, 32, 32), config, seeds=list(range(8)), history_every=None, progress=False)
    return time.perf_counter() - begin


def _child(args: tuple) -> float:
    return work(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="single attacks per timed run (default 3)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = sorted({1, cores})
    lines = ["| workload | processes at once | threads each | wall time of one run (s) | slowdown against 1 process, 1 thread |", "| --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    for kind, label in (("single", f"{args.repeats} single attacks, one after another"), ("vectorised", "8 attacks, vectorised")):
        base = None
        for processes in (1, 2):
            for threads in counts:
                with ctx.Pool(processes) as pool:
                    start_at = time.time() + 20.0  # after every child has imported torch
                    walls = pool.map(_child, [(kind, threads, args.repeats, start_at)] * processes)
                wall = sum(walls) / len(walls)
                base = base or wall
                lines.append(f"| {label} | {processes} | {threads} | {wall:.1f} | {wall / base:.2f}x |")
                print(lines[-1], flush=True)
    note = (f"{cores} cores; each run is 60 L-BFGS steps per attack (recommended attack, no stopping rule). Two processes start their clocks "
            f"together; the time is their mean. {time.perf_counter() - started:.0f} s in all; load average (1 min) {load_before:.2f} before the run, "
            f"{os.getloadavg()[0]:.2f} after it (its own processes; the cores should be otherwise idle).")
    print(f"wrote {write_table('threads', 'Threads for small-model attacks: 1 or all cores, alone or two processes at once', lines, note)}")


if __name__ == "__main__":
    main()
