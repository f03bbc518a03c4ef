"""Write an evaluation's results: every number as JSON, a Markdown report with one table that puts
the models side by side, and SVG bar charts drawn by hand (no plotting library).

`results` is {"models": {model name: {suite: suite result}}, "config": {...}} as eval.run builds
it. The Markdown table and the charts show the headline numbers (see HEADLINE); everything else,
per-example answers included, stays in results.json.
"""
from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

# Leaf names that make the side-by-side table, and the chart each belongs to (its unit).
HEADLINE = {
    "aligned": "rate", "acc": "rate", "acc_norm": "rate", "refusal_rate": "rate",
    "judge_refusal_rate": "rate", "lang_aligned": "rate", "echo_degenerate": "rate", "end_of_turn": "rate",
    "bleu": "0-100", "chrf++": "0-100",
    "score": "1-10", "turn1": "1-10", "turn2": "1-10",
    "ppl": "ppl", "answer_nll": "nll", "eot_nll": "eot",
}
CHART_TITLES = {"rate": "Rates (0-1; echo/degenerate: lower is better, the rest higher)",
                "0-100": "Translation (BLEU, chrF++)", "1-10": "MT-bench judge score (1-10)",
                "ppl": "Perplexity (lower is better)", "nll": "Answer NLL per token (lower is better)",
                "eot": "End-of-turn NLL after the reference answer (lower is better)"}
# Bulky or per-item parts that are in the JSON but not worth a table row.
_SKIP = {"examples", "predictions", "per_text_ppl", "langs", "refused", "judge_refused", "judgements",
         "per_subject", "per_category", "shares", "precisions", "echo"}


def clean(value):
    """JSON-safe copy: NaN/inf become null (strict JSON has no NaN), tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def headline(model_result: dict) -> dict[str, float | None]:
    """{"suite/part/metric": value} for the HEADLINE leaves of one model's results."""
    out: dict[str, float | None] = {}

    def walk(node, path):
        for key, value in node.items():
            if key in _SKIP:
                continue
            if isinstance(value, dict):
                walk(value, path + [key])
            elif key in HEADLINE and (isinstance(value, (int, float)) or value is None) and not isinstance(value, bool):
                out["/".join(path + [key])] = None if value is None or not math.isfinite(value) else float(value)
    walk(model_result, [])
    return out


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    if HEADLINE.get(metric.rsplit("/", 1)[-1]) == "rate":
        return f"{value:.3f}"
    return f"{value:.2f}"


def markdown_table(results: dict, change: bool = False) -> str:
    """One row per headline metric, one column per model; change=True adds a column with the
    last model's value minus the first's (a before/after table)."""
    models = list(results["models"])
    rows = {name: headline(r) for name, r in results["models"].items()}
    metrics = list(dict.fromkeys(m for name in models for m in rows[name]))
    extra = ["change"] if change else []
    lines = ["| metric | " + " | ".join(models + extra) + " |", "|---|" + "---:|" * (len(models) + len(extra))]
    for metric in metrics:
        values = [rows[name].get(metric) for name in models]
        cells = [_fmt(v, metric) for v in values]
        if change:
            first, last = values[0], values[-1]
            cells.append("–" if first is None or last is None else "+" * (last >= first) + _fmt(last - first, metric))
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"]


def svg_bar_chart(title: str, groups: list[str], series: dict[str, list[float | None]],
                  bar_width: int = 18, plot_height: int = 200) -> str:
    """Grouped vertical bars: one group per metric (x axis), one bar per model (colour).

    series: {model: [value per group]} (None = missing, drawn as nothing). Group names are
    written vertically under the axis, so the bottom margin grows with the longest name.
    Returns SVG text."""
    names = list(series)
    values = [v for vs in series.values() for v in vs if v is not None]
    top = _nice_ceiling(max(values + [0.0]) or 1.0)
    char_w = 6.5                                   # ~width of one 11px sans-serif character
    left, right, head = 50, 20, 40                 # margins: axis values, -, title
    foot = 16 + char_w * max((len(g) for g in groups), default=0)
    group_w = bar_width * max(len(names), 1) + 16
    width = left + right + group_w * max(len(groups), 1)
    legend_y = head + plot_height + foot + 10
    height = legend_y + 20 * len(names)
    y = lambda v: head + plot_height * (1 - v / top)  # noqa: E731  value -> pixel row
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for i in range(5):  # horizontal grid lines with their values
        v = top * i / 4
        parts.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{width - right}" y2="{y(v):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    for g, group in enumerate(groups):
        x0 = left + g * group_w + 8
        for m, name in enumerate(names):
            v = series[name][g]
            if v is None:
                continue
            x = x0 + m * bar_width
            tooltip = f"{escape(name)} {escape(group)}: {v:.4g}"
            parts.append(f'<rect x="{x}" y="{y(v):.1f}" width="{bar_width - 2}" height="{y(0) - y(v):.1f}" '
                         f'fill="{PALETTE[m % len(PALETTE)]}"><title>{tooltip}</title></rect>')
        cx, cy = x0 + (group_w - 16) / 2 + 4, y(0) + 8
        parts.append(f'<text x="{cx:.1f}" y="{cy:.1f}" text-anchor="end" '
                     f'transform="rotate(-90 {cx:.1f} {cy:.1f})">{escape(group)}</text>')
    for m, name in enumerate(names):  # legend under the plot
        ly = legend_y + 20 * m
        parts.append(f'<rect x="{left}" y="{ly - 10}" width="12" height="12" fill="{PALETTE[m % len(PALETTE)]}"/>')
        parts.append(f'<text x="{left + 18}" y="{ly}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_line_chart(title: str, xs: list[float], series: dict[str, list[tuple[float, float] | None]],
                   x_label: str = "", y_label: str = "", plot_width: int = 360, plot_height: int = 200) -> str:
    """Lines over a shared x axis, each point a (mean, spread) drawn as a dot with a +-spread bar
    (e.g. the mean and standard deviation over seeds); None = no point. Returns SVG text."""
    names = list(series)
    points = [p for ps in series.values() for p in ps if p is not None]
    lows = [m - d for m, d in points] or [0.0]
    highs = [m + d for m, d in points] or [1.0]
    lo, hi = min(lows), max(highs)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    left, right, head, foot = 64, 20, 40, 44
    width, plot_bottom = left + plot_width + right, head + plot_height
    height = plot_bottom + foot + 20 * len(names)
    px = lambda x: left + plot_width * (x - x_lo) / (x_hi - x_lo)  # noqa: E731
    py = lambda v: head + plot_height * (1 - (v - lo) / (hi - lo))  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        parts.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{left + plot_width}" y2="{py(v):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for x in xs:
        parts.append(f'<text x="{px(x):.1f}" y="{plot_bottom + 14}" text-anchor="middle">{x:g}</text>')
    parts.append(f'<text x="{left + plot_width / 2:.1f}" y="{plot_bottom + 30}" text-anchor="middle">'
                 f'{escape(x_label)}</text>')
    parts.append(f'<text x="14" y="{head + plot_height / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {head + plot_height / 2:.1f})">{escape(y_label)}</text>')
    for k, name in enumerate(names):
        colour = PALETTE[k % len(PALETTE)]
        pts = [(x, p) for x, p in zip(xs, series[name]) if p is not None]
        if len(pts) > 1:
            path = " ".join(f"{px(x):.1f},{py(m):.1f}" for x, (m, _) in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, (m, d) in pts:
            parts.append(f'<line x1="{px(x):.1f}" y1="{py(m - d):.1f}" x2="{px(x):.1f}" y2="{py(m + d):.1f}" '
                         f'stroke="{colour}"/>')
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(m):.1f}" r="3" fill="{colour}">'
                         f'<title>{escape(name)} at {x:g}: {m:.4g} +- {d:.2g}</title></circle>')
        ly = plot_bottom + foot + 20 * k
        parts.append(f'<rect x="{left}" y="{ly - 10}" width="12" height="12" fill="{colour}"/>')
        parts.append(f'<text x="{left + 18}" y="{ly}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _nice_ceiling(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= v (a readable axis top)."""
    exp = 10 ** math.floor(math.log10(v))
    for step in (1, 2, 2.5, 5, 10):
        if step * exp >= v:
            return step * exp
    return 10 * exp


def charts(results: dict) -> dict[str, str]:
    """{unit: SVG} for each unit that has at least one number."""
    rows = {name: headline(r) for name, r in results["models"].items()}
    out = {}
    for unit, title in CHART_TITLES.items():
        metrics = list(dict.fromkeys(m for r in rows.values() for m in r
                                     if HEADLINE[m.rsplit("/", 1)[-1]] == unit))
        if not metrics:
            continue
        series = {name: [r.get(m) for m in metrics] for name, r in rows.items()}
        if all(v is None for vs in series.values() for v in vs):
            continue
        out[unit] = svg_bar_chart(title, metrics, series)
    return out


def write_json(data, path: str | Path) -> Path:
    """data as strict, readable UTF-8 JSON (NaN -> null) at path."""
    path = Path(path)
    path.write_text(json.dumps(clean(data), indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    return path


def chart_file(unit: str) -> str:
    """File name of a unit's chart: "0-100" -> chart_0_100.svg."""
    return "chart_" + unit.replace("-", "_").replace("+", "") + ".svg"


def write_charts(svgs: dict[str, str], out_dir: str | Path) -> dict[str, Path]:
    """Write {unit: SVG} as out_dir/chart_<unit>.svg. -> {file name: path}."""
    paths = {}
    for unit, svg in svgs.items():
        path = Path(out_dir) / chart_file(unit)
        path.write_text(svg, encoding="utf-8")
        paths[path.name] = path
    return paths


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, report.md and chart_*.svg into out_dir. -> {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "report.md"}
    write_json(results, paths["json"])
    md = ["# Evaluation report", ""]
    config = results.get("config", {})
    if config:
        md += ["Run: " + ", ".join(f"`{k}={v}`" for k, v in config.items()), ""]
    md += ["## Side by side", "", markdown_table(results), ""]
    svgs = charts(results)
    paths.update(write_charts(svgs, out_dir))
    md += [line for unit in svgs for line in (f"![{CHART_TITLES[unit]}]({chart_file(unit)})", "")]
    md += ["Every number, per-example answers included, is in `results.json`.", ""]
    paths["markdown"].write_text("\n".join(md), encoding="utf-8")
    return paths
