"""`epd trace`: one request's spans as an indented tree, from the JSON-lines span files."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def load_spans(trace_dir: Path) -> list[dict]:
    spans = []
    for f in sorted(trace_dir.glob("*.jsonl")):
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


def render_tree(spans: list[dict]) -> str:
    if not spans:
        return ""
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict]] = defaultdict(list)
    for s in spans:
        children[s["parent_id"] if s["parent_id"] in ids else None].append(s)
    t0 = min(s["start_ns"] for s in spans)
    lines = [f"trace {spans[0]['trace_id']}  ({len(spans)} spans)"]

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children[parent], key=lambda x: x["start_ns"]):
            dur = (s["end_ns"] - s["start_ns"]) / 1e6
            start = (s["start_ns"] - t0) / 1e6
            where = f"{s['service']}[{s['pid']}]"
            keys = (
                "epd.route",
                "epd.ec_hits",
                "epd.hit",
                "epd.bytes",
                "gen_ai.usage.input_tokens",
                "gen_ai.usage.output_tokens",
                "epd.attempt",
            )
            attrs = " ".join(f"{k.split('.')[-1]}={s['attributes'][k]}" for k in keys if k in s["attributes"])
            status = " ERROR" if s["status"] == "ERROR" else ""
            lines.append(
                f"{'  ' * depth}{s['name']:<{44 - 2 * depth}} {where:<24} +{start:9.1f}ms "
                f"{dur:9.1f}ms{status} {attrs}".rstrip()
            )
            walk(s["span_id"], depth + 1)

    walk(None, 0)
    return "\n".join(lines)
