"""The defence sweep of chapter 5 as one command: attack PSNR/SSIM against test accuracy for every
defence and strength, written as CSV and Markdown.

    python benchmarks/defences.py                      # full: 3 faces, up to 300 L-BFGS steps
    DLGKIT_QUICK=1 python benchmarks/defences.py       # quick (under 5 minutes on 2 CPU cores)
    python benchmarks/defences.py --out some/folder    # default benchmarks/results/ (defences.md, full
                                                       # budget; defences_quick.md with DLGKIT_QUICK=1)
    DLGKIT_QUICK=1 python benchmarks/defences.py --compare   # the attacks only, one at a time against
                                                       # vectorised (writes vectorised_defences.md)

The attack setting is the issue's anchor: iDLG with the label known, L-BFGS (line search) for at
most 300 steps (40 quick), one run per face, 32x32 LFW faces, each on a fresh paper LeNet with 100
classes; noise on every gradient tensor, pruning per tensor. Accuracy: the paper LeNet trained on
scikit-learn's digits for 300 FedSGD steps with the same defended gradients (dlgkit.defences).
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import RESULTS, write_table  # noqa: E402

from dlgkit import attacks, budget, data, defences  # noqa: E402
from dlgkit.checks import STOPPED_PSNR, SUCCESS_PSNR  # noqa: E402

D = defences.Defence
COLUMNS = ["label", "kind", "strength", "psnr", "adaptive_psnr", "ssim", "relative_change", "accuracy", "epsilon", "leaks", "stopped", "attack_time", "train_time"]


def defence_list(quick: bool) -> list[defences.Defence]:
    noise = (1e-4, 1e-3, 1e-2, 1e-1)
    out = [D("none")] + [D("gaussian", v) for v in noise] + [D("laplacian", v) for v in noise]
    out += [D("prune", p) for p in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99)]
    if not quick:
        out += [D("prune_global", p) for p in (0.5, 0.9, 0.99)] + [D("local_steps", 5)]
    out += [D("fp16"), D("int8")] + [D("dp_sgd", s) for s in (1e-3, 1e-2, 0.1, 1.0)]
    return out


def fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def compare(faces: torch.Tensor, labels: torch.Tensor, iterations: int, quick: bool) -> None:
    """The sweep's attacks (every defence of the list on every face, labels known, one L-BFGS
    trial) one at a time (``attack_defended``, 1 thread: the thread policy for one attack at a
    time) against all at once (the vectorised sweep: one batched problem per attack setting, at
    1 thread and at every core); PSNR per defence on both paths and the total wall times."""
    import os
    import statistics

    from dlgkit import models

    attack = attacks.AttackConfig(iterations=iterations)
    chosen = defence_list(quick)
    nets = [models.LeNet(channels=1, num_classes=100, image_size=32, seed=i) for i in range(len(faces))]
    runs = [("sequential", 1), ("vectorised", 1), ("vectorised", budget.threads_for(batched=True))]
    if runs[-1] == runs[-2]:
        runs.pop()
    timed, psnrs = {}, {}
    for path, threads in runs:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        if path == "sequential":
            results = [[defences.attack_defended(net, faces[i : i + 1], labels[i : i + 1], d, attack, seed=i) for i, net in enumerate(nets)] for d in chosen]
        else:
            results, _ = defences._attack_all(nets, faces, labels, chosen, attack, 1.0)
        timed[(path, threads)] = time.perf_counter() - start
        psnrs[(path, threads)] = [statistics.mean(r["psnr"] for r in per) if all(math.isfinite(r["psnr"]) for r in per) else math.nan for per in results]
        print(f"{path} at {threads} thread(s): {timed[(path, threads)]:.1f} s", flush=True)
    base = timed[runs[0]]
    lines = ["| path | threads | total wall time (s) | speed-up |", "| --- | --- | --- | --- |"]
    lines += [f"| {path} | {threads} | {timed[(path, threads)]:.1f} | {base / timed[(path, threads)]:.2f}x |" for path, threads in runs]
    lines += ["", "| defence | " + " | ".join(f"PSNR, {p} at {t} thread(s) (dB)" for p, t in runs) + " |", "| --- |" + " --- |" * len(runs)]
    for j, d in enumerate(chosen):
        lines.append(f"| {d.label} | " + " | ".join(f"{psnrs[run][j]:.1f}" for run in runs) + " |")
    seq, vec = psnrs[runs[0]], psnrs[runs[1]]
    both = [(a, b) for a, b in zip(seq, vec) if math.isfinite(a) and math.isfinite(b)]
    verdicts = [(a >= SUCCESS_PSNR, a < STOPPED_PSNR) == (b >= SUCCESS_PSNR, b < STOPPED_PSNR) for a, b in both]
    note = (f"{len(faces)} LFW faces (32x32) x {len(chosen)} defences, iDLG label known, L-BFGS <= {iterations} steps, one run "
            f"({'quick' if quick else 'full'} budget), CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. "
            f"The same verdict (leaks >= {SUCCESS_PSNR:.0f} dB / stopped < {STOPPED_PSNR:.0f} dB / between) on {sum(verdicts)} of {len(verdicts)} "
            f"defences; median PSNR difference (vectorised - sequential) {statistics.median(b - a for a, b in both):+.1f} dB.")
    print("\n".join(lines) + "\n" + note)
    print(f"wrote {write_table('vectorised_defences', 'Defence sweep attacks: sequential against vectorised', lines, note)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for defences[_quick].csv and defences[_quick].md")
    parser.add_argument("--faces", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="the attacks only, sequential against vectorised (writes vectorised_defences.md)")
    args = parser.parse_args()
    quick = budget.is_quick()
    iterations = budget.budget(full=300, quick=40)
    budget.seed_everything(0)
    faces, _ = data.lfw_faces(args.faces, size=32)
    labels = torch.arange(args.faces)
    if args.compare:
        return compare(faces, labels, iterations, quick)
    start = time.perf_counter()
    rows = []
    # one sweep over the whole list: the attacks of every defence run as one batched problem per attack setting
    for row in defences.privacy_accuracy_sweep(defence_list(quick), faces, labels, attacks.AttackConfig(iterations=iterations), train_steps=300, progress=False):
        rows.append({k: row.get(k) for k in COLUMNS})
        print(f"{row['label']:22s} PSNR {row['psnr']:5.1f} dB  adaptive {fmt(row.get('adaptive_psnr')):>6s}  SSIM {row['ssim']:.2f}  "
              f"change/|g| {row['relative_change']:.3g}  accuracy {row['accuracy']:.1%}  epsilon {fmt(row['epsilon'])}  "
              f"({row['attack_time']:.1f} s attack, {row['train_time']:.1f} s training)", flush=True)
    total = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    name = "defences_quick" if quick else "defences"
    with open(args.out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: fmt(v) for k, v in r.items()} for r in rows)
    header = ["defence", "attack PSNR (dB)", "pruning-aware PSNR (dB)", "SSIM", "change / gradient norm", "test accuracy", "epsilon (delta 1e-5)",
              f"leaks (>= {SUCCESS_PSNR:.0f} dB)", f"stopped (< {STOPPED_PSNR:.0f} dB)"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in rows:
        adaptive = f"{r['adaptive_psnr']:.1f}" if r["adaptive_psnr"] is not None else ""
        eps = f"{r['epsilon']:.3g}" if r["epsilon"] is not None else ""
        lines.append(f"| {r['label']} | {r['psnr']:.1f} | {adaptive} | {r['ssim']:.2f} | {r['relative_change']:.3g} | {r['accuracy']:.1%} | {eps} | "
                     f"{'yes' if r['leaks'] else 'no'} | {'yes' if r['stopped'] else 'no'} |")
    note = (f"\n{args.faces} LFW faces (32x32), iDLG label known, L-BFGS <= {iterations} steps, one run; accuracy: LeNet on digits, "
            f"300 FedSGD steps. {'quick' if quick else 'full'} budget, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.machine()}, {total:.0f} s in all.\n")
    (args.out / f"{name}.md").write_text(f"# Defences: privacy against accuracy ({'quick' if quick else 'full'} budget)\n\n"
                                         f"Written by `{'DLGKIT_QUICK=1 ' if quick else ''}python benchmarks/defences.py`.\n\n" + "\n".join(lines) + "\n" + note)
    print("\n".join(lines) + note)
    print(f"wrote {args.out / (name + '.csv')} and {args.out / (name + '.md')} in {total:.1f} s")


if __name__ == "__main__":
    main()
