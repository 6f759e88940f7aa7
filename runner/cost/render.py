"""How a cost report looks: a rich table, JSON (stable field names), CSV of segments, self-contained HTML.

The HTML is one file with no external resources: the charts are inline SVG
drawn here (no plotting dependency), the numbers are plain HTML tables.  The
charts shrink to fit a narrow window; the wide segments table scrolls instead
of the page (tests/test_cost_html_browser.py measures both in Chromium).
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json
from collections.abc import Sequence
from typing import Any

from runner.cost.report import INTERRUPTED, Report, Segment

CSV_FIELDS = ("run_id", "attempt", "instance_id", "instance_type", "lifecycle", "region", "availability_zone",
              "usd_per_hour", "price_source", "on_demand_usd_per_hour", "start", "end", "duration_seconds",
              "cost_usd", "on_demand_cost_usd", "start_step", "end_step", "steps", "end_reason", "lost_steps",
              "lost_seconds", "lost_cost_usd", "stall_seconds", "crashes", "emergency_latency_s")


def money(value: float | None) -> str:
    if value is None:
        return "-"
    return f"${value:,.2f}" if abs(value) >= 0.995 else f"${value:,.4f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def totals_rows(r: Report) -> list[tuple[str, str]]:
    return [
        ("status", r.status),
        ("paid hours", f"{r.paid_hours:,.3f} h"),
        ("total cost", money(r.total_cost_usd)),
        ("on-demand equivalent", money(r.on_demand_cost_usd)),
        ("savings", f"{money(r.savings_usd)} ({pct(r.savings_pct)})"),
        ("interruptions", str(r.interruptions)),
        ("crashes", str(r.crashes)),
        ("lost work", f"{r.lost_steps} steps, {r.lost_compute_seconds / 3600:,.4f} h, {money(r.lost_cost_usd)}"),
        ("checkpoint stall", f"{r.checkpoint_stall_seconds / 3600:,.4f} h, {money(r.checkpoint_stall_cost_usd)}"),
        ("goodput", pct(None if r.goodput is None else r.goodput * 100)),
        ("steps", f"{r.steps:,}"),
        ("cost per 1,000 steps", money(r.cost_per_1000_steps_usd)),
        ("price sources", "; ".join(r.price_sources) or "-"),
    ]


def _segment_cells(s: Segment) -> list[str]:
    return [s.instance_id or "-", s.instance_type or "-", s.lifecycle or "-",
            money(s.usd_per_hour) + "/h" if s.usd_per_hour is not None else "-", duration(s.duration_seconds),
            money(s.cost_usd), f"{s.start_step}->{s.end_step}", s.end_reason, s.price_source]


SEGMENT_HEADERS = ("INSTANCE", "TYPE", "LIFECYCLE", "$/H", "DURATION", "COST", "STEPS", "END", "PRICE SOURCE")


def table(reports: Sequence[Report], console: Any) -> None:
    from rich.table import Table

    for r in reports:
        segs = Table(*SEGMENT_HEADERS, title=f"run {r.run_id}: segments", title_justify="left")
        for s in r.segments:
            segs.add_row(*_segment_cells(s))
        console.print(segs)
        totals = Table("TOTAL", "VALUE", title=f"run {r.run_id}: totals", title_justify="left")
        for name, value in totals_rows(r):
            totals.add_row(name, value)
        console.print(totals)


def to_json(reports: Sequence[Report], single: bool) -> str:
    body: Any = reports[0].to_json() if single and len(reports) == 1 else [r.to_json() for r in reports]
    return json.dumps(body, indent=2) + "\n"


def to_csv(reports: Sequence[Report]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in reports:
        for s in r.segments:
            writer.writerow({"run_id": r.run_id, **s.to_json()})
    return out.getvalue()


# -- HTML -------------------------------------------------------------------------

_W, _LEFT, _RIGHT = 960, 210, 20
_COLORS = {"spot": "#4C9BE8", "on-demand": "#E8A14C"}


def to_html(reports: Sequence[Report]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>runner cost report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>runner cost report</h1>"]
    for r in reports:
        parts.append(f'<section class="run" id="run-{html.escape(r.run_id)}"><h2>run {html.escape(r.run_id)}</h2>')
        parts.append('<table class="totals" id="totals">')
        for name, value in totals_rows(r):
            parts.append(f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>")
        parts.append("</table>")
        parts.append(_timeline_svg(r))
        parts.append(_cost_svg(r))
        # A narrow window scrolls the wide segments table, not the page.
        parts.append('<div class="scroll"><table class="segments"><tr>' +
                     "".join(f"<th>{h}</th>" for h in SEGMENT_HEADERS) + "</tr>")
        for s in r.segments:
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _segment_cells(s)) + "</tr>")
        parts.append("</table></div></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _span(r: Report) -> tuple[float, float]:
    t0 = min(s.start for s in r.segments)
    t1 = max(s.end for s in r.segments)
    return t0, max(t1, t0 + 1.0)


def _x(t: float, t0: float, t1: float) -> float:
    return _LEFT + (t - t0) / (t1 - t0) * (_W - _LEFT - _RIGHT)


def _timeline_svg(r: Report) -> str:
    if not r.segments:
        return "<p>no segments</p>"
    t0, t1 = _span(r)
    row_h = 26
    h = 40 + row_h * len(r.segments)
    out = [f'<svg class="timeline" id="timeline" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{h}" '
           f'viewBox="0 0 {_W} {h}" role="img"><title>instances, snapshots and interruptions over time</title>']
    for i, s in enumerate(r.segments):
        y = 20 + i * row_h
        x0, x1 = _x(s.start, t0, t1), _x(s.end, t0, t1)
        label = html.escape(f"{s.instance_type or '?'} {s.instance_id or s.attempt[-6:]}"[:32])
        color = _COLORS.get(s.lifecycle or "", "#999999")
        out.append(f'<text x="4" y="{y + 15}" font-size="11">{label}</text>')
        out.append(f'<rect class="segment" x="{x0:.1f}" y="{y}" width="{max(1.0, x1 - x0):.1f}" height="18" '
                   f'fill="{color}"><title>{html.escape(s.end_reason)}: {money(s.cost_usd)}, '
                   f'steps {s.start_step}-{s.end_step}</title></rect>')
        for m in r.snapshots:
            if s.start <= m.time <= s.end + 1.0:
                xm = _x(min(m.time, s.end), t0, t1)
                stroke = "#C0392B" if m.reason == "emergency" else "#222222"
                out.append(f'<line class="snapshot" x1="{xm:.1f}" x2="{xm:.1f}" y1="{y - 2}" y2="{y + 20}" '
                           f'stroke="{stroke}" stroke-width="2"><title>{html.escape(m.reason)} snapshot, '
                           f'step {m.step}</title></line>')
        if s.end_reason in INTERRUPTED:
            out.append(f'<text class="interruption" x="{x1 - 5:.1f}" y="{y + 14}" font-size="14" fill="#C0392B">'
                       f'\u2715<title>{html.escape(s.end_reason)}</title></text>')
    out.append(f'<text x="{_LEFT}" y="{h - 6}" font-size="10">{_when(t0)}</text>')
    out.append(f'<text x="{_W - _RIGHT}" y="{h - 6}" font-size="10" text-anchor="end">{_when(t1)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _cost_svg(r: Report) -> str:
    curve = r.curve()
    if not curve:
        return ""
    t0, t1 = _span(r)
    h, top, bottom = 260, 20, 40
    peak = max(max(c, od) for _, c, od in curve) or 1.0

    def y(v: float) -> float:
        return top + (1 - v / peak) * (h - top - bottom)

    def path(idx: int) -> str:
        return " ".join(f"{'M' if i == 0 else 'L'}{_x(p[0], t0, t1):.1f},{y(p[idx]):.1f}" for i, p in enumerate(curve))

    return "\n".join([
        f'<svg class="cost" id="cost-chart" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{h}" '
        f'viewBox="0 0 {_W} {h}" role="img"><title>cumulative cost against on-demand</title>',
        f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#888"/>',
        # The dashed on-demand line goes on top: where both are equal (no spot price known) it still shows.
        f'<path class="actual" d="{path(1)}" fill="none" stroke="#2E86C1" stroke-width="2.5"/>',
        f'<path class="on-demand" d="{path(2)}" fill="none" stroke="#E8A14C" stroke-dasharray="6 4" stroke-width="2"/>',
        f'<text x="4" y="{y(peak) + 4:.1f}" font-size="11">{money(peak)}</text>',
        f'<text x="4" y="{y(0):.1f}" font-size="11">$0</text>',
        f'<text x="{_LEFT + 10}" y="{h - 22}" font-size="11" fill="#2E86C1">paid {money(r.total_cost_usd)}</text>',
        f'<text x="{_LEFT + 160}" y="{h - 22}" font-size="11" fill="#E8A14C">on-demand '
        f'{money(r.on_demand_cost_usd)}</text>',
        "</svg>"])


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:13px}th{background:#f4f4f4}"
        "svg{display:block;margin:1em 0;border:1px solid #eee;max-width:100%;height:auto}"
        ".scroll{overflow-x:auto}.segments td{white-space:nowrap}.segments td:last-child{white-space:normal}")
