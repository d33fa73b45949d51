"""A stale torch-extension build lock would hang a DeepSpeed run: find it first and say what to do.

DeepSpeed builds some ops on first use with torch's extension builder (on CPUs, the shared-memory communication op
`deepspeed_shm_comm`, ~1-2 min). The builder takes a lock file in the op's build folder and waits, with no timeout
and no message, for as long as that file exists. A build that was killed (Ctrl-C, a timeout, a crashed rank)
leaves it behind, and every later run sleeps on it. A lock older than any build takes is such a leftover."""
from __future__ import annotations

import glob
import os
import sys
import time

import torch

from ..errors import XpuLLMError

STALE_AFTER_S = 600.0  # a build takes ~1-2 min; a lock this old belongs to a build that is gone


def extensions_root() -> str:
    """The folder torch builds extensions of this Python and torch build under (as torch.utils.cpp_extension picks
    it: TORCH_EXTENSIONS_DIR, else the user cache with a pyXY_<accelerator> subfolder)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return root
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accel = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accel = "cu" + torch.version.cuda.replace(".", "")
    else:
        accel = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{py}_{accel}")


def stale_build_locks(max_age_s: float = STALE_AFTER_S, now: float | None = None) -> list[str]:
    """Lock files of extension builds under extensions_root() older than max_age_s."""
    now = time.time() if now is None else now
    out = []
    for lock in sorted(glob.glob(os.path.join(extensions_root(), "*", "lock"))):
        try:
            if now - os.path.getmtime(lock) > max_age_s:
                out.append(lock)
        except OSError:  # removed meanwhile: a build finished
            continue
    return out


def check_build_locks() -> None:
    """Raise with the paths and the fix when a stale build lock would make DeepSpeed wait forever."""
    stale = stale_build_locks()
    if stale:
        raise XpuLLMError(
            f"torch extension build lock(s) older than {STALE_AFTER_S / 60:.0f} min: {', '.join(stale)}. A build "
            "that was killed left them, and DeepSpeed would wait on them forever when it builds its ops. If no build "
            f"is running, delete them (rm {' '.join(stale)}) and start again.")
