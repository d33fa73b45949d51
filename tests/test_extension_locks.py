"""A torch-extension build lock left by a killed build makes DeepSpeed wait forever when it builds its ops (its
CPU communication op on first use): the trainer finds such a lock first and stops with the path and the fix."""
from __future__ import annotations

import os
import time

import pytest

from xpu_llm.errors import XpuLLMError
from xpu_llm.finetune import extensions as ext


def test_a_stale_build_lock_is_an_error_that_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "deepspeed_shm_comm").mkdir()
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.write_text("")
    assert ext.stale_build_locks() == []  # fresh: a build may be running
    ext.check_build_locks()
    old = time.time() - 2 * ext.STALE_AFTER_S
    os.utime(lock, (old, old))
    assert ext.stale_build_locks() == [str(lock)]
    with pytest.raises(XpuLLMError, match=f"rm {lock}"):
        ext.check_build_locks()
    # the trainer's setup raises it under DeepSpeed, before anything could wait on the lock
    pytest.importorskip("accelerate")
    from xpu_llm.finetune.train import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(XpuLLMError, match="build lock"):
        make_accelerator(1)


def test_the_root_is_where_torch_builds(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    if not hasattr(cpp_extension, "_get_build_directory"):
        pytest.skip("torch no longer has the private function this compares with")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))
    assert os.path.dirname(cpp_extension._get_build_directory("op", False)) == ext.extensions_root()
