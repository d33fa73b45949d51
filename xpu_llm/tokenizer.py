"""Tokenizers from a Hugging Face folder or a GGUF file. GGUF tokenizers are converted by transformers'
own GGUF support once (seconds) and cached as a regular tokenizer folder, so later loads take ~0.2 s."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

from .errors import CorruptCheckpointError, ModelNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached folder's content changes
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_MIB = 1 << 20
# What a tokenizer folder holds besides _TOKENIZER_FILES (copied as they are by tokenizer_files)
_TOKENIZER_PREFIXES = ("tokenizer", "chat_template")
_TOKENIZER_EXTRA = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(source: str, cache_dir: str | None = None) -> "PreTrainedTokenizerBase":
    """Tokenizer of an HF model folder or a .gguf file, with padding on the left (for batched decoding)
    and a pad token (eos when the model names none). Never touches the network."""
    source = os.path.abspath(os.fspath(source))
    if os.path.isdir(source):
        if not any(os.path.isfile(os.path.join(source, f)) for f in _TOKENIZER_FILES):
            ggufs = sorted(f for f in os.listdir(source) if f.endswith(".gguf"))
            if len(ggufs) != 1:
                raise ModelNotFoundError(
                    f"{source} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}"
                    f"{' and no single .gguf file' if not ggufs else f'; several .gguf files: {ggufs}'}); "
                    f"pass a Hugging Face model folder or the path of one .gguf file")
            return load_tokenizer(os.path.join(source, ggufs[0]), cache_dir)
        return _finish(_from_folder(source))
    if not os.path.isfile(source):
        raise ModelNotFoundError(f"tokenizer source {source} does not exist; pass a Hugging Face model folder "
                                 f"or a .gguf file")
    with open(source, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CorruptCheckpointError(
                f"{source} is not a GGUF file (no GGUF magic); pass a .gguf file or a Hugging Face model "
                f"folder, and re-download the file if it should be GGUF")
    return _finish(_from_gguf(source, cache_dir))


def _from_folder(folder: str) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)


def _finish(tok: "PreTrainedTokenizerBase") -> "PreTrainedTokenizerBase":
    tok.padding_side = "left"
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def cache_root(cache_dir: str | None = None) -> str:
    """Folder of cached GGUF tokenizers: cache_dir, else $XPU_LLM_CACHE/tokenizers, else
    ~/.cache/xpu_llm/tokenizers."""
    if cache_dir:
        return os.path.abspath(cache_dir)
    base = os.environ.get("XPU_LLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "xpu_llm")
    return os.path.join(base, "tokenizers")


def gguf_cache_key(path: str) -> str:
    """Cheap identity of a GGUF file: size, mtime and its first and last MiB, plus the converter version."""
    import transformers

    st = os.stat(path)
    h = hashlib.sha256(f"{CACHE_FORMAT}|{transformers.__version__}|{st.st_size}|{st.st_mtime_ns}|".encode())
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        f.seek(max(0, st.st_size - _MIB))
        h.update(f.read(_MIB))
    return h.hexdigest()[:32]


def tokenizer_files(source: str, cache_dir: str | None = None) -> list[str]:
    """The files that make up the tokenizer of a model folder or .gguf file (a GGUF's converted and cached
    folder, converting it the first time), so a converter can copy them without building a tokenizer."""
    source = os.path.abspath(os.fspath(source))
    folder = source
    if os.path.isfile(source):
        folder = _gguf_cache_folder(source, cache_dir)
        if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            load_tokenizer(source, cache_dir)  # converts and caches it once
    elif not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if len(ggufs) != 1:
            raise ModelNotFoundError(f"{folder} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
        return tokenizer_files(os.path.join(folder, ggufs[0]), cache_dir)
    names = [f for f in os.listdir(folder) if f.startswith(_TOKENIZER_PREFIXES) or f in _TOKENIZER_EXTRA]
    if not any(f in _TOKENIZER_FILES for f in names):
        raise ModelNotFoundError(f"{folder} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    return sorted(os.path.join(folder, f) for f in names)


def _gguf_cache_folder(path: str, cache_dir: str | None) -> str:
    return os.path.join(cache_root(cache_dir), f"{os.path.basename(path).removesuffix('.gguf')}-{gguf_cache_key(path)}")


def _from_gguf(path: str, cache_dir: str | None) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    root = cache_root(cache_dir)
    cached = _gguf_cache_folder(path, cache_dir)
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        log.debug("tokenizer of %s from cache %s", path, cached)
        return AutoTokenizer.from_pretrained(cached, trust_remote_code=False, local_files_only=True)
    tok = convert_gguf_tokenizer(path)
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
        try:
            tok.save_pretrained(tmp)
            try:
                os.replace(tmp, cached)  # atomic: readers see the whole folder or none
            except OSError:
                if not os.path.isdir(cached):  # else another process cached it first: fine
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("cached the tokenizer of %s in %s", path, cached)
    except OSError as e:
        log.warning("could not cache the tokenizer of %s in %s (%s); it will be converted again next time",
                    path, root, e)
    return tok


def convert_gguf_tokenizer(path: str) -> "PreTrainedTokenizerBase":
    """Build the tokenizer stored in a GGUF file with transformers' GGUF support (slow: parses the vocab)."""
    from transformers import AutoTokenizer

    log.info("converting the tokenizer of %s (once; cached afterwards)", path)
    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            trust_remote_code=False, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UnsupportedModelError(
            f"transformers cannot build the tokenizer stored in {path} ({type(e).__name__}: {e}); pass the "
            f"model's Hugging Face folder (with tokenizer.json) instead") from e
    if not getattr(tok, "chat_template", None):
        template = _gguf_chat_template(path)
        if template:
            tok.chat_template = template
    tok.padding_side = "left"
    return tok


def _gguf_chat_template(path: str) -> str | None:
    from .gguf_io import open_gguf

    return open_gguf(path).get("tokenizer.chat_template")
