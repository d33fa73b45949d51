# python benchmarks/gemv_sass.py --out benchmarks/results/gemv_sass_sm90.json   (no GPU needed)
"""Instructions per weight in the loop of the decode GEMV (lowbit/kernels/triton_gemv.py), from its SASS compiled
offline for an NVIDIA target (default sm_90, Hopper) with the run-time specialisation a real launch gets (every
pointer and integer argument divisible by 16, as on the 8B shapes). The kernel is bound by instructions per
weight, not by bytes, so this count is what its changes are judged by before they are timed on a GPU; with the
same Triton it equals the count of the SASS the GPU builds (checked on an H200: 434 instructions, 6.78 a weight).

Needs Triton's NVIDIA backend with ptxas and cuobjdump (the Triton wheels for Linux ship them; otherwise set
TRITON_PTXAS_PATH). Writes a JSON and a markdown table next to it (.md), also printed."""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import _git, write_atomic  # noqa: E402

FORMATS = ("sym_int4", "asym_int4", "nf4", "nf4 (pairs)", "fp4", "sym_int8", "fp8_e4m3", "fp8_e5m2")
CONFIGS = ((16, 8, 4), (16, 16, 4), (16, 4, 2), (8, 16, 4))  # (rows, groups per step, warps): the tuner's usual picks


def compile_sass(fmt: str, group: int, rows: int, groups: int, warps: int, arch: int, pairs: bool = False) -> str:
    """SASS text of the GEMV for bf16 activations and `fmt`, as a launch on `arch` specialises it (pairs: nf4 through
    the 256-entry pair table)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from xpu_llm.lowbit.kernels import triton_gemv as tg
    from xpu_llm.lowbit.kernels.triton_common import FORMAT_IDS, SCALE_MUL

    kernel = tg._gemv_kernel
    scale = "*fp32" if fmt.startswith("fp8") else "*fp16"
    pointers = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": scale, "z_ptr": scale,
                "lut_ptr": "*i64" if pairs else "*fp32", "out_ptr": "*bf16"}
    const = {"FMT": FORMAT_IDS[fmt], "G": group, "SCALE_MUL": SCALE_MUL.get(fmt, 1.0), "SOFT_BF16": False,
             "BLOCK_N": rows, "NG": groups, "INPLACE": tg.INPLACE, "X_PAIRS": True, "EVEN_N": True, "EVEN_G": True,
             "NF4_PAIRS": pairs}
    names = kernel.arg_names
    sig = {n: "constexpr" if n in const else pointers.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in const}
    src = ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout


def loop_body(sass: str) -> list[str]:
    """The instructions of the longest backward branch's body (the K loop)."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass)]
    index = {a: i for i, (a, _) in enumerate(ins)}
    best: list[str] = []
    for i, (a, text) in enumerate(ins):
        t = re.search(r"BRA\s+(0x[0-9a-f]+)", text)
        if t and int(t.group(1), 16) < a and int(t.group(1), 16) in index:
            body = [x for _, x in ins[index[int(t.group(1), 16)]:i + 1]]
            best = body if len(body) > len(best) else best
    assert best, "no loop found in the SASS (did the kernel's structure change?)"
    return best


def count(fmt: str, group: int, rows: int, groups: int, warps: int, arch: int) -> dict:
    pairs = fmt == "nf4 (pairs)"
    body = loop_body(compile_sass("nf4" if pairs else fmt, group, rows, groups, warps, arch, pairs))
    weights_per_thread = rows * groups * group / (warps * 32)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split()[0].split(".")[0] for b in body)
    return {"format": fmt, "group": group, "rows": rows, "groups_per_step": groups, "warps": warps,
            "loop_instructions": len(body), "per_weight": round(len(body) / weights_per_thread, 3),
            "top_ops": dict(ops.most_common(8))}


def table(report: dict) -> str:
    lines = [f"## Decode GEMV: SASS instructions per weight in the K loop (sm_{report['arch']}, offline)", "",
             f"Triton {report['triton']}; xpu-llm {report['commit']}; bf16 activations, group {report['group']}, "
             "shapes that divide the tile.", "",
             "| format | rows x groups, warps | loop instructions | per weight | most frequent |",
             "|---|---|---:|---:|---|"]
    for r in report["rows"]:
        top = ", ".join(f"{k} {v}" for k, v in list(r["top_ops"].items())[:5])
        lines.append(f"| {r['format']} | {r['rows']} x {r['groups_per_step']}, {r['warps']} | "
                     f"{r['loop_instructions']} | {r['per_weight']} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: Hopper)")
    ap.add_argument("--out", default=None, help="JSON path (a .md table is written next to it)")
    args = ap.parse_args(argv)
    import triton

    rows = [count(f.strip(), args.group_size, r, g, w, args.arch)
            for f in args.formats.split(",") if f.strip() for r, g, w in CONFIGS]
    report = {"arch": args.arch, "triton": triton.__version__, "commit": _git("rev-parse", "--short", "HEAD"), "group": args.group_size,
              "rows": rows}
    md = table(report)
    print(md)
    if args.out:
        write_atomic(args.out, json.dumps(report, indent=1))
        write_atomic(os.path.splitext(args.out)[0] + ".md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
