"""Where the benchmarks write their tables: one Markdown file per table under
``benchmarks/results/``, committed and linked from the README."""

from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """One line naming the machine, torch and the thread count."""
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def write_table(name: str, title: str, lines: list[str], note: str = "") -> Path:
    """Write ``lines`` (a Markdown table) to ``benchmarks/results/<name>.md`` under ``title``,
    with the command that made it, the date and the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"# {title}\n\nWritten by `{command}` on {stamp} ({machine()}).\n\n" + "\n".join(lines) + "\n" + (f"\n{note.strip()}\n" if note else "")
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    return path
