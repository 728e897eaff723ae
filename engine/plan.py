"""python -m engine.plan [--model PATH | --describe MODEL:MIX] [--config YAML] [--hardware NAME|JSON] [--hybrid auto|off]
                       [--cpu-activations int16|int8] [--json]

Prints where every layer, the embedding, the output head and the KV cache would live, the staging
ring, and the predicted per-token time (compute and transfer per tier) -- without loading weights.
Examples:
  python -m engine.plan --config configs/cpu-tight.yaml
  python -m engine.plan --describe llama3-70b:Q4_K_M --config configs/rtx4090-70b.yaml
  python -m engine.plan --describe qwen3-30b-a3b:Q4_K_M --hardware rtx4090   (experts placed one by one)
Errors: one line on stderr, exit 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .cli import add_cpu_activations, guarded
from .tiers.config import AUTO, HYBRID, TierConfig, load_config
from .tiers.footprint import MIXES, ModelFootprint, describe, footprint_from_gguf
from .tiers.hardware import PRESETS, HardwareProfile, detect_device, load_profile, resolve_profile
from .tiers import speculation
from .tiers.planner import Plan, Workload, plan
from .tiers.speculation import DEFAULT_ACCEPTANCE, Speculation


def hardware_for(cfg: TierConfig, override: str | None = None) -> HardwareProfile:
    """The profile for a config: `override` or cfg.hardware (a preset or a JSON path), else the calibrated
    profile of the config's device (auto: the detected one), else conservative defaults."""
    if override is not None:
        if override in PRESETS:
            return PRESETS[override]()
        return load_profile(override)
    device = cfg.device if cfg.device != AUTO else detect_device()
    return resolve_profile(cfg.hardware, device, cfg.hardware_path())


def model_footprint(model: str | os.PathLike | None = None, description: str | None = None,
                    quantize: str | None = "q8_0") -> ModelFootprint:
    """From a GGUF file's tensor index (default: the bundled SmolLM2), a Hugging Face checkpoint
    directory (as converted with `quantize`), or a description."""
    if description is not None:
        return describe(description)
    if model is not None and os.path.isdir(model):
        from .hf import checkpoint_footprint

        return checkpoint_footprint(model, quantize)
    from .defaults import default_model_path
    from .gguf_file import GGUFFile
    from .spec import ModelSpec

    f = GGUFFile(model if model is not None else default_model_path())
    try:
        return footprint_from_gguf(f, ModelSpec.from_gguf(f))
    finally:
        f.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.plan", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[3:7]))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="GGUF file or Hugging Face checkpoint directory (default: the bundled "
                                     "SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--quantize", choices=("q8_0", "q4_k", "none"), default="q8_0",
                   help="checkpoint directories: the quantization a load would convert to (default q8_0)")
    src.add_argument("--describe", metavar="MODEL:MIX",
                     help=f"plan a model without its file: llama3-70b, llama3-8b, smollm2-135m, qwen2.5-72b, "
                          f"qwen3-32b, qwen3-30b-a3b or mixtral-8x7b, with a mix from {', '.join(MIXES)} (e.g. llama3-70b:Q4_K_M)")
    p.add_argument("--config", help="tier config YAML (default: auto)")
    p.add_argument("--hardware", help=f"hardware profile: a preset ({', '.join(PRESETS)}) or a JSON file "
                                      f"(default: the config's, else the calibrated one, else defaults)")
    p.add_argument("--hybrid", choices=HYBRID, help="override the config's hybrid_compute: auto lets host-tier "
                                                      "layers compute on the CPU in small passes, off streams them")
    add_cpu_activations(p)
    p.add_argument("--batch", type=int, default=Workload().batch)
    p.add_argument("--prompt-tokens", type=int, default=Workload().prompt_tokens)
    p.add_argument("--gen-tokens", type=int, default=Workload().gen_tokens)
    p.add_argument("--acceptance", type=float, default=DEFAULT_ACCEPTANCE,
                   help="speculative decoding: the assumed chance that a draft token is kept "
                        f"(default {DEFAULT_ACCEPTANCE}); the plan reports how many tokens to verify per pass")
    p.add_argument("--draft-ms", type=float, default=0.0,
                   help="speculative decoding: the drafter's time per drafted token in ms (0 = prompt lookup)")
    p.add_argument("--moe-profile", help="mixture of experts: router statistics JSON written by engine.calibrate "
                                         "--moe-profile (default: the calibrated one of --model, else uniform)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def router_profile(model: str | os.PathLike | None, path: str | None = None):
    """The router statistics the planner uses for a model: `path`, else the calibrated profile of the model
    file (engine.tiers.router_stats), else None (uniform routing)."""
    from .tiers.router_stats import find_router_profile, load_router_profile

    if path is not None:
        return load_router_profile(path)
    if model is not None and not os.path.isdir(model):
        return find_router_profile(model)
    return None


def run(args: argparse.Namespace) -> tuple[Plan, Speculation]:
    cfg = load_config(args.config)
    if args.hybrid is not None:
        cfg = dataclasses.replace(cfg, hybrid_compute=args.hybrid)
    if args.cpu_activations is not None:  # prices CPU compute at the profile's int8 rates where measured
        cfg = dataclasses.replace(cfg, cpu_activations=args.cpu_activations)
    work = Workload(batch=args.batch, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens)
    fp = model_footprint(args.model, args.describe, None if args.quantize == "none" else args.quantize)
    hw = hardware_for(cfg, args.hardware)
    router = router_profile(args.model, args.moe_profile) if fp.is_moe else None
    result = plan(fp, hw, cfg, work, router)
    return result, speculation.choose(fp, hw, cfg, result, acceptance=args.acceptance,
                                      draft_token_s=args.draft_ms / 1e3)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code, result = guarded(lambda: run(args))
    if code:
        return code
    p, spec = result
    if args.json:
        print(json.dumps({**p.to_json(), "speculation": spec.to_json()}, indent=2))
    else:
        print(p.table())
        print(spec.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
