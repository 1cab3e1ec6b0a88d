"""The defence sweep of chapter 5 as one command: attack PSNR/SSIM against test accuracy for every
defence and strength, written as CSV and Markdown.

    python benchmarks/defences.py                      # full: 3 faces, up to 300 L-BFGS steps
    DLGKIT_QUICK=1 python benchmarks/defences.py       # quick (under 5 minutes on 2 CPU cores)
    python benchmarks/defences.py --out some/folder    # default benchmarks/results/ (defences.md, full
                                                       # budget; defences_quick.md with DLGKIT_QUICK=1)

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
from _results import RESULTS  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for defences[_quick].csv and defences[_quick].md")
    parser.add_argument("--faces", type=int, default=3)
    args = parser.parse_args()
    quick = budget.is_quick()
    iterations = budget.budget(full=300, quick=40)
    budget.seed_everything(0)
    faces, _ = data.lfw_faces(args.faces, size=32)
    labels = torch.arange(args.faces)
    start = time.perf_counter()
    rows = []
    for defence in defence_list(quick):
        row = defences.privacy_accuracy_sweep([defence], faces, labels, attacks.AttackConfig(iterations=iterations), train_steps=300, progress=False)[0]
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
