"""Execute notebooks top to bottom, keep the executed copies and print the time of each.

    python scripts/run_notebooks.py --out _build/executed book solutions

Fails (exit 1) if any cell raises, an ``assert`` included. The budget follows
``DLGKIT_QUICK`` as everywhere else; the device is CUDA when PyTorch sees one.

``--simulate-cuda`` runs every notebook on the stand-in GPU of ``tests/support/simulated_cuda.py``
(a first cell installs it in the kernel): on a machine without a GPU, this finds every place
where a chapter would mix CPU and CUDA tensors, or hand a CUDA tensor to NumPy or matplotlib.
``--min-cuda-share`` also fails a notebook that leaves its work on the CPU, unless its metadata
says why (``"dlgkit": {"cpu_only": "reason"}``): such a notebook is reported as ``cpu`` with
its reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

SUPPORT = Path(__file__).resolve().parents[1] / "tests" / "support"  # where simulated_cuda.py lives
SIMULATE = f"""import sys
sys.path.insert(0, {str(SUPPORT)!r})
import simulated_cuda
simulated_cuda.install()"""
REPORT = 'print("simulated GPU share:", simulated_cuda.cuda_share(), simulated_cuda.counts)'


def _cuda_share(nb) -> float | None:
    """The share printed by the last (injected) cell of a notebook run with --simulate-cuda."""
    for output in nb.cells[-1].get("outputs", []):
        text = output.get("text", "")
        if text.startswith("simulated GPU share:"):
            return float(text.split()[3])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="notebooks or folders of notebooks")
    parser.add_argument("--out", default="_build/executed", help="where executed copies go")
    parser.add_argument("--timeout", type=int, default=3600, help="per-cell timeout in seconds")
    parser.add_argument("--simulate-cuda", action="store_true", help="run on the simulated CUDA device (no GPU needed)")
    parser.add_argument("--min-cuda-share", type=float, default=0.0,
                        help="with --simulate-cuda: fail a notebook in which fewer of the tensor operations ran on the GPU")
    args = parser.parse_args()
    notebooks = []
    for p in map(Path, args.paths):
        notebooks += sorted(p.glob("*.ipynb")) if p.is_dir() else [p]
    out = Path(args.out)
    rows, failed = [], []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        if args.simulate_cuda:
            nb.cells.insert(0, nbformat.v4.new_code_cell(SIMULATE))
            nb.cells.append(nbformat.v4.new_code_cell(REPORT))
        client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        status = "ok"
        try:
            client.execute()
        except CellExecutionError as exc:
            status = "FAILED"
            failed.append(path)
            print(f"{path}: {str(exc).splitlines()[-1] if str(exc) else exc}", file=sys.stderr)
        seconds = time.perf_counter() - start
        share = _cuda_share(nb) if args.simulate_cuda and status == "ok" else None
        cpu_only = nb.metadata.get("dlgkit", {}).get("cpu_only")
        if share is not None and share < args.min_cuda_share and cpu_only:
            status = "cpu"
            print(f"{path}: {share:.0%} of the tensor operations ran on the GPU, by design: {cpu_only}", file=sys.stderr)
        elif share is not None and share < args.min_cuda_share:
            status = "FAILED"
            failed.append(path)
            print(f"{path}: only {share:.0%} of the tensor operations ran on the GPU (at least {args.min_cuda_share:.0%} expected)", file=sys.stderr)
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
        rows.append((str(path), seconds, status, "" if share is None else f"{share:.1%}"))
        print(f"{status:6s} {seconds:8.1f} s  {path}", flush=True)
    extra = " GPU share of operations |" if args.simulate_cuda else ""
    print(f"\n| notebook | time (s) | result |{extra}\n| --- | --- | --- |{' --- |' if extra else ''}")
    for name, seconds, status, share in rows:
        print(f"| {name} | {seconds:.1f} | {status} |{f' {share} |' if extra else ''}")
    print(f"| total | {sum(r[1] for r in rows):.1f} | {len(rows) - len(failed)}/{len(rows)} passed |{' |' if extra else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
