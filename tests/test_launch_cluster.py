"""Placement across nodes: on two simulated Ray nodes of two "GPU"s each, tp 2 x pp 2 puts each tensor-parallel
group on one node (as the actors themselves report) and the two pipeline stages on different nodes, with the
single-process tokens; the rank assignment refuses a tp group split across nodes; and `ray start --head` then
`ray job submit ... xpu_llm.launch.job generate` prints the single-process text."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import make_hf_model
from xpu_llm import LLM
from xpu_llm.errors import XpuLLMError
from xpu_llm.launch.cluster import Node, assign_ranks, check_capacity

EXACT = dict(dtype=torch.float32, group_size=32, max_seq_len=128, device="cpu")


def test_assign_ranks_keeps_tp_groups_on_a_node():
    slots = assign_ranks(["a", "b", "a", "b"], tp=2, pp=2)
    assert [(s.rank, s.bundle, s.node_id, s.stage, s.tp_rank, s.local_rank) for s in slots] == [
        (0, 0, "a", 0, 0, 0), (1, 2, "a", 0, 1, 1), (2, 1, "b", 1, 0, 0), (3, 3, "b", 1, 1, 1)]
    with pytest.raises(XpuLLMError, match="splits a tp 2 group across nodes"):
        assign_ranks(["a", "a", "a", "b"], tp=2, pp=2)


def test_capacity_errors_name_the_counts():
    nodes = [Node("a", "10.0.0.1", 2), Node("b", "10.0.0.2", 2)]
    check_capacity(2, 2, True, nodes)
    with pytest.raises(XpuLLMError, match=r"needs 8 cards \(tp 4 x pp 2\), the cluster has 4"):
        check_capacity(4, 2, True, nodes)
    with pytest.raises(XpuLLMError, match="tensor-parallel ranks on one node"):
        check_capacity(4, 1, True, nodes)


@pytest.mark.slow
def test_two_nodes_tp_within_a_node_pp_across(tmp_path):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from xpu_llm.launch import RayLLM

    path = tmp_path / "llama"
    make_hf_model("llama", seed=5, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=256).save_pretrained(path)
    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7]])
    ref = LLM(str(path), low_bit=None, **EXACT).generate_ids(ids, max_new_tokens=16, ignore_eos=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    cluster.add_node(num_cpus=2, num_gpus=2)
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        with RayLLM(str(path), tp=2, pp=2, low_bit=None, use_gpu=True, **EXACT) as llm:
            nodes = [w["node_id"] for w in llm.where]  # reported by each rank's actor
            assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]
            cards = [w["visible"].get("CUDA_VISIBLE_DEVICES") for w in llm.where]
            assert cards[0] != cards[1] and cards[2] != cards[3], cards  # one card per rank
            assert torch.equal(llm.generate_ids(ids, max_new_tokens=16, ignore_eos=True), ref)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_ray_job_submit_prints_the_single_process_text(smollm2_path, tmp_path):
    pytest.importorskip("ray")
    prompt = "Name a primary colour."
    want = LLM(smollm2_path, **EXACT).generate([{"role": "user", "content": prompt}], max_new_tokens=12)[0].text
    bindir = os.path.dirname(sys.executable)
    ray_cli = shutil.which("ray", path=bindir) or shutil.which("ray")
    assert ray_cli, "the ray command-line tool is not installed next to this Python"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
    dash = str(_free_port())
    start = subprocess.run([ray_cli, "start", "--head", "--num-cpus", "3", "--port", str(_free_port()),
                            "--dashboard-port", dash, "--include-dashboard", "true", "--object-store-memory",
                            str(100 * 2**20)],
                           env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        job = subprocess.run([ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
                              sys.executable, "-m", "xpu_llm.launch.job", "generate", "--model", smollm2_path,
                              "--tp", "3", "--dtype", "float32", "--group-size", "32", "--max-seq-len", "128",
                              "--max-new-tokens", "12", "--prompt", prompt],
                             env=env, capture_output=True, text=True, timeout=400)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert want.strip() and want in job.stdout, (want, job.stdout[-2000:])
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
