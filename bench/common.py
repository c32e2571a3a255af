"""Shared bits of the benchmarks: machine description and appending a table to bench/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        dev = f"CPU only, {os.cpu_count()} cores"
    return f"{platform.machine()} {platform.processor() or ''} — {dev}; torch {torch.__version__}, {torch.get_num_threads()} threads".replace(
        "  ", " "
    )


def append_results(title: str, table: str, command: str, notes: str = "") -> None:
    """Print the table and append it, with machine, date and the command, to bench/RESULTS.md."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = f"\n## {title}\n\n{stamp} · {machine()}\n\n`{command}`\n\n{table}\n"
    if notes:
        block += f"\n{notes}\n"
    print(block)
    with open(RESULTS, "a") as f:
        if f.tell() == 0:
            f.write("# Benchmark results\n\nAppended by the scripts in bench/; newest last.\n")
        f.write(block)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
