"""Benchmark: the paper's DLG configuration against the course's recommended attack.

Table 1: for the first 20 LFW faces (32x32, grey) and 20 random 32x32 crops of scikit-image's
colour photos, on the DLG paper's LeNet, the success rate (PSNR >= 30 dB), label accuracy,
median iterations and median wall time per image. Every image gets its own freshly initialised
LeNet (seed = index). Table 2: batches of 4 and 8 LFW faces (10 each), mean aligned PSNR,
label accuracy and wall time per batch.

Run: ``python benchmarks/image_attacks.py`` (``--n 5 --batches 2`` for a quick look,
``--part single`` or ``--part batch`` for one table). The tables go to
``benchmarks/results/image_attacks.md`` and ``benchmarks/results/image_attacks_batch.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, write_table  # noqa: E402

from dlgkit import attacks, data, federated, models  # noqa: E402
from dlgkit.checks import SUCCESS_PSNR  # noqa: E402

CONFIGS = {
    # (a) DLG exactly as in the paper's code: a random soft label optimised jointly, Gaussian
    # start, L-BFGS (lr 1, no line search), 300 steps; stop once the distance is below 1e-6.
    "paper DLG": attacks.PAPER_DLG,
    # (b) the course's recommendation (the default of dlgkit.attacks.reconstruct, 4 restarts).
    "recommended": attacks.RECOMMENDED,
}


# batches: the recommended attack, and the same with a small total-variation prior
BATCH_CONFIGS = {"recommended": attacks.RECOMMENDED, "recommended + TV prior": attacks.RECOMMENDED_BATCH}


def run(name: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, config: attacks.AttackConfig) -> dict:
    rows = []
    for i in range(len(x)):
        model = models.LeNet(channels=x.shape[1], num_classes=num_classes, image_size=x.shape[-1], seed=i)
        grads = federated.client_gradient(model, x[i : i + 1], y[i : i + 1])
        result = attacks.reconstruct(model, grads, x[i : i + 1].shape, config, seed=i, progress=False)
        rep = result.report(x[i : i + 1], y[i : i + 1])
        rows.append(dict(dataclasses.asdict(rep), restarts_used=len(result.restart_losses)))
    psnrs = [r["psnr"] for r in rows]
    return {
        "set": name,
        "success": sum(p >= SUCCESS_PSNR for p in psnrs) / len(rows),
        "label_acc": statistics.mean(r["label_accuracy"] for r in rows),
        "median_iters": statistics.median(r["iterations"] for r in rows),
        "median_time": statistics.median(r["wall_time"] for r in rows),
        "mean_psnr": statistics.mean(psnrs),
        "failures": [i for i, p in enumerate(psnrs) if not p >= SUCCESS_PSNR],
        "restarts": sum(r["restarts_used"] - 1 for r in rows),
    }


def batch_table(batches: int, sizes: tuple[int, ...]) -> None:
    """Batches of LFW faces (distinct random labels, 100 classes), labels from the count rule,
    the recommended attack; mean aligned PSNR, label accuracy, wall time per batch."""
    faces, _ = data.lfw_faces(100, size=32)
    start = time.perf_counter()
    lines = ["| attack | batch size | batches | mean aligned PSNR (dB) | worst batch PSNR (dB) | batches >= 25 dB | label accuracy | median wall time per batch (s) | max wall time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n" + "\n".join(lines))
    for name, config, size in [(n, c, s) for n, c in BATCH_CONFIGS.items() for s in sizes]:
        psnrs, accs, times = [], [], []
        for b in range(batches):
            gen = torch.Generator().manual_seed(10_000 + 100 * size + b)
            idx = torch.randperm(len(faces), generator=gen)[:size]
            y = torch.randperm(100, generator=gen)[:size]
            model = models.LeNet(channels=1, num_classes=100, image_size=32, seed=b)
            grads = federated.client_gradient(model, faces[idx], y)
            result = attacks.reconstruct(model, grads, faces[idx].shape, config, seed=b, progress=False, history_every=None)
            rep = result.report(faces[idx], y)
            psnrs.append(rep["psnr"])
            accs.append(rep["label_set_accuracy"])
            times.append(result.wall_time)
        lines.append(
            f"| {name} | {size} | {batches} | {statistics.mean(psnrs):.1f} | {min(psnrs):.1f} | {sum(p >= 25 for p in psnrs)}/{batches} | "
            f"{statistics.mean(accs):.0%} | {statistics.median(times):.1f} | {max(times):.1f} |"
        )
        print(lines[-1], flush=True)
    total = time.perf_counter() - start
    path = write_table("image_attacks_batch", "Image attacks: batches of LFW faces", lines, f"{batches} batches per size, {total:.0f} s in all.")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="images per set (default 20)")
    parser.add_argument("--batches", type=int, default=10, help="batches per batch size (default 10)")
    parser.add_argument("--part", choices=["single", "batch", "all"], default="all", help="which table(s) to print")
    args = parser.parse_args()
    if args.part == "batch":
        batch_table(args.batches, (4, 8))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    num_classes = 100
    faces, face_labels = data.lfw_faces(args.n, size=32, num_classes=num_classes)
    crops, crop_labels = data.photo_crops(args.n, size=32, num_classes=num_classes)
    print(f"# image attacks: {args.n} images per set, LeNet, 32x32, {num_classes} classes")
    print(f"# {machine()}\n")
    lines = [f"| attack | set | success (PSNR >= {SUCCESS_PSNR:.0f} dB) | label accuracy | mean PSNR (dB) | median iterations | median wall time (s) | restarts used | failed images |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines))
    start = time.perf_counter()
    for config_name, config in CONFIGS.items():
        for set_name, x, y in (("LFW faces (grey)", faces, face_labels), ("photo crops (colour)", crops, crop_labels)):
            s = run(set_name, x, y, num_classes, config)
            lines.append(
                f"| {config_name} | {set_name} | {s['success']:.0%} | {s['label_acc']:.0%} | {s['mean_psnr']:.1f} | "
                f"{s['median_iters']:.0f} | {s['median_time']:.2f} | {s['restarts']} | {s['failures'] or '-'} |"
            )
            print(lines[-1], flush=True)
    path = write_table("image_attacks", "Image attacks: paper DLG against the recommended attack", lines,
                       f"{args.n} images per set, {time.perf_counter() - start:.0f} s in all.")
    print(f"wrote {path}")
    if args.part == "all":
        batch_table(args.batches, (4, 8))
    print(f"\n# total time {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
