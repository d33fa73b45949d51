# python benchmarks/convert_memory.py --out benchmarks/results/convert_memory_cpu.json
"""Peak resident memory of `xpu-llm convert` from a float32 Hugging Face folder (SmolLM2-135M, written once
from the embedded GGUF with transformers), to each format, against the process baseline (imports only) and
the float32 checkpoint size: loading streams one tensor at a time, so the increment tracks the low-bit size."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import os, sys, json, time
def hwm():  # peak RSS of this address space in KiB (ru_maxrss would carry the parent's peak across exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
sys.argv = ["xpu-llm", "convert", sys.argv[1], "--low-bit", sys.argv[2], "-o", sys.argv[3]]
import torch, transformers, xpu_llm.llm, xpu_llm.tokenizer   # baseline: everything imported
base = hwm()
t0 = time.perf_counter()
from xpu_llm.cli import main
rc = main(sys.argv[1:])
peak = hwm()
print(json.dumps({"rc": rc, "baseline_mib": base / 1024, "peak_mib": peak / 1024, "seconds": time.perf_counter() - t0}))
"""


def hf_folder(cache: str) -> str:
    """A float32 HF checkpoint of the embedded model (transformers dequantizes the GGUF), made once."""
    path = os.path.join(cache, "smollm2-hf-fp32")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xpu_llm.default_model import default_model_path
    folder, name = os.path.split(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tmp = tempfile.mkdtemp(dir=cache)
    # transformers will not save_pretrained a GGUF-loaded model: write the float tensors and config directly.
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--formats", default="sym_int4,asym_int4,nf4,sym_int8,fp8_e4m3,none")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "xpu-llm-bench"))
    ap.add_argument("--out", default="benchmarks/results/convert_memory_cpu.json")
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    src = hf_folder(args.cache)
    ckpt = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
    rows = []
    for fmt in args.formats.split(","):
        out = tempfile.mkdtemp(dir=args.cache)
        r = subprocess.run([sys.executable, "-c", CHILD, src, fmt, os.path.join(out, "m")], capture_output=True,
                           text=True, env={**os.environ, "XPU_LLM_CACHE": args.cache})
        res = json.loads(r.stdout.strip().splitlines()[-1])
        size = sum(os.path.getsize(os.path.join(out, "m", f)) for f in os.listdir(os.path.join(out, "m")))
        row = {"format": fmt if fmt != "none" else "dense fp32", "output_mib": round(size / 2**20, 1),
               "baseline_mib": round(res["baseline_mib"]), "peak_mib": round(res["peak_mib"]),
               "increment_mib": round(res["peak_mib"] - res["baseline_mib"]), "seconds": round(res["seconds"], 1)}
        rows.append(row)
        print(row, flush=True)
    report = {"source": "SmolLM2-135M-Instruct, float32 safetensors", "checkpoint_mib": round(ckpt / 2**20, 1),
              "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    lines = [f"float32 checkpoint: {report['checkpoint_mib']} MiB", "",
             "| format | output MiB | baseline RSS MiB | peak RSS MiB | peak − baseline MiB | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['format']} | {r['output_mib']} | {r['baseline_mib']} | {r['peak_mib']} | {r['increment_mib']} | "
              f"{r['seconds']} |" for r in rows]
    with open(args.out[:-5] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
