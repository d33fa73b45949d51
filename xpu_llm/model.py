"""Compact Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, GQA attention over
a static KV cache, SwiGLU MLP. Plain nn.Module; quantization and parallelism are applied from outside."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 and cast back before the gain, as the reference implementation does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache(nn.Module):
    """Keys and values for `max_seq_len` slots, allocated once: [batch, kv_heads, max_seq_len, head_dim]."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.k_cache.dtype

    @property
    def batch_size(self) -> int:
        return self.k_cache.shape[0]

    def store(self, input_pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Write k, v [B, H, T, D] at slots `input_pos` ([T], or [B, T]: each row its own slots)."""
        b = k.shape[0]
        if input_pos.dim() == 2:  # per-row slots (speculative decoding: rows accept different numbers of tokens)
            idx = input_pos.view(b, 1, -1, 1).expand_as(k)
            self.k_cache[:b].scatter_(2, idx, k)
            self.v_cache[:b].scatter_(2, idx, v)
        else:
            self.k_cache[:b, :, input_pos] = k
            self.v_cache[:b, :, input_pos] = v

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int | None) -> tuple[Tensor, Tensor]:
        """Store k, v (as `store`) and return the cache up to `kv_len` slots."""
        self.store(input_pos, k, v)
        b = k.shape[0]
        end = self.k_cache.shape[2] if kv_len is None else kv_len
        return self.k_cache[:b, :, :end], self.v_cache[:b, :, :end]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, kv_len: int | None,
               mask: Tensor) -> Tensor:
        """Store k, v (as `update`) and return q [B, H, T, D] attended over the cache's first kv_len slots."""
        k, v = self.update(input_pos, k, v, kv_len)
        return sdpa(q, k, v, mask)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window[layer_idx]
        qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, qkv_out, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor,
                kv_len: int | None) -> Tensor:
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = q.view(b, t, self.n_heads, hd).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        assert self.kv_cache is not None, "call model.setup_caches(batch, max_seq_len) before forward"
        y = self.kv_cache.attend(q, k, v, input_pos, kv_len, mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * hd))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with gate (w1) and up (w3) fused into one matmul."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden = cfg.intermediate_size
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split([self.hidden, self.hidden], dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = Attention(cfg, layer_idx)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor,
                kv_len: int | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_len = -1
        self.cache_factory = KVCache  # how setup_caches builds each layer's cache (kv_cache.py swaps it)
        # Linear path ("layers.0.attention.wqkv", "output") -> (format, group) of the quantized blocks its weight was
        # read from (GGUF Q4_0 / Q4_1 / Q8_0; loading.py), whatever format it is held in now. The lowbit draft's
        # "auto" re-quantizes a layer into its own 4-bit grid, where a dequantized weight is reproduced exactly.
        self.source_grid: dict[str, tuple[str, int]] = {}

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Allocate the static KV cache and the RoPE table once for `max_seq_len` positions."""
        if self.max_batch_size >= max_batch_size and self.max_seq_len == max_seq_len:
            return
        norm_w = self.norm.weight
        dtype = dtype or norm_w.dtype
        device = device or norm_w.device
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = self.cache_factory(max_batch_size, attn.n_kv_heads, max_seq_len, attn.head_dim, dtype,
                                               device)
        inv = rope_inv_freq(self.config).to(device)
        freqs = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("rope_cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("rope_sin", emb.sin().to(dtype), persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor, pad: Tensor | None = None,
                kv_len: int | None = None, last_only: bool = False,
                layers: Sequence[int] | None = None) -> Tensor:
        """Logits for `tokens` [B, T] written at cache slots `input_pos` [T] (or [B, T], each row its own).

        `pad` [B] counts each row's left-padding slots (their keys are masked and RoPE positions start
        after them); `kv_len` bounds the cache slots attended to (None: all); `last_only` computes
        logits for the last position only (decode and prefill-for-generation); `layers` runs only those
        layer indices (a layer-skipping draft of self-speculative decoding; None: all)."""
        b, t = tokens.shape
        assert self.max_seq_len > 0, "call setup_caches(batch, max_seq_len) before forward"
        assert b <= self.max_batch_size, f"batch {b} exceeds the cache's batch {self.max_batch_size}"
        kv = self.max_seq_len if kv_len is None else kv_len
        pos = input_pos.view(-1, t) if pad is None else (input_pos.view(-1, t) - pad.view(b, 1)).clamp_min(0)
        cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)  # [B|1, 1, T, D]
        masks: dict[int | None, Tensor] = {}
        x = self.tok_embeddings(tokens)
        for layer in self.layers if layers is None else [self.layers[i] for i in layers]:
            w = layer.attention.window
            if w not in masks:
                masks[w] = attention_mask(input_pos, kv, pad, w)
            x = layer(x, cos, sin, masks[w], input_pos, kv_len)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """PyTorch's attention of q [B, H, T, D] over k, v [B, KV heads, S, D] (grouped-query when fewer)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the Hugging Face layout of q/k rows)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_mask(input_pos: Tensor, kv_len: int, pad: Tensor | None = None,
                   window: int | None = None) -> Tensor:
    """Boolean mask [B|1, 1, T, kv_len]: causal over cache slots (`input_pos` [T] or [B, T]), left padding
    hidden, optional sliding window.

    A padding query row may always see its own slot, so that no row is fully masked (no NaN)."""
    q = input_pos.view(-1, 1, input_pos.shape[-1], 1)
    k = torch.arange(kv_len, device=input_pos.device).view(1, 1, 1, -1)
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    if pad is not None:
        mask = mask & ((k >= pad.view(-1, 1, 1, 1)) | (k == q))
    return mask
