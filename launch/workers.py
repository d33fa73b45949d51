"""One Ray actor per rank: it receives its launch environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
and the oneCCL settings Intel cards need), then builds `xpu_llm.LLM(..., tp=, pp=)`, which joins the process group
and loads this rank's shard. Every rank runs the same calls; rank 0's results are the answer.

    python -c "from xpu_llm.launch import RayLLM; print(RayLLM(tp=2).generate('Hi')[0].text)"

Ray already shows each actor only its own card (CUDA_VISIBLE_DEVICES / ZE_AFFINITY_MASK), so every rank binds
card 0 of what it sees; on a CPU-only cluster ranks use the CPU and gloo."""
from __future__ import annotations

import os
import socket
from typing import Any, Iterator

from .cluster import RankSlot

# Settings a oneCCL ("ccl" / "xccl") process group needs outside mpirun; harmless for NCCL and gloo. Override any
# of them with RayLLM(env={...}) or by setting them in the job's runtime_env.
ONECCL_DEFAULTS = {
    "CCL_PROCESS_LAUNCHER": "none",   # ranks are started by Ray, not by Intel MPI's hydra
    "CCL_ATL_TRANSPORT": "ofi",       # libfabric transport (the oneCCL default, named for clarity)
    "CCL_ZE_IPC_EXCHANGE": "sockets",  # device-memory IPC handles over sockets: works in containers without pidfd
}


def rank_env(slot: RankSlot, world_size: int, master_addr: str, master_port: int,
             extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one rank, as torchrun would set it, plus the oneCCL settings (see ONECCL_DEFAULTS)."""
    env = {**ONECCL_DEFAULTS, "CCL_LOCAL_RANK": str(slot.local_rank),
           "CCL_LOCAL_SIZE": str(slot.local_world_size)}
    env.update(RANK=str(slot.rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(slot.local_rank),
               LOCAL_WORLD_SIZE=str(slot.local_world_size), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    env.update(extra or {})
    return env


class RankWorker:
    """The body of a rank actor (wrapped with ray.remote by RayLLM)."""

    def __init__(self) -> None:
        self.llm = None

    def where(self) -> dict[str, Any]:
        """Node, address, process id and visible cards of this actor (for placement checks and cleanup)."""
        import ray
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "visible": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")
                            if os.environ.get(k) is not None}}

    def free_port(self) -> int:
        """A TCP port free on this node now (rank 0 hosts the process group's store on it)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def load(self, env: dict[str, str], model: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Join the process group and load this rank's shard; returns what the driver needs to know."""
        os.environ.update(env)
        from xpu_llm import LLM
        from xpu_llm.errors import XpuLLMError
        self.llm = LLM(model, **kwargs)
        try:
            chat = bool(getattr(self.llm.tokenizer, "chat_template", None))
        except XpuLLMError:  # a folder without a tokenizer: token-id calls only
            chat = False
        return {"chat_template": chat, "low_bit": self.llm.low_bit,
                "dtype": str(self.llm.dtype), "device": str(self.llm.device), "repr": repr(self.llm)}

    def generate(self, prompts: Any, kwargs: dict[str, Any]) -> list:
        return self.llm.generate(prompts, **kwargs)

    def generate_ids(self, input_ids: Any, kwargs: dict[str, Any]) -> Any:
        return self.llm.generate_ids(input_ids, **kwargs)

    def logits(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.llm.logits(input_ids, attention_mask=attention_mask).cpu()

    def stream(self, prompt: Any, kwargs: dict[str, Any]) -> Iterator[str]:
        """Rank 0's text pieces (a Ray streaming generator)."""
        yield from self.llm.stream(prompt, **kwargs)

    def drain(self, prompt: Any, kwargs: dict[str, Any]) -> None:
        """The other ranks' side of stream(): the same collectives, no output."""
        for _ in self.llm.stream(prompt, **kwargs):
            pass

    def close(self) -> None:
        """Leave the process group cleanly before the actor is killed."""
        from xpu_llm.parallel.dist import shutdown
        self.llm = None
        shutdown()
