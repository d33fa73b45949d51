"""xpu-llm: serve and fine-tune Llama-family LLMs in low-bit formats on Intel XPU, NVIDIA and CPU."""
from __future__ import annotations

import logging

from .errors import (CorruptCheckpointError, GenerationInputError, ModelNotFoundError,
                     UnknownFormatError, UnsupportedModelError, XpuLLMError)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = ["LLM", "AutoModelForCausalLM", "optimize_model", "XpuLLMError", "ModelNotFoundError",
           "UnsupportedModelError", "UnknownFormatError", "CorruptCheckpointError",
           "GenerationInputError", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import xpu_llm` stays cheap (the CLI's cold start counts).
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name in ("AutoModelForCausalLM", "optimize_model"):
        from . import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'xpu_llm' has no attribute {name!r}")
