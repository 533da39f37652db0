"""`epd trace`: read the JSON-lines span files; a request's waterfall, the last or slowest requests, HTML."""

from __future__ import annotations

import html
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# attributes worth a glance in the waterfall, shown by their last dotted part
KEY_ATTRIBUTES = (
    "epd.route",
    "epd.ec_hits",
    "epd.hit",
    "epd.images",
    "epd.bytes",
    "epd.layers",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "epd.ttft_ms",
    "epd.tpot_ms",
    "http.response.status_code",
    "error.type",
    "epd.attempt",
)
BAR_WIDTH = 32


def load_spans(trace_dir: Path) -> list[dict]:
    spans = []
    for f in sorted(Path(trace_dir).glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    spans.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line being written right now
    return spans


def spans_for_request(spans: list[dict], request_id: str) -> list[dict]:
    """All spans of the trace whose spans name `request_id` (or whose trace id it is)."""
    trace_ids = {s["trace_id"] for s in spans if s["attributes"].get("epd.request_id") == request_id}
    trace_ids |= {s["trace_id"] for s in spans if s["trace_id"] == request_id}
    return [s for s in spans if s["trace_id"] in trace_ids]


@dataclass
class TraceSummary:
    request_id: str
    trace_id: str
    start_ns: int
    duration_ms: float
    spans: int
    services: int
    error: bool
    slowest: str  # the leaf span that took longest: where the time went

    def line(self) -> str:
        when = datetime.fromtimestamp(self.start_ns / 1e9).strftime("%H:%M:%S.%f")[:-3]
        flag = " ERROR" if self.error else ""
        return (
            f"{self.request_id or self.trace_id:<44} {when}  {self.duration_ms:9.1f}ms  {self.spans:>3} spans "
            f"{self.services} processes  slowest: {self.slowest}{flag}"
        )


def summarize(spans: list[dict]) -> list[TraceSummary]:
    """One summary per trace, in start order."""
    by_trace: dict[str, list[dict]] = defaultdict(list)
    for s in spans:
        by_trace[s["trace_id"]].append(s)
    out = []
    for trace_id, group in by_trace.items():
        parents = {s["parent_id"] for s in group}
        leaves = [s for s in group if s["span_id"] not in parents] or group
        slowest = max(leaves, key=lambda s: s["end_ns"] - s["start_ns"])
        # the request the trace's root span names (a worker's span may name another request it waited on)
        named = sorted(group, key=lambda s: s["parent_id"] is not None)
        rid = next((s["attributes"]["epd.request_id"] for s in named if s["attributes"].get("epd.request_id")), "")
        start = min(s["start_ns"] for s in group)
        out.append(
            TraceSummary(
                request_id=rid,
                trace_id=trace_id,
                start_ns=start,
                duration_ms=(max(s["end_ns"] for s in group) - start) / 1e6,
                spans=len(group),
                services=len({(s["service"], s["pid"]) for s in group}),
                error=any(s["status"] == "ERROR" for s in group),
                slowest=f"{slowest['name']} {(slowest['end_ns'] - slowest['start_ns']) / 1e6:.1f}ms",
            )
        )
    return sorted(out, key=lambda t: t.start_ns)


def last(summaries: list[TraceSummary], n: int) -> list[TraceSummary]:
    return summaries[-n:]


def slowest(summaries: list[TraceSummary], n: int) -> list[TraceSummary]:
    return sorted(summaries, key=lambda t: t.duration_ms, reverse=True)[:n]


def _ordered(spans: list[dict]) -> list[tuple[int, dict]]:
    """Depth-first, children by start time: (depth, span)."""
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict]] = defaultdict(list)
    for s in spans:
        children[s["parent_id"] if s["parent_id"] in ids else None].append(s)
    out: list[tuple[int, dict]] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children[parent], key=lambda x: x["start_ns"]):
            out.append((depth, s))
            walk(s["span_id"], depth + 1)

    walk(None, 0)
    return out


def _attrs(span: dict) -> str:
    a = span["attributes"]
    return " ".join(f"{k.split('.')[-1]}={a[k]}" for k in KEY_ATTRIBUTES if k in a)


def render_tree(spans: list[dict]) -> str:
    """The waterfall: span, process, start offset, duration, a bar on the request's timeline, attributes."""
    if not spans:
        return ""
    t0 = min(s["start_ns"] for s in spans)
    total = max(max(s["end_ns"] for s in spans) - t0, 1)
    lines = [f"trace {spans[0]['trace_id']}  ({len(spans)} spans, {total / 1e6:.1f}ms)"]
    for depth, s in _ordered(spans):
        dur = (s["end_ns"] - s["start_ns"]) / 1e6
        start = (s["start_ns"] - t0) / 1e6
        a = int(BAR_WIDTH * (s["start_ns"] - t0) / total)
        b = max(a + 1, int(round(BAR_WIDTH * (s["end_ns"] - t0) / total)))
        bar = " " * a + "█" * (b - a) + " " * (BAR_WIDTH - b)
        where = f"{s['service']}[{s['pid']}]"
        status = " ERROR" if s["status"] == "ERROR" else ""
        lines.append(
            f"{'  ' * depth}{s['name']:<{44 - 2 * depth}} {where:<22} +{start:9.1f}ms {dur:9.1f}ms "
            f"|{bar}|{status} {_attrs(s)}".rstrip()
        )
    return "\n".join(lines)


def render_html(spans: list[dict]) -> str:
    """A self-contained HTML timeline of one trace, one row a span, colored by process."""
    t0 = min(s["start_ns"] for s in spans)
    total = max(max(s["end_ns"] for s in spans) - t0, 1)
    palette = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"]
    colors: dict[str, str] = {}
    rows = []
    for depth, s in _ordered(spans):
        color = colors.setdefault(s["service"], palette[len(colors) % len(palette)])
        left = 100 * (s["start_ns"] - t0) / total
        width = max(100 * (s["end_ns"] - s["start_ns"]) / total, 0.2)
        dur = (s["end_ns"] - s["start_ns"]) / 1e6
        tip = html.escape(json.dumps(s["attributes"], sort_keys=True))
        rows.append(
            f'<tr><td style="padding-left:{depth}em">{html.escape(s["name"])}</td>'
            f"<td>{html.escape(s['service'])}[{s['pid']}]</td><td>{dur:.1f} ms</td>"
            f'<td class="t"><div title="{tip}" style="left:{left:.2f}%;width:{width:.2f}%;background:{color}">'
            "</div></td></tr>"
        )
    return (
        "<!doctype html><meta charset=utf-8><title>trace {tid}</title><style>"
        "body{{font:13px sans-serif}}td{{white-space:nowrap;padding:1px 6px}}"
        "td.t{{position:relative;width:60%}}td.t div{{position:absolute;top:3px;height:12px;border-radius:2px}}"
        "</style><h3>trace {tid} &mdash; {ms:.1f} ms</h3><table>{rows}</table>"
    ).format(tid=spans[0]["trace_id"], ms=total / 1e6, rows="".join(rows))
