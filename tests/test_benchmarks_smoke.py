"""Smoke tests of benchmarks/decode.py and benchmarks/ppl.py at tiny settings on the embedded SmolLM2, and of
benchmarks/decode_8b.py and decode_attention.py on tiny random-weight shapes: the scripts run, write JSON + markdown, and their numbers
are finite and positive (no timing assertions)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
TEXT = ("The tower is 324 metres tall , about the same height as an 81 @-@ storey building , and the tallest "
        "structure in Paris . Its base is square , measuring 125 metres on each side . During its construction "
        "the Eiffel Tower surpassed the Washington Monument to become the tallest man @-@ made structure in the "
        "world , a title it held for 41 years until the Chrysler Building in New York City was finished in 1930 .\r\n")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, str(BENCH / script), "--threads", "2", *args], capture_output=True,
                       text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _bench_module(name: str):
    """A benchmark script imported as a module, to run its main in-process (sparing an interpreter + torch start)."""
    import importlib
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_decode_smoke(smollm2_path: str, tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    p = _run("decode.py", "--formats", "auto", "--new-tokens", "4", "--prompt-len", "8", "--repeats", "1",
             "--no-peers", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["settings"]["new_tokens"] == 4
    (row,) = report["rows"]
    assert "error" not in row, row
    assert row["engine"] == "xpu-llm" and row["format"] == "auto" and row["group_size"] == 32
    for k in ("decode_tokens_per_s", "ms_per_token", "prefill_ms", "weights_mib", "rss_mib"):
        assert _positive(row[k]), (k, row[k])
    assert len(row["tokens"]) == 4
    assert (tmp_path / "decode.md").read_text() in p.stdout
    assert "| xpu-llm | auto" in p.stdout


def test_ppl_smoke(smollm2_path: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # In-process (the script's main) to spare two interpreter + torch start-ups.
    ppl = _bench_module("ppl")
    text = tmp_path / "small.txt"
    text.write_bytes((TEXT * 3).encode())
    out = tmp_path / "ppl.json"
    args = ["--formats", "auto", "--groups", "32", "--window", "64", "--max-windows", "1", "--text", str(text),
            "--out", str(out)]
    assert ppl.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["key"] == "auto" and row["group"] == 32 and "GGUF-native" in row["label"] and row["windows"] == 1
    assert row["tokens_scored"] == 63
    assert _positive(row["perplexity"]) and row["perplexity"] < 1e4
    assert row["delta_vs_dense"] is None  # no dense row in this run
    assert "| auto = GGUF-native asym_int4 (group 32" in printed and (tmp_path / "ppl.md").read_text() in printed
    assert ppl.main(args + ["--resume"]) == 0  # nothing left to run: the row is kept, not measured again
    assert "0 rows to run, 1 kept" in capsys.readouterr().err
    assert json.loads(out.read_text())["rows"] == [row]


def test_decode_8b_smoke(tmp_path: Path) -> None:
    # Tiny random-weight shape on the CPU: device probe, two xpu-llm formats and the transformers bf16 peer (the
    # bitsandbytes row is skipped with a note where it does not import), one child process each.
    out = tmp_path / "d8.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, str(BENCH / "decode_8b.py"), "--shape", "tiny", "--device", "cpu",
                        "--formats", "sym_int4,bf16", "--batches", "2", "--prompts", "8", "--new-tokens", "4",
                        "--out", str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert _positive(report["probe"]["copy_gb_s"]) and _positive(report["probe"]["matmul_tflop_s"])
    rows = {(r["engine"], r["format"]): r for r in report["rows"]}
    assert set(rows) >= {("xpu-llm", "bf16"), ("xpu-llm", "sym_int4"), ("hf-bf16", "bf16")}, list(rows)
    for r in rows.values():
        assert "error" not in r, r
        assert r["batch"] == 2 and r["prompt"] == 8 and r["new_tokens"] == 8
        for k in ("decode_tok_s", "ms_per_step", "weights_mib_per_step", "bound_tok_s", "pct_bound", "peak_gib",
                  "prefill_s", "prefill_tflop_s", "prefill_pct_matmul"):
            assert _positive(r[k]), (r["engine"], r["format"], k, r[k])
    assert rows[("xpu-llm", "bf16")]["prefill_x_bf16"] is None
    assert _positive(rows[("hf-bf16", "bf16")]["prefill_x_bf16"])
    assert rows[("xpu-llm", "sym_int4")]["linear_bytes"] < rows[("xpu-llm", "bf16")]["linear_bytes"] / 3
    if ("bnb-nf4", "nf4 (bnb)") not in rows:
        assert any("bitsandbytes" in n for n in report["notes"])
    assert (tmp_path / "d8.md").read_text() in p.stdout and "| xpu-llm | sym_int4 | 2 | 8 |" in p.stdout


def test_decode_attention_smoke(tmp_path: Path) -> None:
    """benchmarks/decode_attention.py in-process on the CPU (no kernel there: both columns are SDPA, equal)."""
    decode_attention = _bench_module("decode_attention")
    out = tmp_path / "da.json"
    assert decode_attention.main(["--device", "cpu", "--slots", "64", "--batches", "1", "--kinds", "bf16,int8",
                                  "--layers", "2", "--reps", "1", "--rounds", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kind"], r["slots"]) for r in rows] == [("bf16", 64), ("int8", 64)]
    for r in rows:
        assert all(_positive(r[k]) for k in ("sdpa_us", "kernel_us", "sdpa_gb_s", "kernel_gb_s")), r
        assert r["rel_err"] == 0.0
    assert "| int8 | 64 | 1 |" in (tmp_path / "da.md").read_text()


def test_kv_decode_smoke(smollm2_path: str, tmp_path: Path) -> None:
    """benchmarks/kv_decode.py in-process: every cache kind decodes, natively and through the plain blocks; the
    compressed caches take about a quarter of the float32 one's bytes."""
    kv_decode = _bench_module("kv_decode")
    out = tmp_path / "kv.json"
    assert kv_decode.main(["--prompts", "16", "--new-tokens", "3", "--repeats", "1", "--max-seq-len", "64",
                           "--out", str(out)]) == 0
    rows = {r["kv"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"float32", "int8", "fp8"}, list(rows)
    for r in rows.values():
        assert _positive(r["tok_s"]) and _positive(r["plain_tok_s"]) and _positive(r["cache_mib"]), r
    assert rows["fp8"]["cache_mib"] * 4 == pytest.approx(rows["float32"]["cache_mib"], rel=1e-3)
    assert "| int8 | 16 |" in (tmp_path / "kv.md").read_text()


@pytest.mark.parametrize("script", ["decode.py", "ppl.py", "decode_8b.py", "decode_attention.py", "kv_decode.py"])
def test_scripts_start_with_their_command(script: str) -> None:
    first = (BENCH / script).read_text().splitlines()[0]
    assert first.startswith("# python benchmarks/" + script)


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_script_names_shadow_no_module(script: str) -> None:
    """A script's folder comes first on sys.path when it runs, so a script named like an installed or standard
    module would replace that module for everything the script imports (benchmarks/kernels.py did that to the
    `kernels` package, which transformers 5.25 imports when it is installed)."""
    import importlib.machinery

    name = script.removesuffix(".py")
    assert name not in sys.stdlib_module_names and name not in sys.builtin_module_names, name
    elsewhere = [p for p in sys.path if p and Path(p).resolve() != BENCH]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    assert spec is None, f"benchmarks/{script} shadows {name} at {spec.origin}"


def test_qlora_smoke(tmp_path: Path) -> None:
    """benchmarks/qlora.py on the tiny shape on the CPU, two rounds (the second in reverse order): every xpu-llm
    row trains to a finite loss; a bitsandbytes row runs or says it is not installed."""
    out = tmp_path / "q.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, str(BENCH / "qlora.py"), "--shape", "tiny", "--device", "cpu", "--engines",
                        "xpu-llm,bnb", "--uncheckpointed-layers", "0,1", "--steps", "2", "--warmup", "1",
                        "--rounds", "2", "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    order = [(r["round"], r["engine"], r.get("uncheckpointed_layers")) for r in rows]
    assert order == [(1, "xpu-llm", 0), (1, "xpu-llm", 1), (1, "bnb", None),
                     (2, "bnb", None), (2, "xpu-llm", 1), (2, "xpu-llm", 0)], order
    for r in rows:
        if r["engine"] == "bnb" and "error" in r:
            assert "bitsandbytes" in r["error"]
            continue
        assert r["finite"] and _positive(r["tokens_per_s"]) and _positive(r["peak_gib"]), r
    assert "| tiny | xpu-llm (1 layers not recomputed), round 2 |" in p.stdout
