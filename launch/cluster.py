"""Ray cluster side of a multi-card run: connect (or start a local Ray), count cards, and place tp x pp ranks in
one placement group with every tensor-parallel group on one node.

    python -c "from xpu_llm.launch.cluster import connect, cards_per_node; connect(); print(cards_per_node())"

Cards are Ray's `GPU` resource (Intel and NVIDIA GPUs both register as GPU); a cluster with no GPU gets CPU bundles
of `cpus_per_rank` CPUs each, so the same plans run (slowly) on Xeon-only hosts and in CI."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from ..errors import XpuLLMError

log = logging.getLogger(__name__)

DEFAULT_PLACEMENT_TIMEOUT_S = 120.0


def _ray():
    try:
        import ray
    except ImportError:
        raise XpuLLMError("the Ray launcher needs Ray: pip install 'xpu-llm[ray]'") from None
    return ray


def running_cluster() -> str | None:
    """Address of the cluster to join without being told: RAY_ADDRESS (set for `ray job submit` drivers), or
    the cluster the last `ray start` on this host recorded, if its processes are alive. Not Ray's "auto", which
    also joins any Ray another program on this host started with ray.init() and may shut down mid-run."""
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env
    try:
        from ray._private import services
        recorded = services.find_bootstrap_address(None)
        return recorded if recorded and recorded in services.find_gcs_addresses() else None
    except Exception as e:  # noqa: BLE001  (private API: a change in Ray means "no cluster", not a crash)
        log.debug("looking for a running Ray cluster failed: %s", e)
        return None


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
            object_store_memory: int | None = None, runtime_env: dict | None = None) -> bool:
    """Join a cluster: `address`, else a running one (running_cluster: RAY_ADDRESS as `ray job submit` sets it,
    or the one `ray start` recorded on this host); else, or with address "local", start a local Ray with the given
    caps. True when this call initialised Ray in this process, so the caller calls ray.shutdown() when done
    (which only disconnects from a joined cluster); False when Ray was already initialised."""
    ray = _ray()
    if ray.is_initialized():
        return False
    address = None if address == "local" else address or running_cluster()
    common = dict(runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError) as e:
            raise XpuLLMError(f"no Ray cluster could be joined at {address!r} ({str(e).splitlines()[0][:200]}): "
                              "check it with `ray status`, start one with `ray start --head`, or pass "
                              "address='local' for a private local Ray") from None
        log.info("joined the Ray cluster at %s", address)
        return True
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=object_store_memory,
             include_dashboard=False, **common)
    log.info("started a local Ray (%s CPUs)", num_cpus if num_cpus is not None else "all")
    return True


@dataclass(frozen=True)
class Node:
    """One alive node: its Ray id, address, and how many rank slots (cards or CPU bundles) it offers."""
    node_id: str
    ip: str
    cards: int


def cards_per_node(use_gpu: bool | None = None, cpus_per_rank: float = 1.0) -> tuple[bool, list[Node]]:
    """(uses GPUs, nodes): GPUs when the cluster has any (or use_gpu says so), else CPU bundles."""
    ray = _ray()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    has_gpu = any(n["Resources"].get("GPU", 0) >= 1 for n in nodes)
    gpu = has_gpu if use_gpu is None else use_gpu
    if gpu and not has_gpu:
        raise XpuLLMError("use_gpu=True but no node of this Ray cluster has a GPU resource; start the nodes with "
                          "`ray start --num-gpus N` (Intel GPUs: Ray counts them when the driver sees them)")
    out = []
    for n in nodes:
        res = n["Resources"]
        k = int(res.get("GPU", 0)) if gpu else int(res.get("CPU", 0) // cpus_per_rank)
        out.append(Node(n["NodeID"], n["NodeManagerAddress"], k))
    return gpu, out


@dataclass
class RankSlot:
    """Where one rank runs: its bundle of the placement group, its node, and its place in the tp x pp grid."""
    rank: int
    bundle: int
    node_id: str
    stage: int
    tp_rank: int
    local_rank: int = 0
    local_world_size: int = 1


@dataclass
class Placement:
    """A ready placement group and the rank -> bundle map (rank = stage * tp + tp_rank, as parallel.Grid)."""
    group: Any
    slots: list[RankSlot]
    use_gpu: bool
    tp: int
    pp: int
    cpus_per_rank: float

    def remove(self) -> None:
        """Give the bundles back (safe to call twice)."""
        if self.group is None:
            return
        try:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.group)
        except Exception:  # noqa: BLE001 - the cluster may already be gone
            log.debug("removing the placement group failed", exc_info=True)
        self.group = None


def check_capacity(tp: int, pp: int, gpu: bool, nodes: list[Node]) -> None:
    """Fail fast, before asking Ray, when the plan cannot fit: too few cards, or no node big enough for a tp group."""
    need, have = tp * pp, sum(n.cards for n in nodes)
    unit = "cards" if gpu else "CPU rank slots"
    shape = ", ".join(f"{n.ip}: {n.cards}" for n in nodes) or "no alive node"
    if have < need:
        raise XpuLLMError(f"the plan needs {need} {unit} (tp {tp} x pp {pp}), the cluster has {have} ({shape}); "
                          "add nodes or cards, or choose a smaller tp / pp (xpu-llm plan shows the options)")
    groups = sum(n.cards // tp for n in nodes)
    if groups < pp:
        raise XpuLLMError(f"each of the {pp} pipeline stages needs its {tp} tensor-parallel ranks on one node, but "
                          f"the nodes have {shape} {unit}: {groups} such group(s) fit; use a tp that a node holds")


def assign_ranks(bundle_nodes: list[str], tp: int, pp: int) -> list[RankSlot]:
    """Ranks for placed bundles: each node's bundles cut into tp groups (stages), nodes in bundle order. Raises
    when placement put a tensor-parallel group across two nodes."""
    by_node: dict[str, list[int]] = {}
    for b, node in enumerate(bundle_nodes):
        by_node.setdefault(node, []).append(b)
    stages = [bs[i:i + tp] for bs in by_node.values() for i in range(0, len(bs) - len(bs) % tp, tp)]
    if len(stages) < pp:
        split = {node[:8]: len(bs) for node, bs in by_node.items()}
        raise XpuLLMError(f"Ray placed the {tp * pp} bundles as {split} per node, which splits a tp {tp} group "
                          "across nodes; free whole nodes' cards for this job or use a smaller tp")
    slots = []
    for stage, bundles in enumerate(stages[:pp]):
        for t, b in enumerate(bundles):
            slots.append(RankSlot(stage * tp + t, b, bundle_nodes[b], stage, t))
    for node in by_node:
        mine = [s for s in slots if s.node_id == node]
        for i, s in enumerate(mine):
            s.local_rank, s.local_world_size = i, len(mine)
    return slots


def place(tp: int, pp: int, use_gpu: bool | None = None, cpus_per_rank: float = 1.0,
          timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S) -> Placement:
    """A PACK placement group of tp x pp one-card bundles, ready within `timeout_s`, with ranks assigned so that
    every tensor-parallel group sits on one node (checked after placement)."""
    ray = _ray()
    from ray.util.placement_group import placement_group, placement_group_table

    assert tp >= 1 and pp >= 1, f"tp and pp must be positive, got {tp} x {pp}"
    gpu, nodes = cards_per_node(use_gpu, cpus_per_rank)
    check_capacity(tp, pp, gpu, nodes)
    bundle = {"GPU": 1, "CPU": cpus_per_rank} if gpu else {"CPU": cpus_per_rank}
    group = placement_group([dict(bundle) for _ in range(tp * pp)], strategy="PACK", name="")
    placement = Placement(group, [], gpu, tp, pp, cpus_per_rank)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        placement.remove()
        raise XpuLLMError(f"Ray could not reserve {tp * pp} bundles of {bundle} within {timeout_s:.0f} s: other "
                          "jobs or actors hold the cards (`ray status` shows them); free them or wait") from None
    table = placement_group_table(group)["bundles_to_node_id"]
    try:
        placement.slots = assign_ranks([table[b] for b in range(tp * pp)], tp, pp)
    except XpuLLMError:
        placement.remove()
        raise
    log.info("placed tp %d x pp %d on %d node(s)", tp, pp, len({s.node_id for s in placement.slots}))
    return placement
