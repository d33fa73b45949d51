# python benchmarks/gemv_sass.py --out benchmarks/results/gemv_sass_sm90.json   (no GPU needed)
"""Instructions per weight in the K loop of the decode GEMV (lowbit/kernels/triton_gemv.py, one activation row)
and of the skinny GEMM (triton_gemm.py's dot kernel, 16 rows), from their SASS compiled offline for an NVIDIA
target (default sm_90, Hopper) with the run-time specialisation a real launch gets (every pointer and integer
argument divisible by 16, as on the 8B shapes). The kernels are bound by instructions per weight rather than by
bytes, so this count is what their changes are judged by before they are timed on a GPU; with the same Triton it
equals the count of the SASS the GPU builds (checked on an H200: 434 instructions, 6.78 a weight). Barriers and
shared-memory instructions in the loop are listed apart: they are the layout conversions Triton inserts (the
GEMV's activation tile goes through shared memory every step), which cost more than their count.

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
# (rows, groups per step, warps): the GEMV tuner's usual picks; (rows, groups per step, warps, stages) for the
# 16-row skinny GEMM
GEMV_CONFIGS = ((16, 8, 4), (16, 16, 4), (16, 4, 2), (8, 16, 4))
DOT_CONFIGS = ((64, 2, 4, 3), (128, 2, 4, 3))


def compile_sass(kernel_name: str, fmt: str, group: int, rows: int, groups: int, warps: int, arch: int,
                 stages: int = 3) -> str:
    """SASS text of the GEMV ("gemv") or the 16-row skinny GEMM ("dot") for bf16 activations and `fmt`, as a
    launch on `arch` specialises it ("nf4 (pairs)": nf4 through the 256-entry pair table, GEMV only)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from xpu_llm.lowbit.kernels import triton_gemm, triton_gemv
    from xpu_llm.lowbit.kernels.triton_common import FORMAT_IDS, SCALE_MUL

    pairs = fmt == "nf4 (pairs)"
    fmt = "nf4" if pairs else fmt
    scale = "*fp32" if fmt.startswith("fp8") else "*fp16"
    pointers = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": scale, "z_ptr": scale,
                "lut_ptr": "*i64" if pairs else "*fp32", "out_ptr": "*bf16"}
    const = {"FMT": FORMAT_IDS[fmt], "G": group, "SCALE_MUL": SCALE_MUL.get(fmt, 1.0), "SOFT_BF16": False,
             "BLOCK_N": rows, "NG": groups, "INPLACE": triton_gemv.INPLACE, "EVEN_N": True, "EVEN_G": True}
    if kernel_name == "gemv":
        kernel = triton_gemv._gemv_kernel
        const.update(X_PAIRS=True, NF4_PAIRS=pairs)
    else:
        assert not pairs, "the skinny GEMM reads the 16-entry nf4 table"
        kernel = triton_gemm._dot_kernel
        const.update(DOT_F32=False, BLOCK_M=16, GROUP_M=8)
    names = kernel.arg_names
    sig = {n: "constexpr" if n in const else pointers.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in const and n != "M"}
    src = ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
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


def count(kernel_name: str, fmt: str, group: int, rows: int, groups: int, warps: int, arch: int,
          stages: int = 3) -> dict:
    body = loop_body(compile_sass(kernel_name, fmt, group, rows, groups, warps, arch, stages))
    weights_per_thread = rows * groups * group / (warps * 32)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split()[0].split(".")[0] for b in body)
    shared = sum(n for op, n in ops.items() if op in ("LDS", "STS", "STSM", "LDSM"))
    return {"kernel": kernel_name, "format": fmt, "group": group, "rows": rows, "groups_per_step": groups,
            "warps": warps, "loop_instructions": len(body), "per_weight": round(len(body) / weights_per_thread, 3),
            "barriers": ops.get("BAR", 0), "shared_memory_ops": shared, "top_ops": dict(ops.most_common(8))}


def table(report: dict) -> str:
    lines = [f"## Low-bit kernels: SASS instructions per weight in the K loop (sm_{report['arch']}, offline)", "",
             f"Triton {report['triton']}; xpu-llm {report['commit']}; bf16 activations, group {report['group']}, "
             "shapes that divide the tile. gemv: one activation row; dot: the 16-row skinny GEMM (tiles of 16 x "
             "rows, dequantized into tl.dot). Barriers and shared-memory ops are per loop iteration.", "",
             "| kernel | format | rows x groups, warps | loop instructions | per weight | barriers | shared-memory "
             "ops | most frequent |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        top = ", ".join(f"{k} {v}" for k, v in list(r["top_ops"].items())[:5])
        lines.append(f"| {r['kernel']} | {r['format']} | {r['rows']} x {r['groups_per_step']}, {r['warps']} | "
                     f"{r['loop_instructions']} | {r['per_weight']} | {r['barriers']} | {r['shared_memory_ops']} | "
                     f"{top} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: Hopper)")
    ap.add_argument("--dot", action=argparse.BooleanOptionalAction, default=True,
                    help="also the 16-row skinny GEMM (default on)")
    ap.add_argument("--out", default=None, help="JSON path (a .md table is written next to it)")
    args = ap.parse_args(argv)
    import triton

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    rows = [count("gemv", f, args.group_size, r, g, w, args.arch) for f in formats for r, g, w in GEMV_CONFIGS]
    if args.dot:
        rows += [count("dot", f, args.group_size, r, g, w, args.arch, st) for f in formats if f != "nf4 (pairs)"
                 for r, g, w, st in DOT_CONFIGS]
    report = {"arch": args.arch, "triton": triton.__version__, "commit": _git("rev-parse", "--short", "HEAD"),
              "group": args.group_size, "rows": rows}
    md = table(report)
    print(md)
    if args.out:
        write_atomic(args.out, json.dumps(report, indent=1))
        write_atomic(os.path.splitext(args.out)[0] + ".md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
