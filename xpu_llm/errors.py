"""The one error type users catch: every bad input raises a subclass with a message that says what to do."""
from __future__ import annotations


class XpuLLMError(ValueError):
    """Base of all errors xpu-llm raises on purpose (bad input, unsupported model, ...)."""


class ModelNotFoundError(XpuLLMError, FileNotFoundError):
    """The model path does not exist or holds no model."""


class UnsupportedModelError(XpuLLMError):
    """The checkpoint is of an architecture or feature this engine does not implement."""


class UnknownFormatError(XpuLLMError):
    """A low-bit format name that is not in the registry."""


class CorruptCheckpointError(XpuLLMError):
    """A weights file that is truncated or unreadable."""


class GenerationInputError(XpuLLMError):
    """Bad arguments to generate(): a prompt longer than max_seq_len, max_new_tokens <= 0, ..."""
