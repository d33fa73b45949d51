"""`LLM`: the user-facing engine. Loads a model (HF folder, GGUF or low-bit folder; None = embedded SmolLM2),
quantizes it while streaming, and generates text, ids, logits or a stream of text."""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .device import get_device, is_cpu
from .errors import GenerationInputError, XpuLLMError
from .generate import GenerationStats, SamplingParams, generate_tokens
from .graphs import compile_decode
from .loading import check_format, load_model, resolve_source
from .lowbit.kernels.cpu_native import available as native_cpu

log = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]  # plain text, or chat messages rendered with the chat template
DEFAULT_MAX_SEQ_LEN = 2048
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = "length"  # "stop" when a stop token or stop string ended it


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on GPUs, float32 on the CPU (CPUs without native bf16, e.g. AVX2, run bf16 elementwise
    work many times slower; the packed low-bit matmuls still get bf16 activations, see LLM.__init__)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if is_cpu(device) else torch.bfloat16
    if dtype not in _DTYPES:
        raise XpuLLMError(f"dtype {dtype!r} is not supported; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _load_tokenizer(path: str):
    from .tokenizer import load_tokenizer
    return load_tokenizer(path)


def _background(fn, *args) -> Future:
    """Run fn(*args) in a daemon thread; the Future re-raises its error where the result is asked for."""
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the result
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True, name="xpu-llm-tokenizer").start()
    return fut


class LLM:
    """Load once, generate many times. See README for the full API."""

    def __init__(self, model: str | os.PathLike | None = None, low_bit: str | None = "auto", group_size: int = 64,
                 device: str | torch.device | None = None, max_seq_len: int | None = None,
                 dtype: str | torch.dtype | None = "auto", progress: bool | None = None,
                 speculative: Any = None, tp: int | str = 1, pp: int | str = 1,
                 kv_cache_dtype: str | None = None, compile: bool = False) -> None:
        """`kv_cache_dtype`: None (the compute dtype), "int8" or "fp8" / "fp8_e5m2" for a compressed cache.
        `compile`: run the graph-captured decode step through torch.compile on accelerators (graphs.py; costs a
        compilation per batch size; no effect on CPUs)."""
        from .kv_cache import apply_kv_cache_dtype, check_kv_cache_dtype
        source = resolve_source(model)
        if low_bit not in ("auto", None):
            check_format(low_bit, group_size)
        check_kv_cache_dtype(kv_cache_dtype)
        # The tokenizer (mostly the `transformers` import) loads in the background while weights stream in.
        self._tokenizer_future = _background(_load_tokenizer, source.path)
        self.device = get_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        progress = progress if progress is not None else log.getEffectiveLevel() <= logging.INFO
        # tp / pp > 1 (or "auto"): this rank's shard of a multi-card run, every rank running this same program.
        self.parallel = None
        if tp != 1 or pp != 1:
            from .parallel.engine import load_parallel
            self.parallel = load_parallel(source, low_bit, group_size, self.dtype, device, tp, pp, max_seq_len,
                                          progress)
        if self.parallel is not None:
            self.model, info, self.device = self.parallel.model, self.parallel.info, self.parallel.device
        else:
            self.model, info = load_model(source, low_bit, group_size, self.dtype, self.device, progress=progress)
        self.model.eval()
        self.kv_cache_dtype = apply_kv_cache_dtype(self.model, kv_cache_dtype)
        if compile:
            if self.parallel is not None or is_cpu(self.device):
                log.warning("compile=True has no effect here (it compiles the single-card decode step of an "
                            "accelerator); running eagerly")
            else:
                compile_decode(self.model)
        self.dtype = info["dtype"]  # a dense bf16/fp16 format sets the compute dtype
        if is_cpu(self.device) and self.dtype == torch.float32:
            self._speed_up_cpu(exact=dtype not in (None, "auto"))
        self.config = info["config"]
        self.low_bit: str | None = info.get("low_bit")
        self.group_size = info.get("group_size")
        self.source = source
        limit = self.config.max_position_embeddings
        self.max_seq_len = max_seq_len or min(limit, DEFAULT_MAX_SEQ_LEN)
        if self.max_seq_len > limit:
            log.warning("max_seq_len %d is beyond the model's trained context %d", self.max_seq_len, limit)
        self._tokenizer = None
        # Self-speculative decoding for every call (a kind, a dict of options or a SpeculativeConfig; see
        # speculative.py); drafts are built on first use and kept, keyed by their options.
        self.speculative = self._speculative_config(speculative, None)
        self._drafts: dict[tuple, Any] = {}
        # Let the tokenizer thread finish before returning (its error, if any, is raised where the tokenizer is first
        # used): transformers' lazy module is not safe to import from two threads at once, so a caller touching
        # transformers right after LLM() could otherwise find attributes such as transformers.LlamaConfig missing.
        self._tokenizer_future.exception()

    # ------------------------------------------------------------------------------------------ basics
    def _speed_up_cpu(self, exact: bool) -> None:
        """CPU, float32 model: fused native decode ops, and unless `exact` (an explicit dtype=float32, the
        reference numerics the tests use) low-bit matmuls on int8 activations (llama.cpp's Q8 approach), or
        where the native library cannot be built, PyTorch's packed int4/int8 kernels on bf16 activations."""
        from .cpu_decode import apply_cpu_decode
        from .lowbit.linear import LowBitLinear
        apply_cpu_decode(self.model)  # no-op without the native library
        if exact:
            return
        kernel_dtype = torch.int8 if native_cpu() else torch.bfloat16
        for m in self.model.modules():
            if isinstance(m, LowBitLinear):
                m.kernel_dtype = kernel_dtype

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer of the model (loaded on first use; GGUF vocabularies are converted once
        and cached)."""
        if self._tokenizer is None:
            self._tokenizer = self._tokenizer_future.result()
        return self._tokenizer

    def _ensure_cache(self, batch: int) -> None:
        if self.parallel is not None:  # the pipeline keeps a cache per micro-batch
            return
        if self.model.max_batch_size < batch or self.model.max_seq_len != self.max_seq_len:
            self.model.setup_caches(max(batch, self.model.max_batch_size, 1), self.max_seq_len,
                                    dtype=self.dtype, device=self.device)

    def _pad_id(self) -> int:
        tok = self._tokenizer
        for cand in (getattr(tok, "pad_token_id", None), self.config.pad_token_id,
                     getattr(tok, "eos_token_id", None)):
            if cand is not None:
                return int(cand)
        return 0

    def _stop_ids(self, extra: list[int] | None) -> tuple[int, ...]:
        ids = set(self.config.eos_token_id)
        tok = self._tokenizer
        if tok is not None and tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        return tuple(sorted(ids | set(extra or [])))

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt; chat messages (or chat=True on a string) go through the chat template."""
        tok = self.tokenizer
        if isinstance(prompt, list) or chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if not getattr(tok, "chat_template", None):
                raise GenerationInputError("this model's tokenizer has no chat template; pass plain text prompts")
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        if not isinstance(prompt, str):
            raise GenerationInputError(f"a prompt must be a string or a list of chat messages, got {type(prompt)}")
        return tok(prompt)["input_ids"]

    # ------------------------------------------------------------------------------------------ generation
    @staticmethod
    def _speculative_config(spec: Any, default: Any):
        if spec is None and default is None:
            return None
        from .speculative import speculative_config
        return speculative_config(spec, default)

    def _draft(self, cfg):
        """The draft for a speculative config, built once (the lowbit copy quantizes the weights here)."""
        key = cfg.draft_key()
        if key not in self._drafts:
            from .speculative import make_draft
            cpu = is_cpu(self.device) and self.dtype == torch.float32
            # On CPUs the draft's own layers take the fast path: int8-activation kernels and the fused one-token
            # step (its numerics only change which drafts are accepted, never the output).
            kd = (torch.int8 if native_cpu() else torch.bfloat16) if cpu else None
            draft = make_draft(cfg, self.model, kernel_dtype=kd)
            own = getattr(draft, "model", None)
            if cpu and own is not None and own is not self.model:
                from .cpu_decode import apply_cpu_decode
                apply_cpu_decode(own)
            self._drafts[key] = draft
        return self._drafts[key]

    def _run(self, prompts: list[list[int]], params: SamplingParams, stop: list[str] | None = None,
             on_text=None, speculative: Any = None) -> tuple[list[list[int]], GenerationStats]:
        params.check()
        for p in prompts:
            if len(p) + params.max_new_tokens > self.max_seq_len:
                raise GenerationInputError(
                    f"prompt of {len(p)} tokens + max_new_tokens {params.max_new_tokens} exceeds max_seq_len "
                    f"{self.max_seq_len}; shorten the prompt, lower max_new_tokens or pass a larger max_seq_len")
        self._ensure_cache(len(prompts))
        on_step = None
        if stop or on_text is not None:
            tok = self.tokenizer

            def on_step(row: int, ids: list[int]) -> bool:
                text = tok.decode(ids, skip_special_tokens=True)
                if on_text is not None:
                    on_text(row, text)
                return bool(stop) and any(s in text for s in stop)

        spec = self._speculative_config(speculative, self.speculative)
        if self.parallel is not None and spec is None:
            return self.parallel.generate(prompts, params, self._pad_id(), on_step, self.max_seq_len)
        if spec is not None:
            from .speculative import generate_speculative
            if self.parallel is None:
                return generate_speculative(self.model, self._draft(spec), prompts, params, self._pad_id(),
                                            on_step, spec)
            return self._speculative_tp(spec, prompts, params, on_step, generate_speculative)
        return generate_tokens(self.model, prompts, params, self._pad_id(), on_step)

    def _speculative_tp(self, spec, prompts, params, on_step, generate_speculative):
        """Speculative decoding on a tensor-parallel shard: the sharded model (its collectives inside) runs the
        one-process draft / verify loop on every rank, which all take the same decisions from the same logits."""
        if self.parallel.grid.pp > 1:
            raise XpuLLMError("speculative decoding runs with tensor parallelism (pp=1) only; pass pp=1 or "
                              "speculative=False")
        if spec.kind == "lowbit":
            raise XpuLLMError("the lowbit draft is not available with tp > 1 (it would hold a second sharded copy); "
                              "use speculative='layer_skip' or 'lookup'")
        self.model.setup_caches(max(len(prompts), self.model.max_batch_size, 1), self.max_seq_len,
                                dtype=self.dtype, device=self.device)
        with self.parallel.world.guard("speculative generation"):
            return generate_speculative(self.model, self._draft(spec), prompts, params, self._pad_id(), on_step,
                                        spec)

    def _decode(self, ids: list[list[int]], stop: list[str] | None) -> list[str]:
        return [self._trim(self.tokenizer.decode(i, skip_special_tokens=True), stop) for i in ids]

    @staticmethod
    def _trim(text: str, stop: list[str] | None) -> str:
        for s in stop or []:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        return text

    def _params(self, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                seed: int | None, stop_token_ids: list[int] | None, ignore_eos: bool = False) -> SamplingParams:
        stops = tuple(stop_token_ids or ()) if ignore_eos else self._stop_ids(stop_token_ids)
        return SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, stops)

    def generate(self, prompts: Prompt | list[Prompt], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: list[str] | str | None = None, stop_token_ids: list[int] | None = None,
                 chat: bool = False, ignore_eos: bool = False, speculative: Any = None) -> list[GenerationResult]:
        """Generate for one prompt or a batch; one result per prompt (.text, .token_ids, .stats).
        `speculative` overrides the LLM's setting for this call (a draft kind, options, or False for plain)."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise GenerationInputError("no prompts given")
        stop = [stop] if isinstance(stop, str) else stop
        prompt_ids = [self.encode(p, chat) for p in batch]
        params = self._params(max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, ignore_eos)
        ids, stats = self._run(prompt_ids, params, stop, speculative=speculative)
        texts = self._decode(ids, stop)
        results = []
        for i, t in zip(ids, texts):
            hit = bool(i) and (i[-1] in params.stop_token_ids or any(s in t for s in stop or []) or
                               len(i) < max_new_tokens)
            results.append(GenerationResult(t, i, stats.as_dict(), "stop" if hit else "length"))
        return results

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: list[str] | str | None = None,
               chat: bool = False, speculative: Any = None) -> Iterator[str]:
        """Yield text pieces as they decode (a piece is held back while it ends in an incomplete character)."""
        import queue
        import threading

        stop = [stop] if isinstance(stop, str) else stop
        prompt_ids = [self.encode(prompt, chat)]
        params = self._params(max_new_tokens, temperature, top_k, top_p, seed, None)
        q: queue.Queue = queue.Queue()
        sent = [0]

        def on_text(_row: int, text: str) -> None:
            text = self._trim(text, stop)
            if text.endswith("\ufffd"):
                return
            if len(text) > sent[0]:
                q.put(text[sent[0]:])
                sent[0] = len(text)

        def work() -> None:
            try:
                ids, _ = self._run(prompt_ids, params, stop, on_text, speculative=speculative)
                texts = self._decode(ids, stop)
                if len(texts[0]) > sent[0]:
                    q.put(texts[0][sent[0]:])
            except BaseException as e:  # surface errors in the consumer's thread
                q.put(e)
            q.put(None)

        th = threading.Thread(target=work, daemon=True)
        th.start()
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
        th.join()

    def generate_ids(self, input_ids: Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     attention_mask: Tensor | None = None, ignore_eos: bool = False,
                     speculative: Any = None) -> Tensor:
        """Tensor in, tensor out: [B, T] prompt ids (left-padded with `attention_mask` if ragged) → [B, T + n]
        with the new ids appended (rows that stopped early are filled with the pad id)."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        rows = [r[m.bool()].tolist() if attention_mask is not None else r.tolist()
                for r, m in zip(input_ids.cpu(), attention_mask.cpu() if attention_mask is not None else input_ids.cpu())]
        params = self._params(max_new_tokens, temperature, top_k, top_p, seed, None, ignore_eos)
        ids, _ = self._run(rows, params, speculative=speculative)
        n = max(len(i) for i in ids)
        pad = self._pad_id()
        new = torch.tensor([i + [pad] * (n - len(i)) for i in ids], dtype=input_ids.dtype)
        return torch.cat([input_ids.cpu(), new], dim=1)

    @torch.inference_mode()
    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """One full forward, [B, T, V] float32 (left-padded rows via `attention_mask`; pad positions are junk)."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        b, t = input_ids.shape
        if t > self.max_seq_len:
            raise GenerationInputError(f"input of {t} tokens exceeds max_seq_len {self.max_seq_len}")
        if self.parallel is not None:
            return self.parallel.logits(input_ids, attention_mask, self.max_seq_len)
        self._ensure_cache(b)
        pad = None
        if attention_mask is not None:
            pad = (t - attention_mask.sum(-1)).to(self.device)
            pad = pad if bool(pad.any()) else None
        x = input_ids.to(self.device)
        return self.model(x, torch.arange(t, device=self.device), pad=pad, kv_len=t).float()

    # ------------------------------------------------------------------------------------------ export
    def save_low_bit(self, out_dir: str) -> str:
        """Write the engine's low-bit folder (atomic); `LLM(out_dir)` loads it without re-quantizing."""
        from .errors import ModelNotFoundError
        from .lowbit_folder import save_low_bit
        if self.parallel is not None:
            raise XpuLLMError("save_low_bit needs the whole model: convert it in a single process (xpu-llm convert)")
        try:
            tok = self.tokenizer
        except ModelNotFoundError:
            log.warning("%s has no tokenizer; saving the weights only", self.source.path)
            tok = None
        return save_low_bit(self.model, tok, out_dir,
                            {"low_bit": self.low_bit, "group_size": self.group_size})

    def __repr__(self) -> str:
        return (f"LLM({os.path.basename(self.source.path)}, low_bit={self.low_bit}, dtype={self.dtype}, "
                f"device={self.device}, max_seq_len={self.max_seq_len}"
                + (f", kv_cache_dtype={self.kv_cache_dtype})" if self.kv_cache_dtype else ")"))
