"""Process groups for multi-card runs: join the group from whatever started the ranks (torchrun, `accelerate
launch`, Ray, Intel MPI / OpenMPI `mpirun`, or explicit arguments), bind each rank to its local card, build the
2-D grid (tensor-parallel groups inside pipeline stages), and make a failed or dead peer an error on every rank
within a bounded time, never a hang."""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..device import device_module, dist_backend, get_device, set_device
from ..errors import XpuLLMError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
ERROR_KEY = "xpu_llm/error"
_WATCH_PERIOD_S = 1.0
_GRACE_S = 5.0


class DistributedError(XpuLLMError):
    """A rank of a multi-card run failed (or died), so this rank cannot go on either."""


@dataclass
class Launch:
    """Where this process sits in the job, as its launcher describes it."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str


def _int(env: dict[str, str], *keys: str) -> int | None:
    for k in keys:
        if env.get(k, "") != "":
            return int(env[k])
    return None


def detect_launch(env: dict[str, str] | None = None) -> Launch | None:
    """The launch described by the environment: torchrun / accelerate / Ray set RANK and WORLD_SIZE; Intel MPI
    and MPICH set PMI_RANK, PMI_SIZE (MPI_LOCALRANKID); OpenMPI sets OMPI_COMM_WORLD_*. None outside a launch."""
    env = dict(os.environ if env is None else env)
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = _int(env, "MASTER_PORT") or 29500
    if _int(env, "RANK") is not None and _int(env, "WORLD_SIZE") is not None:
        rank, world, launcher = _int(env, "RANK"), _int(env, "WORLD_SIZE"), "torchrun"
        local = _int(env, "LOCAL_RANK")
        local_world = _int(env, "LOCAL_WORLD_SIZE")
    elif _int(env, "PMI_RANK") is not None and _int(env, "PMI_SIZE") is not None:
        rank, world, launcher = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE"), "mpi"
        local = _int(env, "MPI_LOCALRANKID", "PALS_LOCAL_RANKID")
        local_world = _int(env, "MPI_LOCALNRANKS", "PALS_LOCAL_SIZE")
    elif _int(env, "OMPI_COMM_WORLD_RANK") is not None:
        rank, world, launcher = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"), "openmpi"
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    else:
        return None
    local = rank if local is None else local
    return Launch(rank, world, local, local_world or world, addr, port, launcher)


def launch_world_size() -> int:
    """World size of the current launch (1 outside one, or the initialised group's size)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    launch = detect_launch()
    return 1 if launch is None else launch.world_size


@dataclass
class World:
    """This rank in the initialised default process group."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    timeout_s: float
    owns_group: bool = False
    _peer_error: str | None = field(default=None, repr=False)
    _busy_since: float | None = field(default=None, repr=False)
    _depth: int = field(default=0, repr=False)

    # ------------------------------------------------------------------------------------------ failures
    def store(self):
        return dist.distributed_c10d._get_default_store()

    def publish_error(self, exc: BaseException) -> None:
        """Tell the other ranks why this one is going down (the first report wins)."""
        msg = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        try:
            store = self.store()
            if store.add(ERROR_KEY + "/count", 1) == 1:
                store.set(ERROR_KEY, msg)
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0; nothing more to do
            log.debug("could not publish the error to the other ranks", exc_info=True)

    def peer_error(self, wait_s: float = 0.0) -> str | None:
        """The failure another rank reported, waiting up to `wait_s` for one to appear."""
        if self._peer_error is not None:
            return self._peer_error
        deadline = time.monotonic() + wait_s
        while True:
            try:
                store = self.store()
                if store.check([ERROR_KEY]):
                    msg = store.get(ERROR_KEY).decode(errors="replace")
                    if not msg.startswith(f"rank {self.rank}:"):
                        self._peer_error = msg
                    return self._peer_error
            except Exception:  # noqa: BLE001 - store unreachable: the rank hosting it is gone
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run collective work: a peer's failure becomes a DistributedError naming that peer and its error; this
        rank's own failure is reported to the peers first (so they end with it too), then re-raised."""
        known = self.peer_error()
        if known is not None:
            raise DistributedError(f"{what}: the multi-card run is down ({known})")
        if self._depth == 0:
            self._busy_since = time.monotonic()
        self._depth += 1
        try:
            yield
        except DistributedError:
            raise
        except BaseException as e:
            peer = self.peer_error(wait_s=1.0 if _is_comm_error(e) else 0.0)
            if peer is not None:
                raise DistributedError(f"{what} failed because {peer}") from e
            if _is_comm_error(e):
                err = DistributedError(
                    f"{what}: lost contact with another rank ({str(e).splitlines()[0][:300]}); it died, was killed "
                    f"or timed out after {self.timeout_s:.0f} s. Check the other ranks' output")
                self.publish_error(err)
                raise err from e
            self.publish_error(e)
            raise
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._busy_since = None

    def start_watchdog(self) -> None:
        """A daemon thread that notices a peer's reported failure while this rank is blocked in collective work:
        it aborts the process groups (NCCL / XCCL unblock), and if the rank is still stuck after a grace period
        it prints the peer's error and ends the process, rather than wait out the full timeout."""
        def watch() -> None:
            while dist.is_initialized():
                time.sleep(_WATCH_PERIOD_S)
                since = self._busy_since
                if since is None or time.monotonic() - since < _GRACE_S:
                    continue
                peer = self.peer_error()
                if peer is None:
                    continue
                time.sleep(_GRACE_S)
                if self._busy_since is None:
                    continue
                _abort_all()
                time.sleep(_GRACE_S)
                if self._busy_since is not None:
                    sys.stderr.write(f"xpu-llm: rank {self.rank}: ending: {peer}\n")
                    sys.stderr.flush()
                    os._exit(1)
        threading.Thread(target=watch, daemon=True, name="xpu-llm-dist-watchdog").start()


def _is_comm_error(e: BaseException) -> bool:
    if isinstance(e, (dist.DistError, TimeoutError, ConnectionError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed", "Connection reset", "Broken pipe", "Timed out", "timed out", "gloo", "NCCL", "ccl"))


def _abort_all() -> None:
    try:
        for pg in list(dist.distributed_c10d._world.pg_map):
            pg.abort()
    except Exception:  # noqa: BLE001
        log.debug("abort failed", exc_info=True)


_WORLD: World | None = None


def init_distributed(device: str | torch.device | None = None, backend: str | None = None,
                     timeout_s: float | None = None, rank: int | None = None, world_size: int | None = None,
                     local_rank: int | None = None, master_addr: str | None = None,
                     master_port: int | None = None) -> World:
    """Join (or reuse) the default process group. Explicit arguments override the launcher's environment; the
    backend comes from xpu_llm.device (xccl / ccl, nccl, gloo); each rank is bound to card `local_rank`."""
    global _WORLD
    if _WORLD is not None and dist.is_initialized():
        return _WORLD
    timeout_s = float(timeout_s or os.environ.get("XPU_LLM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    launch = detect_launch()
    if dist.is_initialized():  # started by the user, accelerate, DeepSpeed ...
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = local_rank if local_rank is not None else (launch.local_rank if launch else rank)
        local_world = launch.local_world_size if launch else world_size
    else:
        if world_size is None and launch is None:
            raise XpuLLMError(
                "a multi-card run needs one process per card: start it with `torchrun --nproc-per-node N ...`, "
                "`mpirun -n N ...` or `accelerate launch --num_processes N ...`, or pass rank= and world_size=")
        rank = rank if rank is not None else launch.rank
        world_size = world_size if world_size is not None else launch.world_size
        local_rank = local_rank if local_rank is not None else (launch.local_rank if launch else rank)
        local_world = launch.local_world_size if launch else world_size
        master_addr = master_addr or (launch.master_addr if launch else "127.0.0.1")
        master_port = master_port or (launch.master_port if launch else 29500)
    dev = _local_device(device, local_rank)
    backend = backend or dist_backend(dev)
    owns = not dist.is_initialized()
    if owns:
        kwargs = {"device_id": dev} if dev.type != "cpu" else {}
        log.info("rank %d/%d joining %s:%s over %s", rank, world_size, master_addr, master_port, backend)
        try:
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=timeout_s), **kwargs)
        except (dist.DistError, RuntimeError, TimeoutError) as e:
            raise DistributedError(
                f"rank {rank} could not join the {world_size}-rank group at {master_addr}:{master_port} within "
                f"{timeout_s:.0f} s ({str(e).splitlines()[0][:200]}): start all ranks, check MASTER_ADDR / "
                "MASTER_PORT and that the port is reachable (XPU_LLM_DIST_TIMEOUT sets the wait)") from e
        atexit.register(shutdown)
    _WORLD = World(rank, world_size, local_rank, local_world, dev, backend, timeout_s, owns)
    _install_excepthook(_WORLD)
    _WORLD.start_watchdog()
    return _WORLD


def _local_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """The card of this rank: local_rank modulo the visible cards (a launcher that shows one card per rank,
    e.g. Ray, gives index 0), or the CPU."""
    dev = get_device(device)
    mod = device_module(dev)
    if mod is None:
        return dev
    if dev.index is None:
        dev = torch.device(dev.type, local_rank % max(mod.device_count(), 1))
    set_device(dev)
    return dev


def _install_excepthook(world: World) -> None:
    """An uncaught error on this rank is reported to the peers before the process ends."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if not isinstance(value, (DistributedError, KeyboardInterrupt)):
            world.publish_error(value)
        previous(kind, value, tb)

    sys.excepthook = hook


def shutdown() -> None:
    """Leave the process group (if xpu-llm created it). Safe to call twice."""
    global _WORLD
    world, _WORLD = _WORLD, None
    if world is None or not world.owns_group or not dist.is_initialized():
        return
    try:
        if world.peer_error() is not None:
            _abort_all()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - tearing down after a failure
        log.debug("process group teardown: %s", traceback.format_exc())


# ---------------------------------------------------------------------------------------------- 2-D grid

@dataclass
class Grid:
    """tp x pp ranks: rank = stage * tp + tp_rank, so a stage's tensor-parallel ranks are neighbours (one host
    under torchrun / mpirun) and pipeline hops cross hosts."""
    world: World
    tp: int
    pp: int
    stage: int
    tp_rank: int
    tp_group: dist.ProcessGroup | None

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def next_rank(self) -> int:
        return self.rank_of((self.stage + 1) % self.pp, self.tp_rank)

    @property
    def prev_rank(self) -> int:
        return self.rank_of((self.stage - 1) % self.pp, self.tp_rank)


def make_grid(world: World, tp: int, pp: int) -> Grid:
    """Split the world into pp stages of tp ranks; every rank creates every stage's group (a collective)."""
    if tp * pp != world.world_size:
        raise XpuLLMError(f"tp={tp} x pp={pp} = {tp * pp} ranks, but {world.world_size} processes were started; "
                          f"start tp x pp processes (e.g. torchrun --nproc-per-node {tp * pp})")
    stage, tp_rank = divmod(world.rank, tp)
    group = None
    timeout = timedelta(seconds=world.timeout_s)
    with world.guard("creating the tensor-parallel groups"):
        for s in range(pp):
            ranks = [s * tp + t for t in range(tp)]
            g = dist.new_group(ranks, timeout=timeout) if tp > 1 else None
            if s == stage:
                group = g
    return Grid(world, tp, pp, stage, tp_rank, group)
