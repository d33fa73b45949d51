# python examples/quickstart.py
"""Load the embedded SmolLM2 (GGUF Q4_1, kept as asym_int4), chat with streaming, batch-generate, and save the
engine's low-bit folder and load it back."""
import tempfile

import xpu_llm

llm = xpu_llm.LLM()  # None = the embedded SmolLM2; low_bit="auto" keeps the file's own format
print(llm)

for piece in llm.stream("Give me three tips for writing clear code.", chat=True, max_new_tokens=96):
    print(piece, end="", flush=True)
print()

for r in llm.generate(["The capital of France is", "The largest planet is"], max_new_tokens=12):
    print(repr(r.text), r.stats["decode_tokens_per_s"], "tok/s")

with tempfile.TemporaryDirectory() as d:
    out = llm.save_low_bit(f"{d}/smol")
    again = xpu_llm.LLM(out)
    print(again.generate("The capital of France is", max_new_tokens=12)[0].text)
