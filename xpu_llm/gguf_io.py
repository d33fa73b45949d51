"""Read GGUF checkpoints (llama.cpp's format): the config in Hugging Face form and the tensors under HF
names, streamed one at a time from the reader's memmap. Q4_0 / Q4_1 / Q8_0 blocks are re-laid out into
our sym_int4 / asym_int4 / sym_int8 payloads without re-quantizing; llama.cpp's Q/K row permutation
(interleaved RoPE) is undone by permuting rows, which is lossless for every payload."""
from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .errors import CorruptCheckpointError, ModelNotFoundError, UnsupportedModelError

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")
PERMUTED_ARCHS = ("llama", "mistral")     # llama.cpp's LlamaModel permutes Q/K; Qwen2Model does not
GROUP_SIZE = 32                            # block size of Q4_0, Q4_1 and Q8_0

_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_FOLDED = ("rope_freqs.weight",)           # Llama-3 RoPE factors: folded into hf_config()["rope_scaling"]
_FLOAT_TYPES = ("F32", "F16", "BF16")
_NATIVE_KINDS = {"Q4_0": "sym_int4", "Q4_1": "asym_int4", "Q8_0": "sym_int8"}
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
# Closest of our formats for a GGUF type we dequantize (file_type_name's answer for K-quant files).
_SUGGESTED = {"Q5_0": "sym_int4", "Q5_1": "asym_int4", "Q2_K": "sym_int4", "Q3_K": "sym_int4",
              "Q4_K": "sym_int4", "Q5_K": "sym_int4", "Q6_K": "sym_int8", "Q8_1": "sym_int8",
              "Q8_K": "sym_int8"}


def hf_name(gguf_name: str) -> str | None:
    """HF parameter name of a GGUF tensor name (None for the ones we fold into the config)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    if gguf_name in _FOLDED:
        return None
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise UnsupportedModelError(
            f"GGUF tensor {gguf_name!r} has no counterpart in the Llama-family model xpu-llm runs; this file "
            f"is probably of an architecture we do not support (supported: {', '.join(SUPPORTED_ARCHS)})")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_index(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permute (as transformers' _reverse_permute_weights does)."""
    dim = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, dim, 2).swapaxes(1, 2).reshape(-1)


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(x)))


class GGUFFile:
    """An opened, validated GGUF file; cheap to query, tensors read lazily from the memmap."""

    def __init__(self, path: str, reader: Any) -> None:
        self.path = path
        self.reader = reader
        self.arch = str(self.get("general.architecture", ""))
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"{path}: GGUF architecture {self.arch!r} is not supported; xpu-llm runs "
                f"{', '.join(SUPPORTED_ARCHS)} GGUF files (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama ...)")
        self._by_name: dict[str, Any] = {}
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._by_name[name] = t
        self._config = self._build_config()

    # ---- metadata -------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """One metadata value (str, int, float, bool or list of those); `default` when absent. Long string
        arrays (the vocabulary, merges) are not decoded: they come back as a SkippedArray with a length."""
        return self.reader.fields.get(key, default)

    def _arch(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{key}", default)

    def hf_config(self) -> dict[str, Any]:
        """The model config as a Hugging Face config.json dict (a copy)."""
        return dict(self._config)

    def _build_config(self) -> dict[str, Any]:
        try:
            hidden = int(self._arch("embedding_length"))
            heads = int(self._arch("attention.head_count"))
            n_layers = int(self._arch("block_count"))
            ffn = int(self._arch("feed_forward_length"))
        except TypeError as e:  # a required key is missing (int(None))
            raise CorruptCheckpointError(
                f"{self.path}: GGUF metadata lacks {self.arch}.embedding_length / attention.head_count / "
                f"block_count / feed_forward_length; re-convert the model with llama.cpp's "
                f"convert_hf_to_gguf.py") from e
        kv = self._arch("attention.head_count_kv", heads)
        kv = max(kv) if isinstance(kv, list) else int(kv)
        head_dim = int(self._arch("attention.key_length") or hidden // heads)
        rope_theta = _f32(self._arch("rope.freq_base", 10000.0))
        embd = self._by_name.get("model.embed_tokens.weight")
        n_tokens = len(self.reader.fields["tokenizer.ggml.tokens"]) \
            if "tokenizer.ggml.tokens" in self.reader.fields else None
        vocab = self._arch("vocab_size") or (int(embd.shape[-1]) if embd is not None else n_tokens)
        eos = self.get("tokenizer.ggml.eos_token_id")
        eot = self.get("tokenizer.ggml.eot_token_id")
        if eos is not None and eot is not None and eot != eos:
            eos = [eos, eot]
        return {
            "model_type": _MODEL_TYPE[self.arch],
            "architectures": [_ARCHITECTURES[_MODEL_TYPE[self.arch]]],
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": n_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "rms_norm_eps": _f32(self._arch("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": rope_theta,
            "rope_scaling": self._rope_scaling(rope_theta, head_dim),
            "max_position_embeddings": int(self._arch("context_length", 2048)),
            "vocab_size": int(vocab) if vocab is not None else None,
            "tie_word_embeddings": "lm_head.weight" not in self._by_name,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._by_name,
            "bos_token_id": self.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos,
            "pad_token_id": self.get("tokenizer.ggml.padding_token_id"),
        }

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        kind = self._arch("rope.scaling.type")
        factor = self._arch("rope.scaling.factor")
        orig = self._arch("rope.scaling.original_context_length")
        if kind in (None, "none"):
            freqs = next((t for t in self.reader.tensors if t.name == "rope_freqs.weight"), None)
            if freqs is None:
                return None
            return _llama3_scaling(np.asarray(freqs.data, np.float64).reshape(-1), theta, head_dim, orig, self.path)
        if kind == "linear":
            return None if not factor or factor == 1.0 else {"rope_type": "linear", "factor": _f32(factor)}
        out: dict[str, Any] = {"rope_type": kind, "factor": _f32(factor or 1.0)}
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        return out  # e.g. yarn: ModelConfig.from_hf says it is unsupported

    # ---- tensors --------------------------------------------------------------------------------
    def _kind(self, t: Any, shape: tuple[int, ...]) -> str:
        qt = t.tensor_type.name
        if qt in _NATIVE_KINDS and len(shape) == 2 and shape[1] % GROUP_SIZE == 0:
            return _NATIVE_KINDS[qt]
        return "dense"

    def _heads(self, name: str) -> int:
        """Head count whose llama.cpp row permutation this tensor carries (0: not permuted)."""
        if self.arch not in PERMUTED_ARCHS:
            return 0
        if ".self_attn.q_proj." in name:
            return self._config["num_attention_heads"]
        if ".self_attn.k_proj." in name:
            return self._config["num_key_value_heads"]
        return 0

    def tensor_info(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(hf_name, kind, HF shape) of every tensor, in file order, without reading data."""
        out = []
        for name, t in self._by_name.items():
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            out.append((name, self._kind(t, shape), shape))
        return out

    def file_type_name(self) -> str:
        """Our format closest to the file's dominant linear-weight type (by element count): what
        low_bit="auto" should pick. "dense" for float files."""
        counts: Counter[str] = Counter()
        for name, t in self._by_name.items():
            if name.endswith("_proj.weight") or name == "lm_head.weight":
                qt = t.tensor_type.name
                counts[_NATIVE_KINDS.get(qt) or _SUGGESTED.get(qt, "dense")] += int(t.n_elements)
        return counts.most_common(1)[0][0] if counts else "dense"

    def tensors(self) -> Iterator[tuple[str, str, Any]]:
        """Yield (hf_name, kind, payload) one tensor at a time, in file order (see module docstring)."""
        for name in self._by_name:
            kind, payload = self.tensor(name)
            yield name, kind, payload

    def tensor(self, name: str) -> tuple[str, Any]:
        """(kind, payload) of one tensor by HF name."""
        t = self._tensor(name)
        n = int(t.shape[-1]) if len(t.shape) == 1 else int(np.prod(t.shape[1:]))
        heads = self._heads(name)
        return self._read(name, t, unpermute_index(n, heads) if heads else slice(None))

    def rows(self, name: str, start: int, stop: int) -> tuple[str, Any]:
        """(kind, payload) of HF rows [start, stop) of one tensor, reading only those rows (for TP)."""
        t = self._tensor(name)
        n = int(t.shape[-1]) if len(t.shape) == 1 else int(np.prod(t.shape[1:]))
        heads = self._heads(name)
        return self._read(name, t, unpermute_index(n, heads)[start:stop] if heads else slice(start, stop))

    def _tensor(self, name: str) -> Any:
        if name not in self._by_name:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self._by_name[name]

    def _read(self, name: str, t: Any, index: np.ndarray | slice) -> tuple[str, Any]:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        kind = self._kind(t, shape)
        qt = t.tensor_type.name
        raw = t.data
        if len(shape) > 2:  # never in our archs; keep the leading dims together as rows
            raw = raw.reshape(-1, raw.shape[-1])
        data = np.array(raw[index])  # copy of just the rows asked for, out of the memmap
        if kind == "dense":
            if qt == "BF16":
                return kind, torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
            if qt in _FLOAT_TYPES:
                return kind, torch.from_numpy(data)
            from gguf.quants import dequantize

            return kind, torch.from_numpy(np.ascontiguousarray(dequantize(data, t.tensor_type)))
        k = shape[1]
        blocks = data.reshape(data.shape[0], k // GROUP_SIZE, _BLOCK_BYTES[qt])
        scales = torch.from_numpy(np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0])
        if qt == "Q8_0":
            q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(blocks.shape[0], k)
            return kind, {"qweight": torch.from_numpy(q), "scales": scales}
        payload = {"qweight": torch.from_numpy(_repack_nibbles(blocks[..., -16:])), "scales": scales}
        if qt == "Q4_1":
            payload["mins"] = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0])
        return kind, payload


def _repack_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF's [rows, blocks, 16] nibble bytes (byte j = element j low, j+16 high) into [rows, K/2]
    with element 2j in the low nibble of byte j and 2j+1 in the high one."""
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [rows, blocks, 32], elements in order
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4)).reshape(qs.shape[0], -1)


def llama3_rope_factors(theta: float, head_dim: int, sc: dict[str, Any]) -> np.ndarray:
    """Per-frequency Llama-3 RoPE factors as llama.cpp's converter writes them into rope_freqs.weight."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    smooth = (old / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))


def _llama3_scaling(ratios: np.ndarray, theta: float, head_dim: int, orig: int | None,
                    path: str) -> dict[str, Any] | None:
    """Recover llama3 rope_scaling from the rope_freqs factors: the smooth band gives
    s = (old/wavelen - low) / (high - low), linear in 1/wavelen, so two of its points fix low and high."""
    factor = float(ratios.max())
    if factor <= 1.0:
        return None
    old = int(orig or 8192)  # Llama 3.x; only the ratios old/low and old/high matter
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    band = (ratios > 1 + 1e-4) & (ratios < factor * (1 - 1e-4))
    low, high = 1.0, 4.0
    if band.sum() >= 2:
        s = (1 / ratios[band] - 1 / factor) / (1 - 1 / factor)
        slope, icept = np.polyfit(old / wavelen[band], s, 1)  # s = slope * old/wavelen + icept
        low, high = -icept / slope, (1 - icept) / slope
    sc = {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": round(float(low), 4),
          "high_freq_factor": round(float(high), 4), "original_max_position_embeddings": old}
    if len(ratios) != head_dim // 2 or not np.allclose(llama3_rope_factors(theta, head_dim, sc), ratios, rtol=1e-3):
        raise UnsupportedModelError(
            f"{path}: its rope_freqs.weight tensor is not Llama-3-style RoPE scaling; xpu-llm supports "
            f"default, linear and llama3 RoPE. Convert the model from its Hugging Face folder instead")
    return sc


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    from .gguf_header import GGUFHeader

    try:
        reader = GGUFHeader(path)
    except Exception as e:  # the reader signals bad files with ValueError, IndexError, KeyError ...
        raise CorruptCheckpointError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or not GGUF. "
            f"Re-download it or re-convert it with llama.cpp's convert_hf_to_gguf.py") from e
    end = reader.end
    if end > size:
        raise CorruptCheckpointError(
            f"{path} is truncated: its tensors end at byte {end} but the file has {size} bytes; "
            f"re-download it or re-convert it")
    return GGUFFile(path, reader)


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file (the last two opened stay cached while the file is unchanged)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        what = "is a folder, not a .gguf file" if os.path.isdir(path) else "does not exist"
        raise ModelNotFoundError(f"GGUF file {path} {what}; pass the path of a .gguf file")
    st = os.stat(path)
    log.debug("opening GGUF %s", path)
    return _open_cached(path, st.st_size, st.st_mtime_ns)
