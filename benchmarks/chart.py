"""Charts (SVG, no plotting library) of the benchmarks' results, for the README and docs.

The benchmark scripts draw them from the rows they measured (`bar_svg`, `line_svg`); a RESULTS file
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


PALETTE = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#718096")
PLOT_WIDTH, PLOT_HEIGHT, AXIS_LEFT = 460, 260, 48


def line_svg(
    title: str,
    lines: dict[str, list[tuple[float, float]]],
    *,
    x_label: str,
    y_label: str,
    points: dict[str, list[tuple[float, float]]] | None = None,
    dashed: frozenset[str] = frozenset(),
    colors: dict[str, str] | None = None,
    log2_x: bool = True,
    y_range: tuple[float, float] = (0.0, 1.0),
    note: str = "",
) -> str:
    """A line chart: each of `lines` (label -> [(x, y)]) a polyline, `points` (label -> [(x, y)])
    as marks in the color of the first line whose first word theirs is, a legend on the
    right; `colors` (label -> color) where not the palette's. x on a log2 axis by default."""
    series = [label for label in lines] + [p for p in (points or {}) if p not in lines]
    if not any(lines.values()):
        raise ValueError(f"{title}: nothing to draw")
    xs = [x for values in [*lines.values(), *(points or {}).values()] for x, _ in values]
    scale = math.log2 if log2_x else (lambda v: v)
    x0, x1 = scale(min(xs)), scale(max(xs))
    y0, y1 = y_range
    legend_width = 230
    width = AXIS_LEFT + PLOT_WIDTH + legend_width + MARGIN
    height = MARGIN + 30 + PLOT_HEIGHT + 40 + (18 if note else 0)
    top = MARGIN + 30

    def px(x: float) -> float:
        return AXIS_LEFT + PLOT_WIDTH * (scale(x) - x0) / ((x1 - x0) or 1)

    def py(y: float) -> float:
        return top + PLOT_HEIGHT * (1 - (min(max(y, y0), y1) - y0) / ((y1 - y0) or 1))

    color = {
        label: (colors or {}).get(label, PALETTE[i % len(PALETTE)]) for i, label in enumerate(lines)
    }
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{MARGIN}" y="{MARGIN + 12}" font-size="14" font-weight="bold">'
        f"{escape(title)}</text>",
        f'<rect x="{AXIS_LEFT}" y="{top}" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" '
        'fill="none" stroke="#999"/>',
    ]
    for k in range(5):  # y grid
        y = y0 + (y1 - y0) * k / 4
        out += [
            f'<line x1="{AXIS_LEFT}" x2="{AXIS_LEFT + PLOT_WIDTH}" y1="{py(y):.1f}" '
            f'y2="{py(y):.1f}" stroke="#eee"/>',
            f'<text x="{AXIS_LEFT - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>',
        ]
    for x in sorted(set(xs)):  # x ticks at the data's x values
        out.append(
            f'<text x="{px(x):.1f}" y="{top + PLOT_HEIGHT + 14}" text-anchor="middle">{x:g}</text>'
        )
    out += [
        f'<text x="{AXIS_LEFT + PLOT_WIDTH / 2}" y="{top + PLOT_HEIGHT + 30}" '
        f'text-anchor="middle">{escape(x_label)}</text>',
        f'<text x="{MARGIN}" y="{top + PLOT_HEIGHT / 2}" transform="rotate(-90 {MARGIN + 4} '
        f'{top + PLOT_HEIGHT / 2})" text-anchor="middle">{escape(y_label)}</text>',
    ]
    for label, values in lines.items():
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(values))
        dash = ' stroke-dasharray="5,4"' if label in dashed else ""
        out.append(
            f'<polyline points="{path}" fill="none" stroke="{color[label]}" '
            f'stroke-width="2"{dash}/>'
        )
    for label, values in (points or {}).items():
        owner = next((name for name in lines if label.startswith(name.split(" ")[0])), None)
        fill = color.get(owner, "#000")
        for x, y in values:
            out.append(
                f'<rect x="{px(x) - 4:.1f}" y="{py(y) - 4:.1f}" width="8" height="8" '
                f'fill="{fill}" stroke="black"/>'
            )
    legend_x, y = AXIS_LEFT + PLOT_WIDTH + 16, top + 6
    for label in series:
        mark = color.get(label)
        if mark is not None:
            dash = ' stroke-dasharray="5,4"' if label in dashed else ""
            out.append(
                f'<line x1="{legend_x}" x2="{legend_x + 22}" y1="{y}" y2="{y}" '
                f'stroke="{mark}" stroke-width="2"{dash}/>'
            )
        else:
            out.append(
                f'<rect x="{legend_x + 7}" y="{y - 4}" width="8" height="8" fill="white" '
                'stroke="black"/>'
            )
        out.append(f'<text x="{legend_x + 28}" y="{y + 4}">{escape(label)}</text>')
        y += 18
    if note:
        out.append(f'<text x="{MARGIN}" y="{height - 8}" fill="#555">{escape(note)}</text>')
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
