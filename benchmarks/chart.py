"""Bar charts (SVG, no plotting library) of the benchmarks' results, for the README and docs.

The benchmark scripts draw them from the rows they measured (`bar_svg`); a RESULTS file
already written can be drawn again from its table:

    python -m benchmarks.chart benchmarks/RESULTS-llm.md "decode tok/s b1" \
        --out benchmarks/RESULTS-llm-decode.svg --title "Llama decode, batch 1" --unit tokens/s
"""

from __future__ import annotations

import argparse
import math
import re
from html import escape
from pathlib import Path

BAR_HEIGHT, GAP, LABEL_WIDTH, BAR_WIDTH, MARGIN = 18, 6, 190, 360, 12
COLORS = {"graphopt": "#2b6cb0", "other": "#a0aec0"}


def bar_svg(title: str, bars: list[tuple[str, float]], unit: str, *, note: str = "") -> str:
    """A horizontal bar chart: one bar per (label, value), longest = largest value; graphopt's
    own rows (labels starting with "graphopt") in blue, the anchors in grey. NaN bars are
    left out."""
    bars = [(label, value) for label, value in bars if not math.isnan(value)]
    if not bars:
        raise ValueError(f"{title}: nothing to draw (no numeric values)")
    top = max(value for _, value in bars) or 1.0
    width = LABEL_WIDTH + BAR_WIDTH + 80
    height = MARGIN * 2 + 24 + len(bars) * (BAR_HEIGHT + GAP) + (18 if note else 0)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{MARGIN}" y="{MARGIN + 12}" font-size="14" font-weight="bold">'
        f"{escape(title)} ({escape(unit)})</text>",
    ]
    y = MARGIN + 24
    for label, value in bars:
        length = max(1.0, BAR_WIDTH * value / top)
        color = COLORS["graphopt" if label.startswith("graphopt") else "other"]
        out += [
            f'<text x="{LABEL_WIDTH - 6}" y="{y + BAR_HEIGHT - 5}" text-anchor="end">'
            f"{escape(label)}</text>",
            f'<rect x="{LABEL_WIDTH}" y="{y}" width="{length:.1f}" height="{BAR_HEIGHT}" '
            f'fill="{color}"/>',
            f'<text x="{LABEL_WIDTH + length + 4:.1f}" y="{y + BAR_HEIGHT - 5}">{value:g}</text>',
        ]
        y += BAR_HEIGHT + GAP
    if note:
        out.append(f'<text x="{MARGIN}" y="{y + 12}" fill="#555">{escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def table_column(markdown: str, column: str, section: str | None = None) -> list[tuple[str, float]]:
    """(first cell, value of `column`) for each row of the first markdown table that has
    `column` (under the heading `section`, if given). Cells that are not numbers become NaN."""
    lines = markdown.splitlines()
    if section is not None:
        starts = [i for i, line in enumerate(lines) if line.lstrip("#").strip() == section]
        if not starts:
            raise ValueError(f"no heading {section!r} in the file")
        lines = lines[starts[0] :]
    for i, line in enumerate(lines):
        cells = _cells(line)
        if column in cells and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            at = cells.index(column)
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                values = _cells(row)
                rows.append((values[0], _number(values[at])))
            return rows
    raise ValueError(f"no table with a column {column!r}")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")] if "|" in line else []


def _number(cell: str) -> float:
    match = re.match(r"^-?\d+(\.\d+)?", cell)
    return float(match.group(0)) if match else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a RESULTS-*.md file")
    parser.add_argument("column", help="the table column to draw, as in its header")
    parser.add_argument("--section", help="the heading the table is under (default: first)")
    parser.add_argument("--out", type=Path, required=True, help="the SVG file to write")
    parser.add_argument("--title", required=True)
    parser.add_argument("--unit", required=True)
    args = parser.parse_args(argv)
    bars = table_column(args.results.read_text(), args.column, args.section)
    note = f"from {args.results.name}, column '{args.column}'"
    args.out.write_text(bar_svg(args.title, bars, args.unit, note=note))
    print(f"wrote {args.out} ({len(bars)} bars)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
