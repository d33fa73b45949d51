"""`RayLLM`: `xpu_llm.LLM` with its tp x pp ranks placed on a Ray cluster, one actor per card.

    python -c "from xpu_llm.launch import RayLLM; print(RayLLM(tp=2, pp=2).generate('Hello')[0].text)"

The driver holds no weights: it places the ranks (cluster.place), starts one RankWorker actor per rank with its
launch environment, and sends every call to every rank (they run the same program over the process group); rank
0's answer is returned. A rank that dies ends the call within seconds with an error naming it, and takes the
other ranks and the placement group down with it (nothing is left running)."""
from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Iterator

from ..errors import XpuLLMError
from .cluster import DEFAULT_PLACEMENT_TIMEOUT_S, Placement, _ray, connect, place
from .workers import RankWorker, rank_env

log = logging.getLogger(__name__)

PEER_GRACE_S = 30.0  # after one rank raised, how long the others get to end the same call before all are stopped
POLL_S = 0.5


class RankFailure(XpuLLMError):
    """A rank's actor died (or a rank failed and left the others blocked): the RayLLM is shut down."""


def _short(e: BaseException) -> str:
    """The line of a Ray error that says why (e.g. 'killed by `ray.kill`', 'exited with code 1')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = [ln for ln in lines if "because" in ln or "exit" in ln.lower()]
    return (why[-1] if why else lines[0] if lines else type(e).__name__)[:300]


def _cause(e: BaseException) -> BaseException | None:
    """The exception a rank raised, out of Ray's RayTaskError wrapper."""
    return getattr(e, "cause", None)


class RayLLM:
    """Load once across the cluster, generate many times; the API of xpu_llm.LLM (generate, stream, logits)."""

    def __init__(self, model: str | None = None, tp: int = 1, pp: int = 1, low_bit: str | None = "auto",
                 speculative: Any = None, *, address: str | None = None, use_gpu: bool | None = None,
                 cpus_per_rank: float = 1.0, env: dict[str, str] | None = None,
                 placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S, ray_init: dict | None = None,
                 **llm_kwargs: Any) -> None:
        """`llm_kwargs` go to xpu_llm.LLM on every rank (group_size, dtype, max_seq_len, device, ...); `env` adds
        or overrides rank environment variables (e.g. oneCCL settings); `ray_init` caps a local Ray that this
        call starts (num_cpus, object_store_memory)."""
        ray = _ray()
        if not (isinstance(tp, int) and isinstance(pp, int) and tp >= 1 and pp >= 1):
            raise XpuLLMError(f"RayLLM needs tp and pp as positive integers, got tp={tp!r} pp={pp!r} (`xpu-llm plan "
                              "MODEL --cards N` suggests a split)")
        self.tp, self.pp, self.world_size = tp, pp, tp * pp
        self._started_ray = connect(address, **(ray_init or {}))
        self._actors: list = []
        self._dead: str | None = None
        self.placement: Placement | None = None
        self._placed: list[Placement | None] = [None]  # what the finalizer removes if the RayLLM is dropped
        self._finalizer = weakref.finalize(self, RayLLM._teardown, self._actors, self._placed, self._started_ray)
        try:
            self.placement = self._placed[0] = place(tp, pp, use_gpu, cpus_per_rank, placement_timeout_s)
            self._start_actors(cpus_per_rank)
            self.where = self._gather([a.where.remote() for a in self._actors], "starting the rank actors")
            port = ray.get(self._actors[0].free_port.remote())
            master = self.where[0]["ip"]
            kwargs = dict(llm_kwargs, low_bit=low_bit, speculative=speculative, tp=self.tp, pp=self.pp)
            refs = [a.load.remote(rank_env(s, self.world_size, master, port, env), model, kwargs)
                    for a, s in zip(self._actors, self.placement.slots)]
            self.info = self._gather(refs, "loading the model")[0]
        except BaseException:
            self.shutdown()
            raise
        log.info("RayLLM: tp %d x pp %d on %s", self.tp, self.pp, sorted({w["ip"] for w in self.where}))

    def _start_actors(self, cpus_per_rank: float) -> None:
        ray = _ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cls = ray.remote(RankWorker)
        threads = str(max(1, int(cpus_per_rank)))
        for slot in self.placement.slots:
            strategy = PlacementGroupSchedulingStrategy(self.placement.group, placement_group_bundle_index=slot.bundle)
            opts = dict(num_cpus=self.placement.cpus_per_rank, num_gpus=1 if self.placement.use_gpu else 0,
                        scheduling_strategy=strategy, max_restarts=0, max_task_retries=0)
            if not self.placement.use_gpu:  # CPU ranks: as many math threads as CPUs reserved, set before torch loads
                opts["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": threads}}
            self._actors.append(cls.options(**opts).remote())

    # ------------------------------------------------------------------------------------------------ calls

    def _alive(self) -> None:
        if self._dead is not None:
            raise RankFailure(f"this RayLLM was shut down ({self._dead}); create a new one")

    def _fail(self, rank: int, what: str, why: str) -> None:
        where = self.where[rank] if getattr(self, "where", None) else {}
        self._dead = f"rank {rank} failed while {what}: {why}"
        self.shutdown(graceful=False)
        host = f" on {where['ip']} (pid {where['pid']})" if where else ""
        raise RankFailure(f"rank {rank}{host} failed while {what}: {why}; the job was stopped and its actors "
                          "removed")

    def _gather(self, refs: list, what: str) -> list:
        """Every rank's result of one call. A dead actor stops everything at once; a rank that raised gets the
        others PEER_GRACE_S to end the call too (bad input fails on every rank alike and keeps the RayLLM usable),
        else everything is stopped."""
        ray = _ray()
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        error: tuple[int, BaseException] | None = None
        deadline = None
        while pending:
            if deadline is not None and time.monotonic() > deadline:
                assert error is not None
                self._fail(error[0], what, f"{type(_cause(error[1]) or error[1]).__name__}: "
                                           f"{_cause(error[1]) or _short(error[1])} (the other ranks then hung)")
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in done:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self._fail(rank, what, _short(e))
                except ray.exceptions.RayError as e:
                    if error is None:
                        error, deadline = (rank, e), time.monotonic() + PEER_GRACE_S
        if error is not None:
            cause = _cause(error[1])
            if isinstance(cause, XpuLLMError) and not cause.__class__.__name__ == "DistributedError":
                raise cause  # the same error LLM raises in one process (bad prompt, bad option, ...)
            self._fail(error[0], what, f"{type(cause).__name__}: {cause}" if cause else _short(error[1]))
        return results

    def _call(self, method: str, what: str, *args: Any) -> Any:
        self._alive()
        return self._gather([getattr(a, method).remote(*args) for a in self._actors], what)[0]

    def generate(self, prompts: Any, **kwargs: Any) -> list:
        """As LLM.generate (same arguments); rank 0's results."""
        return self._call("generate", "generating", prompts, kwargs)

    def generate_ids(self, input_ids: Any, **kwargs: Any) -> Any:
        """As LLM.generate_ids: token ids in, prompt + continuation ids out (a CPU tensor)."""
        return self._call("generate_ids", "generating", input_ids, kwargs)

    def logits(self, input_ids: Any, attention_mask: Any = None) -> Any:
        """As LLM.logits: the full-vocabulary logits of every position, on the driver's CPU."""
        return self._call("logits", "computing logits", input_ids, attention_mask)

    def stream(self, prompt: Any, **kwargs: Any) -> Iterator[str]:
        """As LLM.stream: text pieces from rank 0 while the other ranks run the same steps."""
        ray = _ray()
        self._alive()
        what = "streaming"
        gen = self._actors[0].stream.options(num_returns="streaming").remote(prompt, kwargs)
        others = {a.drain.remote(prompt, kwargs): r for r, a in enumerate(self._actors[1:], 1)}
        while True:
            ready, _ = ray.wait([gen, *others], num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref is not gen:
                    self._check_one(ref, others.pop(ref), what)
            if others and not any(ref is gen for ref in ready):
                continue
            try:
                piece_ref = next(gen)
            except StopIteration:
                break
            try:
                piece = ray.get(piece_ref)
            except ray.exceptions.RayError as e:
                self._handle_rank0(e, others, what)  # raises
            yield piece
        self._gather(list(others), what)

    def _check_one(self, ref: Any, rank: int, what: str) -> None:
        """A non-zero rank that ended before rank 0 finished streaming: fine if it succeeded, else stop all."""
        ray = _ray()
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._fail(rank, what, _short(e))
        except ray.exceptions.RayError as e:
            cause = _cause(e)
            self._fail(rank, what, f"{type(cause).__name__}: {cause}" if cause else _short(e))

    def _handle_rank0(self, e: BaseException, others: dict, what: str) -> None:
        """Rank 0's stream raised: a bad-input error that every rank raises keeps the RayLLM, anything else stops
        it."""
        ray = _ray()
        if isinstance(e, ray.exceptions.RayActorError):
            self._fail(0, what, _short(e))
        cause = _cause(e)
        try:
            self._gather(list(others), what)
        except XpuLLMError:
            pass
        if isinstance(cause, XpuLLMError):
            raise cause
        self._fail(0, what, f"{type(cause).__name__}: {cause}" if cause else _short(e))

    # ---------------------------------------------------------------------------------------------- teardown

    @staticmethod
    def _teardown(actors: list, placement: list, started_ray: bool, graceful: bool = False) -> None:
        ray = _ray()
        if graceful and actors and ray.is_initialized():
            try:
                ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=10)
            except Exception:  # noqa: BLE001 - stopping anyway
                log.debug("graceful close failed", exc_info=True)
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        actors.clear()
        if placement and placement[0] is not None:
            placement[0].remove()
            placement[0] = None
        if started_ray and ray.is_initialized():
            ray.shutdown()

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every rank actor, give the cards back, and stop Ray if this RayLLM started it. Safe to call twice."""
        self._finalizer.detach()
        if self._dead is None:
            self._dead = "shutdown() was called"
        RayLLM._teardown(self._actors, self._placed, self._started_ray, graceful)
        self._started_ray = False

    def __enter__(self) -> "RayLLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "stopped" if self._dead else "running"
        return f"RayLLM(tp={self.tp}, pp={self.pp}, {state}, {getattr(self, 'info', {}).get('repr', '')})"
