"""Metrics logging (tensorboardX + ``metrics.jsonl``) and a console progress line."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np

__all__ = ["Logger", "Progress"]

log = logging.getLogger(__name__)


def _to_float(value: Any) -> float:
    return float(np.asarray(value).reshape(()))


class Logger:
    """Writes scalars to TensorBoard event files and ``<logdir>/metrics.jsonl``.

    Every ``scalars`` call appends one JSON line ``{"step", "time", **scalars}``
    (values as floats; NaN/inf written as Python's JSON does). ``purge_step``
    (for a resumed run) drops JSONL lines and TensorBoard events with
    ``step >= purge_step`` left by the interrupted run. A JSONL write that fails (a full
    disk) is logged as an error naming the file and the record is dropped; training goes
    on and later records are written once writes succeed again.
    """

    def __init__(self, logdir: str, use_tensorboard: bool = True, purge_step: int | None = None):
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        self.jsonl_path = os.path.join(self.logdir, "metrics.jsonl")
        if purge_step is not None and os.path.exists(self.jsonl_path):
            self._purge_jsonl(int(purge_step))
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._dropped = 0  # records lost to failed writes since the last good one
        self._tb = None
        if use_tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(self.logdir, purge_step=purge_step, flush_secs=30)

    def _purge_jsonl(self, purge_step: int) -> None:
        kept = []
        with open(self.jsonl_path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] >= purge_step:
                        continue
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by the crash
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.jsonl_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.jsonl_path)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Logs ``{name: scalar}`` (python/numpy/jax 0-d) at ``step``."""
        step = int(step)
        floats = {str(k): _to_float(v) for k, v in values.items()}
        record = {"step": step, "time": time.time(), **floats}
        # After a failed write the file may end in a cut line: start on a fresh one.
        line = ("\n" if self._dropped else "") + json.dumps(record) + "\n"
        try:
            if self._jsonl.closed:  # closed after a failed write
                self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
            self._jsonl.write(line)
            self._jsonl.flush()
        except OSError as exc:
            if not self._dropped:
                log.error("cannot write metrics to %s (%s): dropping records until writes "
                          "succeed again", self.jsonl_path, exc)
            self._dropped += 1
            try:  # drop the unwritten buffer with the handle
                self._jsonl.close()
            except OSError:
                pass
        else:
            if self._dropped:
                log.warning("metrics written to %s again; %d record(s) were dropped",
                            self.jsonl_path, self._dropped)
                self._dropped = 0
        if self._tb is not None:
            for k, v in floats.items():
                self._tb.add_scalar(k, v, step)

    def images(self, step: int, values: Mapping[str, Any]) -> None:
        """Logs ``{name: uint8 (H, W, 3) or (N, H, W, 3)}`` to TensorBoard (no-op without it)."""
        if self._tb is None:
            return
        for k, img in values.items():
            img = np.asarray(img)
            if img.dtype != np.uint8:
                raise TypeError(f"image {k!r} must be uint8, got {img.dtype}")
            if img.ndim == 3:
                self._tb.add_image(k, img, int(step), dataformats="HWC")
            elif img.ndim == 4:
                self._tb.add_images(k, img, int(step), dataformats="NHWC")
            else:
                raise ValueError(f"image {k!r} must be HxWx3 or NxHxWx3, got shape {img.shape}")

    def flush(self) -> None:
        if not self._jsonl.closed:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    """Single console line with step, steps/s, ETA and fields, redrawn at most every ``interval`` s.

    ``update(step, return=..., ...)`` takes the absolute step; ``initial`` is the
    step a resumed run starts from (so steps/s counts only this process's steps).
    """

    def __init__(self, total_steps: int, initial: int = 0, interval: float = 1.0,
                 file=None, desc: str = "train"):
        from tqdm import tqdm
        self._bar = tqdm(total=int(total_steps), initial=int(initial), desc=desc, unit="step",
                         mininterval=interval, file=file if file is not None else sys.stderr,
                         dynamic_ncols=True, smoothing=0.05)
        self._interval = interval
        self._last = 0.0
        self._fields: dict[str, str] = {}

    @staticmethod
    def _fmt(v: Any) -> str:
        if v is None:  # no value yet (e.g. no episode has ended): a dash, not "None"
            return "-"
        if isinstance(v, str):
            return v
        try:
            f = _to_float(v)
        except (TypeError, ValueError):
            return str(v)
        if math.isfinite(f) and f == int(f) and abs(f) < 1e12:
            return str(int(f))
        return f"{f:.4g}"

    def update(self, step: int, **fields: Any) -> None:
        """Moves to absolute ``step``; ``fields`` (e.g. ``ret=812.3``) are shown after the rate."""
        for k, v in fields.items():
            self._fields[k] = self._fmt(v)
        delta = int(step) - self._bar.n
        now = time.monotonic()
        redraw = now - self._last >= self._interval
        if redraw:
            self._bar.set_postfix(self._fields, refresh=False)
            self._last = now
        if delta:
            self._bar.update(delta)
        elif redraw:
            self._bar.refresh()

    def write(self, msg: str) -> None:
        """Prints a line above the progress bar."""
        self._bar.write(msg)

    def close(self) -> None:
        self._bar.set_postfix(self._fields, refresh=False)
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def nonfinite_terms(metrics: dict) -> str:
    """The loss terms and gradient norms of one update's metrics that are non-finite, and
    its count of non-finite batch values."""
    names = [f"{k}={float(v)}" for k, v in sorted(metrics.items())
             if k.startswith(("loss/", "grad_norm/")) and not np.isfinite(v)]
    n = int(metrics.get("train/nonfinite_inputs", 0))
    if n:
        names.append(f"{n} batch input value(s)")
    return ", ".join(names) or "no named term"
