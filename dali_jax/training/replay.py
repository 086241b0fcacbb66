"""Uniform sequence replay and a background prefetcher (host side, numpy).

Storage: for every key of ``spec`` one preallocated array of shape
``(num_envs, capacity // num_envs, *shape)``. All envs advance together (one
``add`` writes one step for every env), so each env's stream is a ring buffer
of ``capacity // num_envs`` steps with FIFO eviction, and all streams hold the
same number of steps.

Sampling draws a window of ``seq_len`` consecutive steps of one env, uniformly
over all (env, start) pairs whose window lies inside the stored part of that
env's stream. Windows may cross episode boundaries; episode starts are marked
by ``is_first`` and the model resets its state there.

Randomness: without an explicit ``rng``, batch ``k`` (counted since
construction) is drawn from ``np.random.default_rng((seed, k))``, so the RNG
state is just ``(seed, k)`` and a restored buffer continues with exactly the
same samples. With a ``Prefetcher`` the sampling runs asynchronously with
``add``, so the sample stream then also depends on thread timing.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["Replay", "Prefetcher"]

Spec = Mapping[str, tuple[tuple[int, ...], Any]]


class Replay:
    """Uniform replay of fixed-length windows from per-env step streams.

    Args:
      capacity: total steps kept over all envs (``capacity // num_envs`` per env).
      num_envs: number of parallel env streams.
      spec: ``{key: (shape, dtype)}`` of one step of one env, e.g.
        ``{"obs": ((8,), np.float32), "image": ((64, 64, 3), np.uint8),
        "action": ((2,), np.float32), "reward": ((), np.float32),
        "is_first": ((), bool), ...}``.
      seq_len: default window length ``T`` of ``sample``.
      seed: seed of the internal sample stream.
    """

    def __init__(self, capacity: int, num_envs: int, spec: Spec, seq_len: int = 64,
                 seed: int = 0):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        per_env = int(capacity) // int(num_envs)
        if per_env < 1:
            raise ValueError(f"capacity {capacity} < num_envs {num_envs}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.num_envs = int(num_envs)
        self.per_env = per_env
        self.capacity = per_env * self.num_envs
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.spec = {k: (tuple(int(d) for d in shape), np.dtype(dtype))
                     for k, (shape, dtype) in spec.items()}
        # np.zeros maps pages lazily: untouched capacity costs no memory.
        self._data = {k: np.zeros((self.num_envs, per_env) + shape, dtype)
                      for k, (shape, dtype) in self.spec.items()}
        self._filled = 0        # steps stored per env
        self._head = 0          # physical index of the oldest stored step
        self._num_added = 0     # steps ever added per env
        self._sample_count = 0  # batches drawn from the internal stream
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ writing
    def add(self, step: Mapping[str, Any]) -> None:
        """Appends one time step for all envs.

        ``step[key]`` has shape ``(num_envs, *spec[key].shape)``; keys must equal
        the spec's keys. Values are cast to the spec's dtype.
        """
        if step.keys() != self._data.keys():
            missing = sorted(set(self._data) - set(step))
            extra = sorted(set(step) - set(self._data))
            raise KeyError(f"step keys differ from spec: missing {missing}, unexpected {extra}")
        values = {}
        for key, buf in self._data.items():
            value = np.asarray(step[key])
            if value.shape != (self.num_envs,) + buf.shape[2:]:
                raise ValueError(f"step[{key!r}] has shape {value.shape}, expected "
                                 f"{(self.num_envs,) + buf.shape[2:]}")
            values[key] = value
        with self._lock:
            pos = (self._head + self._filled) % self.per_env
            for key, value in values.items():
                self._data[key][:, pos] = value
            if self._filled < self.per_env:
                self._filled += 1
            else:  # the oldest step was overwritten
                self._head = (self._head + 1) % self.per_env
            self._num_added += 1

    # ----------------------------------------------------------------- sampling
    def __len__(self) -> int:
        """Steps stored over all envs."""
        return self._filled * self.num_envs

    @property
    def num_added(self) -> int:
        """Steps ever added over all envs (including evicted ones)."""
        return self._num_added * self.num_envs

    def can_sample(self, seq_len: int | None = None) -> bool:
        return self._filled >= (seq_len or self.seq_len)

    def sample(self, batch: int, rng: np.random.Generator | None = None,
               seq_len: int | None = None) -> dict[str, np.ndarray]:
        """Draws ``batch`` windows: ``{key: (B, T, *shape)}``, T = ``seq_len``.

        Uses the internal counter-based stream unless ``rng`` is given.
        Raises ``ValueError`` while fewer than ``T`` steps per env are stored.
        """
        T = int(seq_len or self.seq_len)
        with self._lock:
            starts_per_env = self._filled - T + 1
            if starts_per_env < 1:
                raise ValueError(f"replay holds {self._filled} steps per env, "
                                 f"need >= {T} to sample")
            if rng is None:
                rng = np.random.default_rng((self.seed, self._sample_count))
                self._sample_count += 1
            # Uniform over the num_envs * starts_per_env valid (env, start) pairs.
            flat = rng.integers(0, self.num_envs * starts_per_env, size=batch)
            env = flat // starts_per_env
            start = flat % starts_per_env          # chronological offset from oldest
            idx = (self._head + start[:, None] + np.arange(T)[None]) % self.per_env
            return {k: v[env[:, None], idx] for k, v in self._data.items()}

    # ------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Snapshot as plain numpy arrays and ints.

        ``data/<key>``: ``(num_envs, filled, *shape)`` in chronological order
        (a copy); ints ``filled``, ``num_added``, ``sample_count``, ``seed``,
        ``num_envs``, ``seq_len``, ``capacity``.
        """
        with self._lock:
            order = (self._head + np.arange(self._filled)) % self.per_env
            state: dict[str, Any] = {f"data/{k}": v[:, order] for k, v in self._data.items()}
            state.update(filled=self._filled, num_added=self._num_added,
                         sample_count=self._sample_count, seed=self.seed,
                         num_envs=self.num_envs, seq_len=self.seq_len,
                         capacity=self.capacity)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a ``state_dict`` (ints may come back as 0-d arrays).

        The spec and ``num_envs`` must match. A smaller capacity keeps only the
        most recent steps.
        """
        num_envs = int(np.asarray(state["num_envs"]))
        if num_envs != self.num_envs:
            raise ValueError(f"replay state has num_envs={num_envs}, buffer has {self.num_envs}")
        keys = {k[len("data/"):] for k in state if k.startswith("data/")}
        if keys != set(self._data):
            raise ValueError(f"replay state keys {sorted(keys)} differ from spec "
                             f"{sorted(self._data)}")
        filled = int(np.asarray(state["filled"]))
        keep = min(filled, self.per_env)
        for key, buf in self._data.items():
            arr = np.asarray(state[f"data/{key}"])
            want = (self.num_envs, filled) + buf.shape[2:]
            if arr.shape != want or arr.dtype != buf.dtype:
                raise ValueError(f"replay state data/{key} is {arr.shape} {arr.dtype}, "
                                 f"expected {want} {buf.dtype}")
        with self._lock:
            for key, buf in self._data.items():
                buf[:, :keep] = np.asarray(state[f"data/{key}"])[:, filled - keep:]
            self._filled = keep
            self._head = 0
            self._num_added = int(np.asarray(state["num_added"]))
            self._sample_count = int(np.asarray(state["sample_count"]))
            self.seed = int(np.asarray(state["seed"]))


class _Raised:
    """Carries an exception from the producer thread to the consumer."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher:
    """Runs ``sample_fn()`` in a background thread, ``depth`` batches ahead.

    ``next(p)`` returns the next batch (after ``jax.device_put(batch, sharding)``
    in the thread when ``sharding`` is given). An exception raised by
    ``sample_fn`` is re-raised by ``next``. ``wait_seconds`` accumulates the
    time the consumer blocked in ``next``; ``wait_fraction()`` relates it to
    wall time since the last ``reset_wait()``. Use as a context manager or
    call ``close()``.
    """

    def __init__(self, sample_fn: Callable[[], Any], depth: int = 2, sharding: Any = None,
                 name: str = "replay-prefetch"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._sample_fn = sample_fn
        self._sharding = sharding
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self.wait_seconds = 0.0
        self.num_batches = 0
        self._since = time.perf_counter()
        self._wait_since = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._sample_fn()
                if self._sharding is not None:
                    import jax
                    batch = jax.device_put(batch, self._sharding)
                if not self._put(batch):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(_Raised(exc))

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        if self._done:
            raise RuntimeError("Prefetcher is closed")
        t0 = time.perf_counter()
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("prefetch thread ended without a batch")
        dt = time.perf_counter() - t0
        self.wait_seconds += dt
        self._wait_since += dt
        if isinstance(item, _Raised):
            self.close()
            raise item.exc
        self.num_batches += 1
        return item

    get = __next__

    def wait_fraction(self) -> float:
        """Consumer wait time / wall time since the last ``reset_wait()``."""
        wall = time.perf_counter() - self._since
        return self._wait_since / wall if wall > 0 else 0.0

    def reset_wait(self) -> tuple[float, float]:
        """Returns ``(waited_s, wall_s)`` since the last reset and starts a new interval."""
        now = time.perf_counter()
        out = (self._wait_since, now - self._since)
        self._since, self._wait_since = now, 0.0
        return out

    def close(self, timeout: float = 10.0) -> None:
        """Stops the thread (after its current ``sample_fn`` call) and drops queued batches."""
        self._done = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
