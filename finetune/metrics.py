"""Training metrics: one JSON object per line in `metrics.jsonl` (appended as steps finish, cut back to the
checkpoint's step on resume) and, when the `tensorboard` package is installed, TensorBoard scalars."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSONL metrics of the main process (other ranks get a no-op log)."""

    def __init__(self, path: str, enabled: bool = True, tensorboard_dir: str | None = None) -> None:
        self.path, self.enabled = path, enabled
        self._tb = None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(tensorboard_dir)
            except ImportError:  # tensorboard is optional
                log.debug("tensorboard is not installed; metrics go to %s only", path)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (they are redone after a resume); atomic rewrite."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def reset(self) -> None:
        if self.enabled and os.path.exists(self.path):
            os.remove(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
