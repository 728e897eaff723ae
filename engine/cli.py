"""What every command-line entry point shares: one `error:` line and an exit code, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from .errors import EngineError

T = TypeVar("T")


def guarded(fn: Callable[[], T]) -> tuple[int, T | None]:
    """Run fn; EngineError / OSError / an error from inside torch -> (1, None) after one line on stderr;
    Ctrl-C -> (130, None)."""
    try:
        return 0, fn()
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1, None
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1, None
    except MemoryError:
        print("error: out of memory (lower resident_budget, kv_cache.max_context or --ctx)", file=sys.stderr)
        return 1, None
    except RuntimeError as e:  # torch's own errors (a CUDA failure, out of device memory) are RuntimeErrors
        lines = str(e).strip().splitlines()
        print(f"error: {type(e).__name__}: {lines[0] if lines else 'no message'}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130, None


def add_cpu_activations(p) -> None:
    """--cpu-activations on an argparse parser (engine.generate, engine.serve, engine.plan): overrides the config's
    `cpu_activations`, validated there (a bad value is one `error:` line naming the field)."""
    from .tiers.config import CPU_ACTIVATIONS

    p.add_argument("--cpu-activations", metavar="|".join(CPU_ACTIVATIONS), default=None,
                   help="how the CPU kernels round activations for Q4_K/Q5_K/Q6_K (default: the config's, int16; "
                        "int8 is faster, ~1e-2 relative logit error)")
