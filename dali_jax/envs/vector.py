"""N environments stepped together, in worker processes or in-process (DreamerV3 convention).

``reset()`` and ``step(actions)`` return a batch dict of stacked arrays: every observation key
(e.g. ``obs`` (N, D) float32, ``context`` (N, 2) float32, ``image`` (N, 64, 64, 3) uint8), plus
``reward`` float32 (N,) and ``is_first`` / ``is_last`` / ``is_terminal`` bool (N,).
Auto-reset: after an env returned ``is_last``, its next step ignores the action, resets and
returns ``is_first=True`` with reward 0. ``step`` also returns the episodes that finished in it.

An env-side exception (or a dead worker) ends that env's episode (``is_last=True``, not
terminal, with the previous observation), restarts the worker from its env_fn and warns.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import traceback
import warnings
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

_FLAGS = ("is_first", "is_last", "is_terminal")


@dataclasses.dataclass
class EpisodeReport:
    """One finished episode of env ``env_index``."""

    env_index: int
    episode_return: float
    length: int  # env steps (transitions) in the episode
    context_id: Any
    context: dict[str, float]
    truncated: bool = False  # ended by time limit, instability or error (not terminal)
    unstable: bool = False  # ended by a numerical instability
    error: str | None = None  # ended by an env-side exception (worker restarted)


class VectorEnvWarning(RuntimeWarning):
    """An env worker failed and was restarted."""


class _Runner:
    """Holds one env; converts gymnasium steps into DreamerV3 transitions with auto-reset."""

    def __init__(self, env_fn: Callable[[], Any]):
        self.env = env_fn()
        self.needs_reset = True

    def spaces(self):
        return self.env.observation_space, self.env.action_space

    def reset(self):
        obs, _ = self.env.reset()
        self.needs_reset = False
        meta = {"context_id": getattr(self.env, "context_id", None),
                "context": dict(getattr(self.env, "context", {}) or {})}
        return obs, 0.0, True, False, False, meta

    def step(self, action):
        if self.needs_reset:
            return self.reset()
        obs, reward, terminated, truncated, info = self.env.step(action)
        last = bool(terminated or truncated)
        self.needs_reset = last
        meta = {"unstable": bool(info.get("unstable", False))} if info.get("unstable") else {}
        return obs, float(reward), False, last, bool(terminated), meta

    def close(self):
        close = getattr(self.env, "close", None)
        if close is not None:
            close()


def _worker(conn, env_fn) -> None:
    """Worker loop: ("reset"|"step"|"spaces"|"call"|"close", arg) -> ("ok"|"error", result)."""
    try:
        runner = _Runner(env_fn)
        conn.send(("ok", runner.spaces()))
    except BaseException:  # noqa: BLE001 - report any construction failure
        conn.send(("error", traceback.format_exc()))
        conn.close()
        return
    try:
        while True:
            cmd, arg = conn.recv()
            try:
                if cmd == "step":
                    out = runner.step(arg)
                elif cmd == "reset":
                    out = runner.reset()
                elif cmd == "call":
                    name, args, kwargs = arg
                    out = getattr(runner.env, name)(*args, **kwargs)
                elif cmd == "close":
                    runner.close()
                    conn.send(("ok", None))
                    break
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                conn.send(("ok", out))
            except Exception:  # env-side failure: report, the parent restarts this worker
                conn.send(("error", traceback.format_exc()))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass
    finally:
        conn.close()


class _WorkerError(RuntimeError):
    pass


class VectorEnv:
    """``env_fns`` (picklable zero-argument callables, e.g. functools.partial(make_env, ...))
    stepped together; ``parallel=False`` runs them in this process (tests, debugging).

    Args:
      start_method: multiprocessing start method ("forkserver" or "spawn").
      timeout: seconds to wait for a worker before treating it as dead.
    """

    def __init__(self, env_fns: Sequence[Callable[[], Any]], parallel: bool = True,
                 start_method: str = "forkserver", timeout: float = 120.0):
        self._fns = list(env_fns)
        if not self._fns:
            raise ValueError("VectorEnv needs at least one env_fn")
        self.num_envs = len(self._fns)
        self.parallel = parallel
        self.timeout = timeout
        self._closed = False
        if parallel:
            if start_method not in ("forkserver", "spawn"):
                raise ValueError("start_method must be 'forkserver' or 'spawn' (fork is unsafe "
                                 "with GL contexts and threads)")
            self._ctx = mp.get_context(start_method)
            if start_method == "forkserver":
                self._ctx.set_forkserver_preload(["dali_jax.envs.dmc"])
            self._procs: list = [None] * self.num_envs
            self._conns: list = [None] * self.num_envs
            spaces = [self._start(i) for i in range(self.num_envs)]
        else:
            self._runners = [_Runner(fn) for fn in self._fns]
            spaces = [r.spaces() for r in self._runners]
        self.observation_space, self.action_space = spaces[0]
        n = self.num_envs
        self._last_obs: list[dict | None] = [None] * n
        self._needs_reset = np.ones(n, bool)
        self._ret = np.zeros(n, np.float64)
        self._len = np.zeros(n, np.int64)
        self._ctx_id: list[Any] = [None] * n
        self._ctx_val: list[dict] = [{} for _ in range(n)]
        self.restarts = np.zeros(n, np.int64)

    # -- worker management ----------------------------------------------------------------------
    def _start(self, i: int):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, args=(child, self._fns[i]), daemon=True,
                                 name=f"VectorEnv-{i}")
        proc.start()
        child.close()
        self._procs[i], self._conns[i] = proc, parent
        status, out = self._recv(i)
        if status != "ok":
            raise RuntimeError(f"env {i} failed to start:\n{out}")
        return out

    def _recv(self, i: int):
        conn = self._conns[i]
        try:
            if not conn.poll(self.timeout):
                return "error", f"worker {i} timed out after {self.timeout} s"
            return conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as e:
            return "error", f"worker {i} died ({type(e).__name__}: {e})"

    def _send(self, i: int, msg) -> bool:
        try:
            self._conns[i].send(msg)
            return True
        except (BrokenPipeError, ConnectionResetError, OSError):
            return False

    def _kill(self, i: int) -> None:
        proc, conn = self._procs[i], self._conns[i]
        try:
            conn.close()
        except OSError:
            pass
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    def _restart(self, i: int) -> None:
        self.restarts[i] += 1
        if self.parallel:
            self._kill(i)
            self._start(i)
        else:
            try:
                self._runners[i].close()
            except Exception:  # noqa: BLE001 - the env is being discarded
                pass
            self._runners[i] = _Runner(self._fns[i])

    def _run(self, cmds: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Runs one command per env (all sent before any is received in parallel mode)."""
        if not self.parallel:
            out = []
            for runner, (cmd, arg) in zip(self._runners, cmds):
                try:
                    out.append(("ok", runner.step(arg) if cmd == "step" else runner.reset()))
                except Exception:  # noqa: BLE001 - env-side failure
                    out.append(("error", traceback.format_exc()))
            return out
        sent = [self._send(i, c) for i, c in enumerate(cmds)]
        return [self._recv(i) if ok else ("error", f"worker {i} pipe closed")
                for i, ok in enumerate(sent)]

    def _reset_one(self, i: int):
        """Resets env i, restarting its worker once if that fails."""
        for attempt in range(2):
            status, out = self._run_single(i, ("reset", None))
            if status == "ok":
                return out
            self._warn(f"env {i} failed to reset (attempt {attempt + 1}); restarting it:\n{out}")
            self._restart(i)
        raise RuntimeError(f"env {i} keeps failing at reset")

    def _run_single(self, i: int, cmd):
        if not self.parallel:
            try:
                r = self._runners[i]
                return "ok", (r.step(cmd[1]) if cmd[0] == "step" else r.reset())
            except Exception:  # noqa: BLE001
                return "error", traceback.format_exc()
        if not self._send(i, cmd):
            return "error", f"worker {i} pipe closed"
        return self._recv(i)

    @staticmethod
    def _warn(msg: str) -> None:
        log.warning(msg)
        warnings.warn(msg, VectorEnvWarning, stacklevel=3)

    # -- API --------------------------------------------------------------------------------
    def reset(self) -> dict[str, np.ndarray]:
        """Resets every env. -> batch dict (is_first all True, reward 0)."""
        results = self._run([("reset", None)] * self.num_envs)
        trans = []
        for i, (status, out) in enumerate(results):
            if status != "ok":
                self._warn(f"env {i} failed to reset; restarting it:\n{out}")
                self._restart(i)
                out = self._reset_one(i)
            trans.append(out)
        for i, t in enumerate(trans):
            self._account(i, t)
        return self._stack(trans)

    def step(self, actions) -> tuple[dict[str, np.ndarray], list[EpisodeReport]]:
        """Steps every env (auto-reset after is_last). -> (batch dict, finished episodes)."""
        actions = np.asarray(actions)
        if actions.shape[0] != self.num_envs:
            raise ValueError(f"expected {self.num_envs} actions, got shape {actions.shape}")
        results = self._run([("step", actions[i]) for i in range(self.num_envs)])
        trans, episodes = [], []
        for i, (status, out) in enumerate(results):
            if status == "ok":
                t = out
            elif self._needs_reset[i]:  # it failed while resetting: no episode to end
                self._warn(f"env {i} failed to reset; restarting it:\n{out}")
                self._restart(i)
                t = self._reset_one(i)
            else:
                self._warn(f"env {i} raised during its episode; ending the episode and "
                           f"restarting the worker:\n{out}")
                self._restart(i)
                t = (self._last_obs[i], 0.0, False, True, False, {"error": str(out)})
            ep = self._account(i, t)
            if ep is not None:
                episodes.append(ep)
            trans.append(t)
        return self._stack(trans), episodes

    def _account(self, i: int, t) -> EpisodeReport | None:
        obs, reward, first, last, terminal, meta = t
        self._last_obs[i] = obs
        if first:
            self._ret[i], self._len[i] = 0.0, 0
            self._ctx_id[i] = meta.get("context_id")
            self._ctx_val[i] = meta.get("context", {})
        else:
            self._ret[i] += reward
            self._len[i] += 1
        unstable = bool(meta.get("unstable", False))
        if unstable and self.parallel:  # the env warned in its own process
            log.warning("env %d: physics unstable under context %s; episode truncated",
                        i, self._ctx_val[i])
        self._needs_reset[i] = last
        if not last:
            return None
        return EpisodeReport(env_index=i, episode_return=float(self._ret[i]),
                             length=int(self._len[i]), context_id=self._ctx_id[i],
                             context=dict(self._ctx_val[i]), truncated=not terminal,
                             unstable=unstable, error=meta.get("error"))

    def _stack(self, trans) -> dict[str, np.ndarray]:
        keys = trans[0][0].keys()
        batch = {k: np.stack([np.asarray(t[0][k]) for t in trans]) for k in keys}
        batch["reward"] = np.array([t[1] for t in trans], np.float32)
        for j, name in enumerate(_FLAGS):
            batch[name] = np.array([t[2 + j] for t in trans], bool)
        return batch

    def call(self, i: int, name: str, *args, **kwargs):
        """Calls method ``name`` of env i (e.g. "render") and returns its result."""
        if not self.parallel:
            return getattr(self._runners[i].env, name)(*args, **kwargs)
        if not self._send(i, ("call", (name, args, kwargs))):
            raise RuntimeError(f"worker {i} pipe closed")
        status, out = self._recv(i)
        if status != "ok":
            raise RuntimeError(f"env {i}.{name} failed:\n{out}")
        return out

    def close(self) -> None:
        """Closes every env and ends the workers."""
        if self._closed:
            return
        self._closed = True
        if not self.parallel:
            for r in self._runners:
                try:
                    r.close()
                except Exception:  # noqa: BLE001
                    pass
            return
        for i in range(self.num_envs):
            if self._send(i, ("close", None)):
                try:
                    if self._conns[i].poll(5):
                        self._conns[i].recv()
                except (EOFError, OSError):
                    pass
        for i in range(self.num_envs):
            proc = self._procs[i]
            if proc is not None:
                proc.join(5)
            self._kill(i)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
