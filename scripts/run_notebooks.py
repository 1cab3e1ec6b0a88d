"""Execute notebooks top to bottom, keep the executed copies and print the time of each.

    python scripts/run_notebooks.py --out _build/executed book solutions

Fails (exit 1) if any cell raises, an ``assert`` included. The budget follows
``DLGKIT_QUICK`` as everywhere else; the device is CUDA when PyTorch sees one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="notebooks or folders of notebooks")
    parser.add_argument("--out", default="_build/executed", help="where executed copies go")
    parser.add_argument("--timeout", type=int, default=3600, help="per-cell timeout in seconds")
    args = parser.parse_args()
    notebooks = []
    for p in map(Path, args.paths):
        notebooks += sorted(p.glob("*.ipynb")) if p.is_dir() else [p]
    out = Path(args.out)
    rows, failed = [], []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
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
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
        rows.append((str(path), seconds, status))
        print(f"{status:6s} {seconds:8.1f} s  {path}", flush=True)
    print("\n| notebook | time (s) | result |\n| --- | --- | --- |")
    for name, seconds, status in rows:
        print(f"| {name} | {seconds:.1f} | {status} |")
    print(f"| total | {sum(r[1] for r in rows):.1f} | {len(rows) - len(failed)}/{len(rows)} passed |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
