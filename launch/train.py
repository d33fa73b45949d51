"""python -c "from xpu_llm.launch.train import run_finetune; run_finetune(['--data', 'train.jsonl', '--output', 'out'], workers=2)"

QLoRA fine-tuning (finetune/train.py, the same entry `accelerate launch` runs) on Ray Train: a
`ray.train.torch.TorchTrainer` starts `workers` Ray actors, forms the process group (gloo on CPUs, nccl on
NVIDIA, xccl/ccl on Intel GPUs, from `xpu_llm.device.dist_backend`) and runs `finetune.train.run(args)` in
each. accelerate inside a worker adopts that process group: Ray Train sets RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR/PORT and ACCELERATE_TORCH_DEVICE before the training function starts, and
accelerate's PartialState reads them and skips `init_process_group` when a group already exists. The same
global batch (--batch-size x --grad-accum x workers) trains the same model as one process.

On a cluster: `ray job submit --working-dir . -- python -m xpu_llm.launch.job finetune --workers 2 -- ARGS`.
Relative paths in ARGS are made absolute on the driver, so every worker reads the same files."""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from typing import Any

from ..errors import XpuLLMError

log = logging.getLogger(__name__)

RAY_DIR = "ray_train"  # under --output: Ray Train's run state (never ~/ray_results)
LOCAL_OBJECT_STORE = 128 * 2**20  # a Ray started here holds no datasets: a small object store is enough
PATH_OPTIONS = ("data", "eval_data", "chat_template", "output")  # read or written by every worker


class WorkerFailedError(XpuLLMError):
    """One or more Ray Train workers failed; `failures` maps world rank -> short cause."""

    def __init__(self, message: str, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or {}

    def __reduce__(self):
        return (self.__class__, (str(self), self.failures))


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are XpuLLMErrors (a library call must not sys.exit on the driver)."""

    def error(self, message: str):
        raise XpuLLMError(f"bad training arguments: {message} (see `python -m xpu_llm.finetune.train --help`)")


# ---------------------------------------------------------------------------------------------- driver side

def parse_train_args(train_argv: list[str]) -> argparse.Namespace:
    """The training options, parsed and checked on the driver so that bad ones fail before any worker starts;
    relative paths become absolute because Ray Train workers run in another directory."""
    from ..finetune.args import add_train_args
    from ..finetune.train import check_args

    p = _Parser(prog="python -m xpu_llm.finetune.train", add_help=True)
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = add_train_args(p).parse_args(list(train_argv))
    check_args(args)
    for name in PATH_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            setattr(args, name, os.path.abspath(value))
    if args.model is not None and os.path.exists(args.model):
        args.model = os.path.abspath(args.model)
    if args.resume not in (None, "latest"):
        args.resume = os.path.abspath(args.resume)
    return args


def connect(address: str | None, workers: int, num_cpus_per_worker: float) -> bool:
    """cluster.connect, with a local Ray (when one is started) just big enough for the workers."""
    from .cluster import connect as connect_cluster, running_cluster

    num_cpus = max(1, math.ceil(workers * num_cpus_per_worker))
    address = address if address == "local" else address or running_cluster() or "local"  # resolved once
    if address == "local" and num_cpus > (os.cpu_count() or 1):
        log.warning("%d workers x %g CPUs oversubscribe this host's %d CPUs", workers, num_cpus_per_worker,
                    os.cpu_count() or 1)
    return connect_cluster(address, num_cpus=num_cpus, object_store_memory=LOCAL_OBJECT_STORE)


def worker_resources(use_gpu: bool, resources_per_worker: dict | None, num_cpus_per_worker: float) -> dict:
    """What each worker reserves: `num_cpus_per_worker` CPUs, one GPU when use_gpu, plus any extra resource."""
    res = {"CPU": num_cpus_per_worker, **(resources_per_worker or {})}
    if use_gpu:
        res.setdefault("GPU", 1)
        if res["GPU"] <= 0:
            raise XpuLLMError("use_gpu=True but resources_per_worker asks for GPU=0; drop the GPU entry or "
                              "pass use_gpu=False")
    elif res.get("GPU", 0) > 0:
        raise XpuLLMError("resources_per_worker asks for GPUs but use_gpu=False; pass use_gpu=True (or None)")
    return {k: v for k, v in res.items() if v}


def check_capacity(workers: int, per_worker: dict, started_here: bool) -> None:
    """Fail (a Ray we started cannot grow) or warn (a cluster may autoscale) when the cluster lacks the
    resources for all workers: Ray Train would otherwise wait for them forever."""
    import ray

    total = ray.cluster_resources()
    short = {k: (workers * v, total.get(k, 0)) for k, v in per_worker.items() if workers * v > total.get(k, 0)}
    if not short:
        return
    what = ", ".join(f"{k}: {need:g} needed, {have:g} in the cluster" for k, (need, have) in short.items())
    if started_here:
        raise XpuLLMError(f"{workers} workers do not fit in the local Ray ({what}); use fewer --workers, lower "
                          "num_cpus_per_worker, or start a cluster (`ray start --head`) and pass its address")
    log.warning("the Ray cluster lacks resources for %d workers (%s); waiting for the autoscaler", workers, what)


def _probe() -> tuple[str, str]:
    """Runs as a Ray task on a GPU node: that node's device type and process-group backend."""
    from ..device import dist_backend, get_device

    dev = get_device()
    return dev.type, dist_backend(dev)


def process_group_backend(use_gpu: bool, per_worker: dict, env_vars: dict[str, str]) -> tuple[str, str]:
    """(device type, process-group backend) of the workers, from `xpu_llm.device`: gloo for CPU workers; for
    GPU workers one probe task on a GPU node answers, because the driver may have no GPU or another kind
    (nccl for NVIDIA, xccl or ccl for Intel)."""
    import ray

    if not use_gpu:
        return "cpu", "gloo"
    probe = ray.remote(_probe).options(
        num_cpus=0, resources={k: v for k, v in per_worker.items() if k not in ("CPU", "GPU")},
        num_gpus=per_worker["GPU"], runtime_env={"env_vars": env_vars})
    kind, backend = ray.get(probe.remote())
    if kind == "cpu":
        raise XpuLLMError("the Ray cluster reports GPUs, but torch sees no xpu/cuda device on a GPU node; install "
                          "the matching torch build there, or pass use_gpu=False")
    return kind, backend


def worker_env(use_gpu: bool, num_cpus_per_worker: float) -> dict[str, str]:
    """Environment of every worker: CPU workers are pinned to the CPU device (the device layer would pick a
    GPU the worker did not reserve); one BLAS thread per reserved CPU."""
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(1, int(num_cpus_per_worker)))}
    if not use_gpu:
        env["XPU_LLM_DEVICE"] = "cpu"
    return env


def failure_message(err: BaseException, workers: int) -> WorkerFailedError:
    """A short error from Ray Train's TrainingFailedError: each failing rank with the first line of its cause,
    ranks with the same cause together, xpu-llm's own errors (the usual root cause; the other ranks then see
    their peer vanish) first. The full traces stay in the worker logs."""
    failures = getattr(err, "worker_failures", None) or {}
    if not failures:
        cause = getattr(err, "controller_failure", None) or err
        return WorkerFailedError(f"Ray Train failed: {_short(cause)}")
    causes = {rank: _short(e) for rank, e in sorted(failures.items())}
    by_cause: dict[str, list[int]] = {}
    for rank, cause in causes.items():
        by_cause.setdefault(cause, []).append(rank)
    ours = {c for rank, c in causes.items() if isinstance(failures[rank], XpuLLMError)}
    order = sorted(by_cause, key=lambda c: (c not in ours, by_cause[c][0]))
    parts = [f"worker rank{'s' if len(by_cause[c]) > 1 else ''} {', '.join(map(str, by_cause[c]))} (of {workers}) "
             f"failed: {c}" for c in order]
    return WorkerFailedError("; ".join(parts) + " (full traces in the worker logs above)", causes)


def _short(e: BaseException, limit: int = 400) -> str:
    """`Type: first line`, without the type for XpuLLMErrors (their message is meant for users)."""
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    if not isinstance(e, XpuLLMError):
        line = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def run_finetune(train_argv: list[str], workers: int, use_gpu: bool | None = None, address: str | None = None,
                 resources_per_worker: dict | None = None, num_cpus_per_worker: float = 1) -> int:
    """Run `python -m xpu_llm.finetune.train TRAIN_ARGV` on `workers` Ray Train workers (data parallel; the
    global batch is --batch-size x --grad-accum x workers). use_gpu None: GPUs when the cluster has any.
    address: a Ray cluster ("ray://..." or "host:port"), "local" for a private local Ray, None for RAY_ADDRESS /
    the `ray start` cluster of this host / a local Ray.
    Returns 0 (adapter written) or finetune's STOPPED (130: a Ctrl-C made Ray abort the workers; resume from
    the last periodic checkpoint); a failing worker raises WorkerFailedError (an XpuLLMError naming its rank
    and cause)."""
    if workers < 1:
        raise XpuLLMError(f"workers must be at least 1, got {workers}")
    if num_cpus_per_worker < 0:
        raise XpuLLMError(f"num_cpus_per_worker must be >= 0, got {num_cpus_per_worker}")
    args = parse_train_args(train_argv)
    import ray

    started = connect(address, workers, num_cpus_per_worker)
    try:
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        per_worker = worker_resources(use_gpu, resources_per_worker, num_cpus_per_worker)
        check_capacity(workers, per_worker, started)
        env = worker_env(use_gpu, num_cpus_per_worker)
        kind, backend = process_group_backend(use_gpu, per_worker, env)
        log.info("%d workers on %s, backend %s, each reserving %s", workers, kind, backend, per_worker)
        return fit(args, workers, use_gpu, per_worker, env, kind, backend)
    finally:
        if started:
            ray.shutdown()


def fit(args: argparse.Namespace, workers: int, use_gpu: bool, per_worker: dict, env: dict[str, str], kind: str,
        backend: str) -> int:
    """Build the TorchTrainer and run it; Ray Train's failures become one WorkerFailedError."""
    import ray.exceptions
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"args": args, "device_type": kind},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(storage_path=os.path.join(args.output, RAY_DIR),
                                       failure_config=ray.train.FailureConfig(max_failures=0),
                                       worker_runtime_env={"env_vars": env}, **_quiet_ray_train()))
    main_thread = threading.current_thread() is threading.main_thread()
    old_sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise failure_message(e, workers) from None
    except (SystemExit, ray.exceptions.RayActorError):  # Ctrl-C: Ray's SIGINT handler aborted the controller,
        return aborted(args.output)                      # whose ray.get then ends in SystemExit
    finally:
        if main_thread:  # fit() installs a handler that aborts this run's controller: not the caller's business
            signal.signal(signal.SIGINT, old_sigint)
    if not hasattr(result, "return_value"):  # Ray Train v1 (RAY_TRAIN_V2_ENABLED=0) returns no value
        return 0
    return aborted(args.output) if result.return_value is None else int(result.return_value)


def aborted(output: str) -> int:
    """Ray Train aborts workers on Ctrl-C (no step is finished, no checkpoint written): say how to go on."""
    from ..finetune.train import STOPPED

    print(f"the Ray Train run was aborted; continue from the last periodic checkpoint in "
          f"{os.path.join(output, 'checkpoints')} with --resume", file=sys.stderr)
    return STOPPED


def _quiet_ray_train() -> dict[str, Any]:
    """RunConfig options that keep Ray Train's own INFO lines off the console (v2 only)."""
    try:
        from ray.train import LoggingConfig
    except ImportError:
        return {}
    return {"logging_config": LoggingConfig(log_level="WARNING")}


# ---------------------------------------------------------------------------------------------- worker side

def card_index(visible: int, local_rank: int, ray_gpu_ids: list) -> int:
    """Which visible GPU a worker uses: the only one when Ray masked the others (ZE_AFFINITY_MASK /
    CUDA_VISIBLE_DEVICES with one id); else the card Ray assigned to it; else its local rank."""
    if visible < 1:
        raise XpuLLMError("this Ray worker reserved a GPU but torch sees none; check the node's driver and torch "
                          "build (torch.xpu / torch.cuda)")
    if visible == 1:
        return 0
    ids = [int(i) for i in ray_gpu_ids if str(i).isdigit()]
    if ids and ids[0] < visible:
        return ids[0]
    return local_rank % visible


def bind_device(kind: str, local_rank: int) -> Any:
    """Make this worker's device current and tell accelerate about it. The same steps for every accelerator: Ray
    shows the worker its own card (CUDA_VISIBLE_DEVICES / ZE_AFFINITY_MASK), so card_index picks it; on Intel XPU
    Ray treats the card as a CUDA "GPU" and set a cuda device for accelerate, hence ACCELERATE_TORCH_DEVICE is
    written here."""
    import torch

    from ..device import device_module, set_device

    if kind == "cpu":
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
        return torch.device("cpu")
    import ray
    mod = device_module(kind)
    device = torch.device(kind, card_index(mod.device_count(), local_rank, ray.get_gpu_ids()))
    set_device(device)
    os.environ["ACCELERATE_TORCH_DEVICE"] = str(device)
    return device


def train_worker(config: dict[str, Any]) -> int:
    """The Ray Train worker function: bind the device, then finetune.train.run(args). An XpuLLMError (bad data,
    missing model, ...) is re-raised without its stack, so the worker log shows one line, not a trace."""
    import ray.train

    from ..finetune.train import run

    args = config["args"]
    ctx = ray.train.get_context()
    level = max(logging.DEBUG, logging.WARNING - 10 * args.verbose)  # as `xpu-llm finetune -v`: quiet by default
    logging.getLogger("xpu_llm").setLevel(level)
    if args.verbose:
        logging.basicConfig(level=level, format=f"rank {ctx.get_world_rank()} %(levelname)s %(name)s: %(message)s")
    device = bind_device(config["device_type"], ctx.get_local_rank())
    log.info("rank %d/%d on %s", ctx.get_world_rank(), ctx.get_world_size(), device)
    try:
        return run(args)
    except XpuLLMError as e:
        failure = e
    raise failure.with_traceback(None)
