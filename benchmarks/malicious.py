"""Benchmark: chapter 7's malicious server. The imprint module (Fowl et al. 2022) against its
closed form, trap weights (Boenisch et al. 2023) against batch size, and the imprint attack
under chapter 5's Gaussian noise.

Data: :func:`dlgkit.attacks.imprint.varied_faces`, the 100 LFW faces (32x32, grey) with a random
gamma in [1/2, 2] and random mirroring, a population with a continuous brightness, so batches
of 128 exist. The server fits the imprint thresholds on 20000 public draws (seed 1); each client
batch is a fresh draw (other seeds). The model behind the planted block is the DLG paper's
LeNet (1 channel, 10 classes); the client shares the FedSGD gradient of its batch with random
labels. A batch image counts as recovered when some recovered image has PSNR >= 60 dB to it.
Cells: mean recovered fraction over ``--trials`` batches; for the imprint table with the closed
form ``(1 - 1/k)^(B-1)`` (k equally likely bins, images independent) in brackets. The noise
table also varies the scale of the planted back layer (:class:`dlgkit.attacks.imprint.PlantedModel`'s
``decoder_scale``): the gradient's size grows with it, and the noise's does not.

The last table runs Flower's SecAgg+ (:func:`dlgkit.fl.secagg.simulate_secagg`) with N clients
holding one face each: the honest attack of chapters 2-3 (labels known, one L-BFGS run) on the
aggregate, aimed at client 0's face alone and at the whole batch of N faces (Hungarian-aligned
mean PSNR), and the imprint model sent to every client, scored against all N faces (exact,
PSNR >= 60 dB, and recognisable, >= 30 dB: SecAgg+'s quantisation blurs faces whose gradient is
tiny). N = 1 is
the server seeing the lone client's gradient (SecAgg+ needs 2 clients).

Run: ``python benchmarks/malicious.py`` (``--trials 3`` for a quick look).
The tables go to ``benchmarks/results/malicious.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from dlgkit.attacks import imprint, trap
from dlgkit.checks import SUCCESS_PSNR
from dlgkit.defences import add_noise
from dlgkit.federated import client_gradient
from dlgkit.models import LeNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_table  # noqa: E402

SHAPE = (1, 32, 32)
PUBLIC = 20000  # public draws the server fits its imprint thresholds on
BATCHES = (8, 32, 64, 128)
BINS = (16, 64, 128, 256)
MARGINS = (0.01, 0.03, 0.05, 0.1)
VARIANCES = (0.0, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)  # chapter 5 uses 1e-4 to 1e-1; the two small ones show where it breaks
SCALES = (1e-2, 1.0, 100.0)  # the back layer's scale: the server's choice, it sets the gradient's size


def lenet() -> LeNet:
    return LeNet(channels=1, num_classes=10, image_size=32, seed=0)


def shared_gradient(model, batch: torch.Tensor, seed: int) -> list[torch.Tensor]:
    labels = torch.randint(0, 10, (len(batch),), generator=torch.Generator().manual_seed(seed))
    return client_gradient(model, batch, labels)


def _fraction_table(models: dict, header: str, recover, trials: int, closed_form=None) -> list[str]:
    """Rows of batch sizes, columns of ``models`` (keyed by k or margin): the mean fraction of
    a batch that ``recover`` gets back exactly, with the closed form in brackets if given."""
    lines = ["| batch B | " + " | ".join(header.format(c) for c in models) + " |", "| --- |" + " --- |" * len(models)]
    for b in BATCHES:
        cells = []
        for c, model in models.items():
            measured = float(imprint.recovery_fractions(model, recover, b, trials).mean())
            expected = f" ({closed_form(b, c):.3f})" if closed_form else ""
            cells.append(f"{measured:.3f}{expected}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return lines


def imprint_table(trials: int) -> list[str]:
    thresholds = {k: imprint.imprint_thresholds(imprint.varied_faces(PUBLIC, seed=1), k) for k in BINS}
    models = {k: imprint.imprint_model(lenet(), SHAPE, thresholds[k]) for k in BINS}
    return _fraction_table(models, "k = {}", imprint.imprint_recover, trials, lambda b, k: imprint.expected_recovered_fraction(b, bins=k))


def trap_table(trials: int, neurons: int) -> list[str]:
    models = {m: trap.trap_model(lenet(), SHAPE, neurons=neurons, margin=m) for m in MARGINS}
    return _fraction_table(models, "margin {}", trap.trap_recover, trials)


def noise_table(trials: int, batch_size: int = 32, bins: int = 256) -> list[str]:
    public = imprint.imprint_thresholds(imprint.varied_faces(PUBLIC, seed=1), bins)
    models = {s: imprint.imprint_model(lenet(), SHAPE, public, decoder_scale=s) for s in SCALES}
    lines = ["| noise variance | " + " | ".join(f"back layer scale {s:g}" for s in SCALES) + " |", "| --- |" + " --- |" * len(SCALES)]
    sizes = {s: [] for s in SCALES}
    for var in VARIANCES:
        cells = []
        for s, model in models.items():
            hits, psnrs = [], []
            for t in range(trials):
                batch = imprint.varied_faces(batch_size, seed=100 + t)
                grads = shared_gradient(model, batch, t)
                sizes[s].append(float(grads[1].abs().max()))
                if var > 0:
                    grads = add_noise(grads, var, generator=torch.Generator().manual_seed(t))
                best = imprint.best_psnr(imprint.imprint_recover(model, grads), batch)
                hits.append(float((best >= imprint.EXACT_PSNR).float().mean()))
                psnrs.extend(best.tolist())
            cells.append(f"{statistics.mean(hits):.3f} / {statistics.median(psnrs):.1f} dB")
        lines.append(f"| {var:g} | " + " | ".join(cells) + " |")
    lines.append("| largest bias gradient, no noise | " + " | ".join(f"{statistics.mean(v):.2e}" for v in sizes.values()) + " |")
    return lines


def secagg_table(clients: Sequence[int], iterations: int, bins: int = 256) -> list[str]:
    """One face per client; N = 1 is the server seeing the client's own gradient (no SecAgg)."""
    from dlgkit.fl.secagg import attack_aggregate

    thresholds = imprint.imprint_thresholds(imprint.varied_faces(PUBLIC, seed=1), bins)
    lines = [
        "| clients N | seconds (SecAgg+ run) | honest attack, client 0's face (dB) | honest batch attack, mean over N faces (dB) | imprint, fraction >= 60 dB / >= 30 dB (closed form) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in clients:
        r = attack_aggregate(n, thresholds, iterations=iterations)
        took = f"{r.seconds:.0f}" if n > 1 else "no SecAgg"
        hit, seen_ok = float((r.imprint_best >= imprint.EXACT_PSNR).float().mean()), float((r.imprint_best >= SUCCESS_PSNR).float().mean())
        lines.append(f"| {n} | {took} | {r.single_psnr:.1f} | {r.batch_psnr:.1f} | {hit:.3f} / {seen_ok:.3f} ({r.expected:.3f}) |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="batches per cell (default 20)")
    parser.add_argument("--neurons", type=int, default=1000, help="width of the trap layer (default 1000)")
    parser.add_argument("--clients", default="1,2,4,8", help="SecAgg+ federation sizes, comma-separated; empty to skip (default 1,2,4,8)")
    parser.add_argument("--iterations", type=int, default=300, help="L-BFGS iterations of the honest attacks on the aggregate (default 300)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    parts = [
        "## Imprint module: recovered fraction, measured (closed form)", "", *imprint_table(args.trials), "",
        f"## Trap weights ({args.neurons} neurons): recovered fraction by margin", "", *trap_table(args.trials, args.neurons), "",
        "## Imprint module (B = 32, k = 256) under Gaussian noise (chapter 5's levels): recovered fraction / median best PSNR", "", *noise_table(args.trials), "",
    ]
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if clients:
        parts += ["## SecAgg+ with N clients of one face each: what the server gets out of the aggregate (k = 256 imprint bins)", "", *secagg_table(clients, args.iterations), ""]
    for line in parts:
        print(line)
    path = write_table("malicious", "Chapter 7: the malicious server's analytic attacks", parts, note=f"{args.trials} batches per cell; {time.time() - start:.0f} s in all.")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
