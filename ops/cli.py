"""The `epd` command: up, worker, gateway, trace, make-tiny-model."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from epd.core.config import ROLES, Settings


def _settings(args: argparse.Namespace) -> Settings:
    """The environment's settings, with the flags given on the command line over them."""
    changes = {f.name: getattr(args, f.name, None) for f in Settings.flags()}
    return Settings(**{k: v for k, v in changes.items() if v is not None})


def _common(p: argparse.ArgumentParser) -> None:
    """A flag for every setting declared with `flag=True` (core/config.py), its help naming the variable."""
    for f in Settings.flags():
        meta = f.metadata
        kind = meta["kind"]
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind if kind is not str else None,
            choices=meta["choices"],
            help=f"{meta['help']} ({meta['env']})",
        )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="epd", description="encode / prefill / decode disaggregated serving")
    sub = ap.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="NATS, Mooncake master, gateway and workers on this machine")
    _common(up)
    up.add_argument("--workdir", type=Path, default=Path(".epd"), help="logs, traces, NATS data (default .epd)")
    up.add_argument("--encoders", type=int, default=1, help="encode workers (e-pd, e-p-d)")
    up.add_argument("--prefills", type=int, default=1, help="prefill workers; pd workers in e-pd, epd workers in epd")
    up.add_argument("--decoders", type=int, default=1, help="decode workers (e-p-d)")

    w = sub.add_parser("worker", help="run one worker")
    w.add_argument("role", choices=ROLES)
    _common(w)

    g = sub.add_parser("gateway", help="run the HTTP and NATS gateway")
    _common(g)

    t = sub.add_parser("trace", help="a request's waterfall, or the last or slowest requests")
    t.add_argument("request_id", nargs="?", help="the `id` of a chat completion response, or a trace id")
    t.add_argument("--dir", type=Path, help="span files (default EPD_TRACE_DIR or .epd/traces)")
    t.add_argument("--last", type=int, metavar="N", help="list the last N requests")
    t.add_argument("--slowest", type=int, metavar="N", help="list the N slowest requests")
    t.add_argument("--html", type=Path, metavar="FILE", help="also write the request's timeline as HTML")

    st = sub.add_parser("status", help="live workers, their load and the stage queues, from NATS")
    st.add_argument("--nats-url", help="the cluster's NATS (default EPD_NATS_URL, else what `epd up` wrote)")
    st.add_argument("--workdir", type=Path, default=Path(".epd"), help="the `epd up` workdir (default .epd)")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")

    mm = sub.add_parser("mooncake-master", help="run mooncake_master from the wheel (for deployments)")
    mm.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    mm.add_argument("--rpc-port", type=int, default=50051)
    mm.add_argument("--metadata-port", type=int, default=8080, help="HTTP metadata server")
    mm.add_argument("--metrics-port", type=int, default=9003)

    hc = sub.add_parser("healthcheck", help="exit 0 when URL answers 200 (container healthchecks)")
    hc.add_argument("--url", help="default: the gateway's /health at EPD_PORT")

    m = sub.add_parser("make-tiny-model", help="write a tiny random-weight Qwen2-VL checkpoint")
    m.add_argument("out", type=Path)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "trace":
        return _trace(args)
    if args.command == "status":
        return _status(args)
    if args.command == "healthcheck":
        return _healthcheck(args)
    if args.command == "mooncake-master":
        import os

        from epd.ops.bind_guard import preload_env
        from epd.ops.infra import master_argv

        argv = master_argv(args.host, args.rpc_port, args.metadata_port, args.metrics_port)
        os.execve(argv[0], argv, {**os.environ, **preload_env(args.host)})
    if args.command == "make-tiny-model":
        from epd.tools.tiny_model import build_tiny_qwen2_vl

        print(build_tiny_qwen2_vl(args.out))
        return 0
    try:
        settings = _settings(args)
    except ValueError as e:
        print(f"epd: {e}", file=sys.stderr)
        return 2
    if args.command == "up":
        return _up(args, settings)
    if args.command in ("worker", "gateway"):  # (they run Mooncake clients, whose listeners bind "any")
        from epd.core.config import export_mooncake_env
        from epd.ops.bind_guard import reexec_guarded

        export_mooncake_env(settings)  # this process's own address, whatever it inherited

        reexec_guarded(settings.bind_host)
    if args.command == "worker":
        from epd.workers.main import run_worker

        asyncio.run(run_worker(args.role, settings))
        return 0
    if args.command == "gateway":
        import uvicorn
        from epd.core.tracing import setup_tracing
        from epd.gateway.app import create_app

        provider = setup_tracing("epd-gateway", settings)
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
        if provider is not None:
            provider.shutdown()
        return 0
    return 2


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from epd.ops.up import run_up

    workdir = args.workdir.resolve()
    if not settings.trace_dir:
        settings = settings.replace(trace_dir=str(workdir / "traces"))
    if not (settings.model / "config.json").exists():
        print(f"epd: {settings.model} is not a checkpoint directory (no config.json)", file=sys.stderr)
        return 2
    counts = {"encode": args.encoders, "decode": args.decoders}
    counts |= dict.fromkeys(("prefill", "pd", "epd"), args.prefills)  # the worker that prefills, by topology
    return run_up(settings, workdir, counts)


def _trace(args: argparse.Namespace) -> int:
    import os

    from epd.ops import trace_view as tv

    trace_dir = args.dir or Path(os.environ.get("EPD_TRACE_DIR") or ".epd/traces")
    spans = tv.load_spans(trace_dir)
    if args.last or args.slowest:
        summaries = tv.summarize(spans)
        chosen = tv.last(summaries, args.last) if args.last else tv.slowest(summaries, args.slowest)
        for t in chosen:
            print(t.line())
        return 0 if chosen else 1
    if not args.request_id:
        print("epd trace: give a request id, --last N or --slowest N", file=sys.stderr)
        return 2
    spans = tv.spans_for_request(spans, args.request_id)
    if not spans:
        print(f"epd trace: no spans for {args.request_id} in {trace_dir}", file=sys.stderr)
        return 1
    print(tv.render_tree(spans))
    if args.html:
        args.html.write_text(tv.render_html(spans), encoding="utf-8")
        print(f"timeline written to {args.html}")
    return 0


def _healthcheck(args: argparse.Namespace) -> int:
    import os

    from epd.ops.processes import http_ok

    url = args.url or f"http://127.0.0.1:{os.environ.get('EPD_PORT', '8000')}/health"
    if http_ok(url, timeout_s=3):
        return 0
    print(f"epd healthcheck: {url} did not answer 200", file=sys.stderr)
    return 1


def _status(args: argparse.Namespace) -> int:
    import json
    import os

    import nats
    from epd.core.runtime import nats_auth
    from epd.ops.status_view import gather_status, render_status
    from epd.ops.supervisor import read_state, render_processes
    from epd.ops.up import ENDPOINTS_FILE

    url = args.nats_url or os.environ.get("EPD_NATS_URL", "")
    endpoints = args.workdir / ENDPOINTS_FILE
    if not url and endpoints.exists():
        url = json.loads(endpoints.read_text(encoding="utf-8"))["nats_url"]
    if not url:
        print(
            f"epd status: no NATS URL: pass --nats-url, set EPD_NATS_URL, or run `epd up` ({endpoints})",
            file=sys.stderr,
        )
        return 2
    supervised = read_state(args.workdir)  # what `epd up` restarted, when this is its workdir
    try:
        workers, queues = asyncio.run(gather_status(url, **nats_auth(Settings())))
    except (OSError, TimeoutError, nats.errors.Error) as e:
        print(f"epd status: cannot reach NATS at {url}: {e}", file=sys.stderr)
        if supervised:
            print(render_processes(supervised))
        return 1
    if args.json:
        import msgspec

        out = {"workers": msgspec.to_builtins(workers), "queues": queues}
        if supervised:
            out["supervisor"] = supervised
        print(json.dumps(out, indent=2))
    else:
        print(render_status(workers, queues))
        if supervised:
            print()
            print(render_processes(supervised))
    return 0


if __name__ == "__main__":
    sys.exit(main())
