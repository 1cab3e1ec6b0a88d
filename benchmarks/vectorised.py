"""Benchmark: the single-image table solved one image at a time and all at once.

For the first ``--n`` LFW faces (32x32, grey) and ``--n`` random 32x32 crops of scikit-image's
colour photos, each on its own freshly initialised LeNet (seed = index), the recommended
attack (:data:`dlgkit.attacks.RECOMMENDED`) runs in one process sequentially
(``attacks.reconstruct`` in a loop) and vectorised (one ``attacks.vectorised.reconstruct_many``
call per set). The order of the runs turns round between the sets (faces: sequential first;
crops: sequential last) so that a change of the machine's load does not favour one path. Reported: total wall
time per path, success rate (PSNR >= 30 dB), median and mean PSNR, label accuracy, median
iterations, the thread count and the load average before and after.

Run: ``python benchmarks/vectorised.py`` (CPU, writes ``benchmarks/results/vectorised.md``);
by default the sequential path runs at 1 thread and the vectorised one at 1 thread and at every
core (the thread policy, ``budget.threads_for``); ``--threads 1,2`` runs every path at each count instead;
``--batch 4 --n 10`` runs the 10 batches of 4 faces of ``benchmarks/image_attacks.py``'s batch
table instead (chapter 3's attack, ``RECOMMENDED_BATCH``; writes ``vectorised_batch_4.md``, and ``--batch 8`` the
batches of 8 into ``vectorised_batch_8.md``); ``--fedavg`` runs chapter 6's nine FedAvg-aware attacks instead (``reconstruct_fedavg`` one after
another against ``reconstruct_fedavg_many``; writes ``vectorised_fedavg.md``);
``DLGKIT_DEVICE=cuda python benchmarks/vectorised.py --quick`` on a GPU (4 images per set, 40
iterations; writes ``vectorised_quick.md``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_table  # noqa: E402

from dlgkit import attacks, budget, data, federated, models  # noqa: E402
from dlgkit.attacks.vectorised import reconstruct_many  # noqa: E402
from dlgkit.checks import SUCCESS_PSNR  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def problems(x: torch.Tensor, y: torch.Tensor, num_classes: int, device: torch.device) -> tuple[list, list]:
    """One freshly initialised LeNet per image (seed = index) on ``device``, and its gradient."""
    nets = [models.LeNet(channels=x.shape[1], num_classes=num_classes, image_size=x.shape[-1], seed=i).to(device) for i in range(len(x))]
    grads = [federated.client_gradient(net, x[i : i + 1], y[i : i + 1]) for i, net in enumerate(nets)]
    return nets, grads


def solve(path: str, nets: list, grads: list, x: torch.Tensor, config: attacks.AttackConfig, device: torch.device) -> dict:
    """Run one path on one set; the metrics and the wall time of the whole set."""
    shape = (1, *x.shape[1:])
    _sync(device)
    start = time.perf_counter()
    if path == "sequential":
        results = [attacks.reconstruct(net, g, shape, config, seed=i, progress=False, history_every=None) for i, (net, g) in enumerate(zip(nets, grads))]
    else:
        results = reconstruct_many(nets, grads, shape, config, seeds=list(range(len(nets))), progress=False, history_every=None)
    _sync(device)
    wall = time.perf_counter() - start
    return {"wall": wall, "results": results}


def summary(results: list, x: torch.Tensor, y: torch.Tensor) -> dict:
    reports = [r.report(x[i : i + 1], y[i : i + 1]) for i, r in enumerate(results)]
    psnrs = [r.psnr for r in reports]
    return {
        "success": sum(r.success for r in reports) / len(reports),
        "median_psnr": statistics.median(psnrs),
        "mean_psnr": statistics.mean(psnrs),
        "label_acc": statistics.mean(r.label_accuracy for r in reports),
        "median_iters": statistics.median(r.iterations for r in reports),
        "restarts": sum(len(r.restart_losses) - 1 for r in results),
    }


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def race(threads: list[int], run: Callable[[str], list], row: Callable[[int, str, float, float, list], str], lines: list[str]) -> list[str]:
    """Time ``run("sequential")`` and ``run("vectorised")`` (each returns its per-problem scores)
    at each thread count, alternating which goes first after the first count; append one table
    row per path, ``row(threads, path, wall, sequential_wall, scores)``. Returns the load
    averages before the run and after each thread count."""
    loads = [load()]
    for count in threads:
        torch.set_num_threads(count)
        timed = {}
        for path in ("sequential", "vectorised") if count == threads[0] else ("vectorised", "sequential"):
            begin = time.perf_counter()
            scores = run(path)
            timed[path] = (time.perf_counter() - begin, scores)
        for path in ("sequential", "vectorised"):
            lines.append(row(count, path, timed[path][0], timed["sequential"][0], timed[path][1]))
            print(lines[-1], flush=True)
        loads.append(load())
    return loads


def fedavg(threads: list[int]) -> None:
    """The setting of chapter 6's "Across rounds": 3 global models (seeds 0-2) x 3 clients of 4
    digits, each client's FedAvg update after E = 4 local SGD steps (lr 0.1, mini-batches of 2);
    the FedAvg-aware attack (cosine + TV 1e-4, float64, 30 L-BFGS steps, one start) on all 9
    updates, one after another and as one batched problem, at each thread count."""
    from dlgkit.attacks import fedavg as fa
    from dlgkit.fl import task

    settings = task.FLSettings(dataset="digits", mode="fedavg", examples_per_client=4, lr=0.1, local_steps=4, batch_size=2)
    config = attacks.RECOMMENDED.with_(restarts=1, iterations=30, float64=True, distance="cosine", tv=1e-4)
    clients = [task.load_partition(settings, i, 3) for i in range(3)]
    nets, updates, xs, ys = [], [], [], []
    for seed in range(3):
        for x, y in clients:
            net = task.make_model(task.FLSettings(dataset="digits", seed=seed))
            nets.append(net)
            updates.append(federated.client_update(net, x, y, lr=settings.lr, local_steps=settings.local_steps, batch_size=settings.batch_size).tensors)
            xs.append(x)
            ys.append(y)
    kwargs = dict(local_steps=settings.local_steps, local_lr=settings.lr, batch_size=settings.batch_size, history_every=None, progress=False)
    lines = ["| threads | path | total wall time (s) | speed-up | median PSNR (dB) | lowest PSNR (dB) | updates >= 30 dB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    print(f"# FedAvg-aware attacks on 9 updates, sequential vs vectorised, load {load()}\n" + "\n".join(lines))
    start = time.perf_counter()

    def run(path: str) -> list[float]:
        if path == "sequential":
            results = [fa.reconstruct_fedavg(net, u, x.shape, config, labels=y, seed=0, **kwargs) for net, u, x, y in zip(nets, updates, xs, ys)]
        else:
            results = fa.reconstruct_fedavg_many(nets, updates, xs[0].shape, config, labels=ys, seeds=0, **kwargs)
        return [r.report(x, y).psnr for r, x, y in zip(results, xs, ys)]

    def row(count: int, path: str, wall: float, sequential: float, psnrs: list[float]) -> str:
        return (f"| {count} | {path} | {wall:.1f} | {sequential / wall:.2f}x | {statistics.median(psnrs):.1f} | {min(psnrs):.1f} | "
                f"{sum(p >= SUCCESS_PSNR for p in psnrs)} of {len(psnrs)} |")

    loads = race(threads, run, row, lines)
    note = (f"Chapter 6's across-rounds setting (3 fresh global models instead of 3 trained rounds), CPU, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. Load average (1, 5, 15 min) before the run and after each thread count: "
            f"{' / '.join(loads)}. {time.perf_counter() - start:.0f} s in all.")
    print(f"wrote {write_table('vectorised_fedavg', 'FedAvg-aware attacks: sequential against vectorised (9 updates)', lines, note)}")


def batches(count: int, size: int, threads: list[int]) -> None:
    """Chapter 3's setting: ``count`` batches of ``size`` LFW faces (distinct random labels, 100
    classes, the batches of ``benchmarks/image_attacks.py``), each on its own LeNet (seed = batch),
    labels by the count rule, ``RECOMMENDED_BATCH`` (TV prior); one batch after another against
    all batches as one problem, at each thread count."""
    faces, _ = data.lfw_faces(100, size=32)
    problems_, truths = [], []
    for b in range(count):
        gen = torch.Generator().manual_seed(10_000 + 100 * size + b)
        idx = torch.randperm(len(faces), generator=gen)[:size]
        y = torch.randperm(100, generator=gen)[:size]
        net = models.LeNet(channels=1, num_classes=100, image_size=32, seed=b)
        problems_.append((net, federated.client_gradient(net, faces[idx], y)))
        truths.append((faces[idx], y))
    config = attacks.RECOMMENDED_BATCH
    shape = (size, 1, 32, 32)
    lines = ["| threads | path | total wall time (s) | speed-up | mean aligned PSNR (dB) | worst batch (dB) | batches >= 25 dB | label accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    print(f"# {count} batches of {size} faces, sequential vs vectorised, load {load()}\n" + "\n".join(lines))
    start = time.perf_counter()

    def run(path: str) -> list:
        if path == "sequential":
            results = [attacks.reconstruct(net, g, shape, config, seed=b, progress=False, history_every=None) for b, (net, g) in enumerate(problems_)]
        else:
            results = reconstruct_many([net for net, _ in problems_], [g for _, g in problems_], shape, config, seeds=list(range(count)),
                                       progress=False, history_every=None)
        return [r.report(x, y) for r, (x, y) in zip(results, truths)]

    def row(t: int, path: str, wall: float, sequential: float, reports: list) -> str:
        psnrs = [r.psnr for r in reports]
        return (f"| {t} | {path} | {wall:.1f} | {sequential / wall:.2f}x | {statistics.mean(psnrs):.1f} | {min(psnrs):.1f} | "
                f"{sum(p >= 25 for p in psnrs)}/{count} | {statistics.mean(r.label_set_accuracy for r in reports):.0%} |")

    loads = race(threads, run, row, lines)
    note = (f"`RECOMMENDED_BATCH`, batches of {size}, CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. "
            f"Load average (1, 5, 15 min) before the run and after each thread count: {' / '.join(loads)}. {time.perf_counter() - start:.0f} s in all.")
    print(f"wrote {write_table(f'vectorised_batch_{size}', f'Batch attacks: sequential against vectorised ({count} batches of {size})', lines, note)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="images per set (default 20)")
    parser.add_argument("--fedavg", action="store_true", help="chapter 6's 9 FedAvg updates instead (writes vectorised_fedavg.md)")
    parser.add_argument("--batch", type=int, default=0, metavar="SIZE", help="--n batches of SIZE faces instead (chapter 3; writes vectorised_batch_SIZE.md)")
    parser.add_argument("--quick", action="store_true", help="4 images per set and 40 iterations (about 90 s on one GPU)")
    parser.add_argument("--threads", default="", help="comma-separated torch thread counts for every path (default: the thread policy, "
                        "budget.threads_for: sequential at 1, vectorised at 1 and at every core); --fedavg and --batch default to 1")
    args = parser.parse_args()
    counts = [int(t) for t in (args.threads or "1").split(",")]
    if args.fedavg:
        return fedavg(counts)
    if args.batch:
        return batches(args.n, args.batch, counts)
    device = budget.default_device()
    budget.seed_everything(0)  # full float32 precision on a GPU (no TF32)
    n = 4 if args.quick else args.n
    config = attacks.RECOMMENDED.with_(iterations=40) if args.quick else attacks.RECOMMENDED
    # each path at the thread counts asked for (default: the thread policy's, budget.threads_for:
    # 1 for one attack at a time, every core for the batched engine) and the vectorised path at 1
    # thread too (the same-thread comparison); the order turns round between the sets so that a
    # change of the machine's load does not favour one path
    seq_threads = [int(t) for t in args.threads.split(",")] if args.threads else [budget.threads_for(batched=False)]
    vec_threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, budget.threads_for(batched=True)})
    runs = [("sequential", t) for t in seq_threads] + [("vectorised", t) for t in vec_threads]
    num_classes = 100
    faces, face_labels = data.lfw_faces(n, size=32, num_classes=num_classes)
    crops, crop_labels = data.photo_crops(n, size=32, num_classes=num_classes)
    sets = [("LFW faces (grey)", faces, face_labels, runs), ("photo crops (colour)", crops, crop_labels, runs[::-1])]
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    base = runs[0]
    print(f"# sequential vs vectorised: {n} images per set, LeNet 32x32, {device} ({card}), runs {runs}, load {load()}")
    lines = [f"| set | path | threads | total wall time (s) | speed-up | success (PSNR >= {SUCCESS_PSNR:.0f} dB) | median PSNR (dB) | mean PSNR (dB) | label accuracy | median iterations | restarts used |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines))
    loads = [load()]
    total = {run: 0.0 for run in runs}
    start = time.perf_counter()
    for name, x, y, order in sets:
        nets, grads = problems(x.to(device), y.to(device), num_classes, device)
        timed = {}
        for path, count in order:
            torch.set_num_threads(count)
            timed[(path, count)] = solve(path, nets, grads, x.to(device), config, device)
            total[(path, count)] += timed[(path, count)]["wall"]
        for path, count in runs:
            s = summary(timed[(path, count)]["results"], x, y)
            wall = timed[(path, count)]["wall"]
            lines.append(f"| {name} | {path} | {count} | {wall:.1f} | {timed[base]['wall'] / wall:.2f}x | {s['success']:.0%} | {s['median_psnr']:.1f} | "
                         f"{s['mean_psnr']:.1f} | {s['label_acc']:.0%} | {s['median_iters']:.0f} | {s['restarts']} |")
            print(lines[-1], flush=True)
        loads.append(load())
    for path, count in runs:
        lines.append(f"| both sets | {path} | {count} | {total[(path, count)]:.1f} | {total[base] / total[(path, count)]:.2f}x | | | | | | |")
    print("\n".join(lines[-len(runs):]))
    note = (f"{n} images per set, attack `RECOMMENDED{'.with_(iterations=40)' if args.quick else ''}`, device {device} ({card}), "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; speed-ups against the sequential path at {base[1]} thread(s). "
            f"Load average (1, 5, 15 min) before the run and after each set: "
            f"{' / '.join(loads)} (`uptime`; the machine's cores are shared). {time.perf_counter() - start:.0f} s in all.")
    path = write_table("vectorised_quick" if args.quick else "vectorised", "Image attacks: sequential against vectorised (single-image table)", lines, note)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
