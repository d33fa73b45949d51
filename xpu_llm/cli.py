"""`xpu-llm` command line: generate, chat, convert, ppl, bench. Every command runs on the embedded SmolLM2
when no model is given. Errors print one line (what is wrong, what to do) and exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .errors import XpuLLMError


def _model_args(p: argparse.ArgumentParser, positional: bool) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None,
                       help="HF folder, .gguf file or xpu-llm folder (default: the embedded SmolLM2)")
    else:
        p.add_argument("--model", "-m", default=None, help="HF folder, .gguf file or xpu-llm folder "
                                                           "(default: the embedded SmolLM2)")
    p.add_argument("--low-bit", default="auto",
                   help="format: auto (GGUF: the file's own; HF: sym_int4), none (dense), or a registry name")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size: 32, 64 or 128")
    p.add_argument("--device", default=None, help="xpu, cuda, cpu (default: the first available)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto, float32, bfloat16, float16")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default: min(context, 2048))")


def _kv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", default=None, choices=("auto", "int8", "fp8", "fp8_e4m3", "fp8_e5m2"),
                   help="compressed KV cache: int8 (a scale per token and head) or fp8 (default: compute dtype)")
    p.add_argument("--compile", action="store_true",
                   help="GPUs: torch.compile the graph-captured decode step (fused elementwise ops; compiles once "
                        "per batch size)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--speculative", default=None, choices=["lookup", "layer_skip", "lowbit"],
                   help="self-speculative decoding with this draft (same output, fewer target passes)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="xpu-llm", description="Low-bit LLM inference on Intel XPU, NVIDIA and CPU")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt, streaming the text")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template (default: apply if any)")
    _model_args(g, positional=False)
    _kv_args(g)
    _sampling_args(g)
    _parallel_args(g)

    c = sub.add_parser("chat", help="interactive chat with history (/reset clears it, /exit or Ctrl-D ends)")
    c.add_argument("--system", default=None, help="system prompt")
    _model_args(c, positional=False)
    _kv_args(c)
    _sampling_args(c)

    cv = sub.add_parser("convert", help="quantize a model and write an xpu-llm low-bit folder (atomically)")
    _model_args(cv, positional=True)
    cv.add_argument("-o", "--output", required=True, help="output folder")

    pp = sub.add_parser("ppl", help="perplexity over sliding windows of a text file")
    _model_args(pp, positional=True)
    _kv_args(pp)
    pp.add_argument("--text", required=True, help="UTF-8 text file (e.g. wikitext-2-raw test)")
    pp.add_argument("--window", type=int, default=512)
    pp.add_argument("--stride", type=int, default=None, help="default: window (disjoint windows)")
    pp.add_argument("--max-windows", type=int, default=40)
    pp.add_argument("--json", action="store_true", help="print one JSON line")
    pp.set_defaults(dtype="float32")

    pl = sub.add_parser("plan", help="choose tensor x pipeline parallel sizes and show per-card memory")
    pl.add_argument("model", nargs="?", default=None,
                    help="model folder / .gguf file, or a preset shape: " + ", ".join(_plan_presets()))
    pl.add_argument("--cards", type=int, required=True, help="cards available")
    pl.add_argument("--card-memory", default="16GB", help="memory of one card, e.g. 16GB (Arc A770)")
    pl.add_argument("--cards-per-host", type=int, default=None, help="tensor parallel stays within a host "
                                                                     "(default: all cards in one host)")
    pl.add_argument("--low-bit", default="auto", help="format (auto, sym_int4, fp8, bf16, ...)")
    pl.add_argument("--group-size", type=int, default=64)
    pl.add_argument("--max-seq-len", type=int, default=4096, help="KV cache length per sequence")
    pl.add_argument("--batch", type=int, default=1, help="sequences decoded at once (KV cache)")
    pl.add_argument("--headroom", type=float, default=0.10, help="fraction of each card kept free")
    pl.add_argument("--json", action="store_true")

    from .finetune.args import add_train_args
    add_train_args(sub.add_parser("finetune", help="QLoRA fine-tuning in one process (several: accelerate launch "
                                                   "-m xpu_llm.finetune.train)"))
    ex = sub.add_parser("export", help="merge a LoRA adapter into its base and write an xpu-llm low-bit folder")
    ex.add_argument("--adapter", required=True, help="PEFT adapter folder (e.g. OUTPUT/adapter of finetune)")
    ex.add_argument("--base", default=None, help="base model the adapter was trained on (default: as recorded)")
    ex.add_argument("--low-bit", default="auto",
                    help="served format: auto (the training format), none (dense), or a registry name")
    ex.add_argument("--group-size", type=int, default=None, help="default: the training group size")
    ex.add_argument("--merge-into", default="auto", choices=("auto", "float", "quantized"),
                    help="add the adapter to the original float weights or to the dequantized training base "
                         "(auto: float for 4-bit targets, whose rounding would erase a delta added on their own "
                         "grid; the training base otherwise)")
    ex.add_argument("-o", "--output", required=True, help="output folder")

    b = sub.add_parser("bench", help="decode tokens/s and memory per format")
    b.add_argument("model", nargs="?", default=None)
    b.add_argument("--formats", default="auto,sym_int4,asym_int4,sym_int8,none",
                   help="comma-separated formats (auto = the source's own, none = dense)")
    b.add_argument("--group-size", type=int, default=64)
    b.add_argument("--device", default=None)
    b.add_argument("--dtype", default="auto")
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--json", action="store_true")
    return ap


def _parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=_par_size, default=1, help="tensor-parallel ranks (or auto); launch with torchrun")
    p.add_argument("--pp", type=_par_size, default=1, help="pipeline-parallel stages (or auto)")


def _par_size(v: str) -> int | str:
    return "auto" if v == "auto" else int(v)


def _plan_presets() -> list[str]:
    from .parallel.plan import PRESETS
    return list(PRESETS)


def _low_bit(v: str | None) -> str | None:
    return None if v is None or v.lower() in ("none", "dense") else v


def _load(args, progress: bool = True):
    from .llm import LLM
    return LLM(args.model, low_bit=_low_bit(args.low_bit), group_size=args.group_size, device=args.device,
               max_seq_len=args.max_seq_len, dtype=args.dtype, progress=progress,
               kv_cache_dtype=getattr(args, "kv_cache_dtype", None), compile=getattr(args, "compile", False),
               **({"tp": args.tp, "pp": args.pp} if hasattr(args, "tp") else {}))


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop, speculative=args.speculative)


def cmd_generate(args) -> int:
    llm = _load(args)
    chat = not args.raw and bool(getattr(llm.tokenizer, "chat_template", None))
    quiet = llm.parallel is not None and llm.parallel.rank != 0  # every rank runs; rank 0 prints
    for piece in llm.stream(args.prompt, chat=chat, **_sampling(args)):
        if not quiet:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if not quiet:
        sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    llm = _load(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"xpu-llm chat with {llm} — /reset clears the history, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for piece in llm.stream(history, **_sampling(args)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_convert(args) -> int:
    """Stream and quantize the model, then write the folder; the tokenizer's files are copied, not built (a
    tokenizer object costs more resident memory than a small 4-bit model)."""
    from .device import get_device, peak_rss
    from .errors import ModelNotFoundError
    from .llm import resolve_dtype
    from .loading import check_format, load_model, resolve_source
    from .lowbit_folder import save_low_bit
    from .tokenizer import tokenizer_files
    t0 = time.perf_counter()
    source, low_bit = resolve_source(args.model), _low_bit(args.low_bit)
    if low_bit not in ("auto", None):
        check_format(low_bit, args.group_size)
    device = get_device(args.device)
    model, info = load_model(source, low_bit, args.group_size, resolve_dtype(args.dtype, device), device)
    try:
        tok = tokenizer_files(source.path)
    except ModelNotFoundError:
        logging.getLogger(__name__).warning("%s has no tokenizer; saving the weights only", source.path)
        tok = None
    out = save_low_bit(model, tok, args.output, {"low_bit": info["low_bit"], "group_size": info["group_size"]})
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out} ({info['low_bit'] or 'dense'}, {size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s; "
          f"peak resident memory {peak_rss() / 2**20:.0f} MiB")
    return 0


def cmd_ppl(args) -> int:
    from .perplexity import perplexity
    if not os.path.isfile(args.text):
        raise XpuLLMError(f"text file {args.text!r} does not exist")
    with open(args.text, encoding="utf-8", newline="") as f:
        text = f.read()
    llm = _load(args)
    res = perplexity(llm, text, window=args.window, stride=args.stride, max_windows=args.max_windows)
    res.update(low_bit=llm.low_bit or "dense", group_size=llm.group_size, dtype=str(llm.dtype).split(".")[-1])
    if args.json:
        print(json.dumps(res))
    else:
        print(f"perplexity {res['perplexity']:.4f} ({res['low_bit']}, group {res['group_size']}, "
              f"{res['windows']} windows of {res['window']} tokens, {res['seconds']} s)")
    return 0


def cmd_plan(args) -> int:
    from .parallel.plan import plan_report
    low_bit = None if args.low_bit.lower() in ("none", "dense") else args.low_bit
    rep = plan_report(args.model, args.cards, args.card_memory, low_bit, args.group_size, args.max_seq_len,
                      args.batch, args.cards_per_host, args.headroom)
    if args.json:
        print(json.dumps(rep))
    else:
        print(f"{rep['model']} in {rep['low_bit']} (group {rep['group_size']}): {rep['weights_gib']} GiB of weights; "
              f"{rep['cards']} card(s) of {rep['card_memory_gib']} GiB, batch {rep['batch']} x "
              f"{rep['max_seq_len']} tokens")
        print(rep["text"])
    return 0 if rep["fits"] else 1


def cmd_bench(args) -> int:
    from .bench import run_bench
    rows = run_bench(args.model, [f.strip() for f in args.formats.split(",") if f.strip()], args.group_size,
                     args.device, args.dtype, args.prompt_len, args.new_tokens, args.batch)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        from .bench import format_table
        print(format_table(rows))
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "convert": cmd_convert, "ppl": cmd_ppl,
            "bench": cmd_bench, "plan": cmd_plan}


def cmd_finetune(args) -> int:
    from .finetune.train import run
    return run(args)


def cmd_export(args) -> int:
    from .finetune.export import export
    t0 = time.perf_counter()
    out = export(args.adapter, args.output, base=args.base, low_bit=args.low_bit, group_size=args.group_size,
                 merge_into=args.merge_into)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s; serve it with xpu_llm.LLM({out!r})")
    return 0


COMMANDS.update(finetune=cmd_finetune, export=cmd_export)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    if args.verbose == 0:
        import warnings
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return COMMANDS[args.command](args)
    except XpuLLMError as e:
        print(f"xpu-llm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
