"""`glmkit serve [MODEL]`: the OpenAI-compatible HTTP API and the web chat page, on 127.0.0.1 by default.

--api-key (repeatable) or --api-key-file require 'Authorization: Bearer KEY' on every route but /health
and the page itself; --cors-origin opens CORS to a browser origin; --max-batch sequences decode
together and --max-queue more may wait (beyond that: 503 with Retry-After). Each request is logged on stderr
when it ends (--log-format text|json, --no-access-log).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from glmkit.cli.common import add_model_args, add_sampling_args, load_model, sampling


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", action="append", default=[], help="accepted API key (repeatable)")
    parser.add_argument("--api-key-file", help="a file with one accepted API key per line")
    parser.add_argument("--cors-origin", action="append", default=[], help="allowed browser origin (repeatable)")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    parser.add_argument("--prefill-chunk", type=int, default=256,
                        help="prompt tokens prefilled per step at most: longer prompts are prefilled in pieces "
                             "between decode steps, so running streams keep going (default 256)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait (default 64)")
    parser.add_argument("--model-name", default=None, help="the name clients use (default: the MODEL argument)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request limit in seconds")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="the access log on stderr: one line per request (tokens, time to first token, tok/s)")
    parser.add_argument("--no-access-log", action="store_true", help="no access log")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="vision models: fetch http(s) image URLs (default: only data: URLs and files)")
    add_sampling_args(parser, max_tokens=None)  # the server's defaults for requests that leave them out


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from glmkit.engine.threads import on_own_thread, serial
    from glmkit.errors import GlmkitError
    from glmkit.server.app import create_app
    from glmkit.server.protocol import DrainingServer, http_protocol

    keys = list(args.api_key)
    if args.api_key_file:
        try:
            keys += [k.strip() for k in Path(args.api_key_file).read_text().splitlines() if k.strip()]
        except OSError as e:
            raise GlmkitError(f"cannot read the API key file {args.api_key_file} ({e.strerror}).") from None
    if any(not k.strip() for k in keys):  # before loading: a server no one could use is refused at once
        raise GlmkitError("an API key is empty; give non-empty keys (or none, for an open server).")
    # bound before loading: minutes of loading for a busy port help no one, and the port cannot be taken while the
    # model loads (by another program, or by torch.distributed's own connections); it listens once serving starts
    serves = int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0  # not a follower
    listener = _bind(args.host, args.port) if serves else None
    # loaded on a thread that ends, so its OpenMP team ends too (engine/threads.py)
    llm = on_own_thread(load_model, args, build=True, batched=True)
    serial()  # the event loop's thread leaves the cores' parallel work to the engine thread
    defaults = sampling(args)
    llm.sampling_params(**defaults)  # checked now, not at the first request
    llm.defaults.update(defaults)
    name = args.model_name or str(args.model)
    llm.image_limits = replace(llm.image_limits, allow_remote=args.allow_image_urls)
    body = 64 << 20 if llm.config.vision is not None else 4 << 20  # images travel as data: URLs
    app = create_app(llm, model_name=name, api_keys=keys, cors_origins=args.cors_origin, max_batch=args.max_batch,
                     max_queue=args.max_queue, request_timeout=args.timeout, prefill_chunk=args.prefill_chunk,
                     access_log=None if args.no_access_log else args.log_format, max_body_bytes=body)
    _log_to_stderr()
    url = f"http://{args.host}:{args.port}"
    print(f"glmkit serve: {name} at {url}/v1 (OpenAI API; model name {name!r}), chat page at {url}/"
          + (" — API key required" if keys else ""), file=sys.stderr, flush=True)
    # idle keep-alive connections close after 5 s, a request head must arrive within 10 s, and Ctrl-C / SIGTERM
    # ends the streams in flight at once (a second one exits immediately)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=5,
                            http=http_protocol())
    from glmkit.loaders.cache import register_server

    note = register_server({"url": url, "model": name, "started": time.time()})  # for glmkit ps
    try:
        DrainingServer(config, app.state.worker).run(sockets=[listener] if listener else None)
    finally:
        note.unlink(missing_ok=True)
    if app.state.worker.fatal is not None:
        print(f"glmkit serve: {app.state.worker.fatal}", file=sys.stderr, flush=True)
        return 1
    return 0


def _log_to_stderr() -> None:
    import logging

    from glmkit.server.access import logger

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _bind(host: str, port: int):
    import socket

    from glmkit.errors import GlmkitError

    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        return listener
    except OSError as e:
        listener.close()
        raise GlmkitError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host.") from None
