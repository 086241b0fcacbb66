"""Atomic, verified checkpoints of pytrees (orbax for device arrays, npz for host arrays).

Layout of ``directory``::

    ckpt_00001000/            one complete checkpoint (step 1000)
      orbax/                  non-empty jax.Array leaves (orbax PyTreeCheckpointer, flat dict)
      arrays.npz              numpy leaves (e.g. replay contents), empty arrays, PRNG key data
      meta.json               step, extra, fingerprint, leaf table, file manifest (written last)
    ckpt_00002000.partial-*/  a save in progress or interrupted by a crash: never read

A save builds everything in ``ckpt_<step>.partial-<id>/`` (orbax itself writes to
a temporary directory and renames it; ``arrays.npz`` and ``meta.json`` are written
to ``*.tmp`` and ``os.replace``d), then renames that directory to ``ckpt_<step>``
in one ``os.rename``. So a ``ckpt_<step>`` directory is either complete or was
damaged afterwards. Host numpy arrays go to ``arrays.npz`` rather than into
orbax because orbax rejects zero-size arrays and writes each array as one chunk;
npz has neither limit and carries a CRC-32 per array.

A save that fails (no space left, an unwritable directory, ...) removes its partial
directory and raises ``CheckpointSaveError`` naming the checkpoint path and the cause;
the checkpoints already there are untouched. A crash between the two renames of a
re-save of the same step leaves the old copy as ``ckpt_<step>.partial-old-*``; the
next ``Checkpointer`` on the directory renames it back.

``meta.json`` lists every file with its size (and CRC-32 for the orbax files);
``restore`` checks them, the stored leaves against the template (paths, shapes,
dtypes) and the stored config fingerprint against the current one, and raises
``CheckpointError`` naming the offending file or leaf instead of returning
anything partial. Python scalars (int, float, bool, str) are stored in
``meta.json``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
import zlib
from typing import Any, Callable, Mapping

import jax
import numpy as np

from dali_jax.config import fill_missing

__all__ = ["AS_STORED", "Checkpointer", "CheckpointError", "CheckpointSaveError",
           "config_fingerprint"]

log = logging.getLogger(__name__)

FORMAT = "dali_jax.checkpoint/1"
_FINAL = re.compile(r"^ckpt_(\d+)$")
_PARTIAL = ".partial-"
_META = "meta.json"
_NPZ = "arrays.npz"
_ORBAX = "orbax"


class _AsStored:
    def __repr__(self):
        return "AS_STORED"


AS_STORED = _AsStored()  # a template leaf: take this subtree as stored (nested dicts/lists)


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt, incomplete or incompatible with the current run."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (the message names its path and the cause); the
    checkpoints written before are left as they were."""


def config_fingerprint(config: Any) -> str:
    """sha256 of the canonical JSON of ``config`` (a mapping; other values via ``str``)."""
    import hashlib
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------ helpers
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, write) -> None:
    """Writes via ``write(fileobj)`` to ``path + '.tmp'``, fsyncs, ``os.replace``s."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"checkpoint extra: {type(x).__name__} is not JSON serialisable")


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _encode_path(path) -> list:
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.SequenceKey):
            out.append(["s", k.idx])
        elif isinstance(k, jax.tree_util.DictKey):
            if not isinstance(k.key, (str, int)):
                raise TypeError(f"checkpoint dict keys must be str or int, got {k.key!r}")
            out.append(["d", k.key])
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(["a", k.name])
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            out.append(["i", k.key])
        else:
            out.append(["d", str(k)])
    return out


def _path_name(path) -> str:
    return jax.tree_util.keystr(tuple(path)) or "<root>"


def _is_key_array(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _describe(x) -> tuple[str, tuple, str]:
    """(kind, shape, dtype) of a leaf or template leaf."""
    if isinstance(x, (bool, int, float, str)) or x is None:
        return "scalar", (), type(x).__name__
    if _is_key_array(x):
        return "key", tuple(x.shape), str(jax.random.key_impl(x))
    if isinstance(x, jax.ShapeDtypeStruct):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return "key", tuple(x.shape), "?"
        return "jax", tuple(x.shape), str(np.dtype(x.dtype))
    if isinstance(x, jax.Array):
        return "jax", tuple(x.shape), str(x.dtype)
    if isinstance(x, (np.ndarray, np.generic)):
        return "numpy", tuple(np.shape(x)), str(x.dtype)
    raise TypeError(f"unsupported checkpoint leaf type {type(x).__name__}")


def _rebuild(leaves: list[tuple[list, Any]]) -> Any:
    """Nested dicts/lists from encoded paths (used when no template is given)."""
    if len(leaves) == 1 and not leaves[0][0]:
        return leaves[0][1]
    root: Any = None
    for path, value in leaves:
        if root is None:
            root = [] if path[0][0] == "s" else {}
        node = root
        for i, (kind, key) in enumerate(path):
            last = i == len(path) - 1
            nxt = None if last else ([] if path[i + 1][0] == "s" else {})
            if isinstance(node, list):
                while len(node) <= key:
                    node.append(None)
                if last:
                    node[key] = value
                elif node[key] is None:
                    node[key] = nxt
                node = None if last else node[key]
            else:
                if last:
                    node[key] = value
                else:
                    node = node.setdefault(key, nxt)
    return root


# ---------------------------------------------------------------- checkpointer
class Checkpointer:
    """Saves and restores ``(step, tree, extra)`` under ``directory``, keeping the last ``keep``.

    Args:
      directory: checkpoint root (created if missing).
      keep: number of most recent checkpoints kept after each save.
      fingerprint: identity of the run's config: a str (e.g. ``config_fingerprint(cfg)``)
        or a JSON-able mapping (then a mismatch names the differing fields). Stored
        with every save; ``restore`` raises ``CheckpointError`` if the stored one
        differs from this one.
      fingerprint_defaults: a mapping shaped like ``fingerprint`` whose values a stored
        fingerprint takes for the fields it lacks (nested): a run checkpointed before an
        option existed resumes when the option is at its default, which by convention
        reproduces the old behaviour.
    """

    def __init__(self, directory: str, keep: int = 2, fingerprint: str | Mapping | None = None,
                 fingerprint_defaults: Mapping | None = None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = int(keep)
        jsonable = lambda x: json.loads(json.dumps(x, default=str)) if x is not None else None
        self.fingerprint = jsonable(fingerprint)
        self.fingerprint_defaults = jsonable(fingerprint_defaults)
        os.makedirs(self.directory, exist_ok=True)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._orbax = None
        self._recover_swapped()

    def _recover_swapped(self) -> None:
        """Renames back a complete checkpoint that a crash left as ``*.partial-old-*``
        (between the two renames of a re-save of its step) when its final name is free."""
        for name in sorted(os.listdir(self.directory)):
            base, sep, tag = name.partition(_PARTIAL)
            if sep and tag.startswith("old-") and _FINAL.match(base) and \
                    not os.path.exists(os.path.join(self.directory, base)):
                try:
                    os.rename(os.path.join(self.directory, name),
                              os.path.join(self.directory, base))
                    log.warning("recovered checkpoint %s left by an interrupted save",
                                os.path.join(self.directory, base))
                except OSError:
                    pass

    # ----------------------------------------------------------------- listing
    def steps(self) -> list[int]:
        """Steps of the complete (final-named) checkpoints, ascending."""
        out = []
        for name in os.listdir(self.directory):
            m = _FINAL.match(name)
            if m and os.path.isdir(os.path.join(self.directory, name)):
                out.append(int(m.group(1)))
        return sorted(out)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"ckpt_{int(step):08d}")

    def _checkpointer(self):
        if self._orbax is None:
            import orbax.checkpoint as ocp
            self._orbax = ocp.PyTreeCheckpointer()
        return self._orbax

    # ------------------------------------------------------------------ saving
    def save(self, step: int, tree: Any, extra: Mapping | None = None,
             blocking: bool = True) -> None:
        """Saves ``tree`` (pytree of jax/numpy arrays and python scalars) and ``extra`` (JSON).

        With ``blocking=False`` device arrays are copied to host first and the
        files are written in a background thread; numpy leaves are NOT copied, so
        the caller must not modify them until ``wait()`` (``Replay.state_dict``
        returns fresh copies). A previous pending save is waited for first; an
        error of a background save is raised by the next ``save``/``wait``.
        """
        self.wait()
        step = int(step)
        # Must be JSON (numpy scalars/arrays are converted); a detached copy.
        extra = json.loads(json.dumps(dict(extra or {}), default=_json_default))
        leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
        if not blocking:
            # Host copy now: later donation or mutation of device buffers cannot race.
            leaves = [(p, jax.device_get(x) if isinstance(x, jax.Array) and not _is_key_array(x)
                       else x) for p, x in leaves]
        if blocking:
            self._save(step, leaves, extra)
            return

        def run():
            try:
                self._save(step, leaves, extra)
            except BaseException as exc:  # noqa: BLE001 - re-raised in wait()
                self._error = exc
        self._thread = threading.Thread(target=run, name="checkpoint-save", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Blocks until a background save has finished; re-raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _save(self, step: int, leaves: list, extra: dict) -> None:
        final = self.path(step)
        tmp = f"{final}{_PARTIAL}{uuid.uuid4().hex[:8]}"
        try:
            self._remove_partials()
            self._write(step, final, tmp, leaves, extra)
        except Exception as exc:  # noqa: BLE001 - OSError, orbax/tensorstore errors, ...
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial save took
            try:
                latest = self.latest_step()
            except OSError:
                latest = None
            kept = (f"the latest checkpoint is still {self.path(latest)}" if latest is not None
                    else "no earlier checkpoint exists")
            raise CheckpointSaveError(f"cannot write checkpoint {final}: "
                                      f"{type(exc).__name__}: {exc}; {kept}") from exc
        for s in self.steps()[:-self.keep]:
            try:
                self._delete(self.path(s))
            except OSError as exc:  # the new checkpoint is complete: not a failed save
                log.warning("could not delete old checkpoint %s: %s", self.path(s), exc)

    def _write(self, step: int, final: str, tmp: str, leaves: list, extra: dict) -> None:
        os.makedirs(tmp)
        table, orbax_tree, npz = [], {}, {}
        for i, (path, x) in enumerate(leaves):
            kind, shape, dtype = _describe(x)
            entry = {"path": _encode_path(path), "name": _path_name(path), "kind": kind,
                     "shape": list(shape), "dtype": dtype}
            key = f"l{i:05d}"
            if kind == "scalar":
                entry.update(store="json", value=x)
            elif kind == "key":
                entry.update(store="npz", key=key)
                npz[key] = np.asarray(jax.random.key_data(x))
            elif kind == "jax" and x.size > 0:
                entry.update(store="orbax", key=key)
                orbax_tree[key] = x
            else:
                entry.update(store="npz", key=key)
                npz[key] = np.asarray(jax.device_get(x))
            table.append(entry)
        if orbax_tree:
            self._checkpointer().save(os.path.join(tmp, _ORBAX), orbax_tree)
        if npz:
            _write_atomic(os.path.join(tmp, _NPZ), lambda f: np.savez(f, **npz))
        files = {}
        for root, _, names in os.walk(tmp):
            for name in names:
                full = os.path.join(root, name)
                rel = os.path.relpath(full, tmp)
                files[rel] = {"size": os.path.getsize(full),
                              "crc32": None if rel == _NPZ else _crc32(full)}
        meta = {"format": FORMAT, "step": step, "time": time.time(),
                "fingerprint": self.fingerprint, "extra": extra, "leaves": table,
                "files": files}
        _write_atomic(os.path.join(tmp, _META),
                      lambda f: f.write(json.dumps(meta, indent=1).encode()))
        _fsync_dir(tmp)
        if os.path.exists(final):  # same step saved again: swap in the new one
            old = f"{final}{_PARTIAL}old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except OSError:
                os.rename(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.directory)

    def _delete(self, path: str) -> None:
        # Rename first so that a crash mid-delete never leaves a half final dir.
        trash = f"{path}{_PARTIAL}del-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_partials(self) -> None:
        for name in os.listdir(self.directory):
            if name.startswith("ckpt_") and _PARTIAL in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    # --------------------------------------------------------------- restoring
    def restore(self, template: Any = None, step: int | None = None, *,
                upgrade: Callable[[Any], Any] | None = None,
                partial: bool = False) -> tuple[int, Any, dict]:
        """Loads the latest (or the given) checkpoint: ``(step, tree, extra)``.

        Without ``template``: nested dicts/lists of the saved kinds. With ``template`` (a
        pytree like the saved one; leaves may be arrays or ``jax.ShapeDtypeStruct``) the
        result has the template's structure and leaf types, jax leaves placed with the
        template leaf's sharding; leaves are matched by path (dict key, index or attribute
        name), so a typed container fits the plain dicts it was saved as; ``AS_STORED`` in
        the template takes that subtree as stored (nested dicts/lists).

        ``upgrade`` maps the stored tree (nested dicts/lists) to the current layout before
        it is fitted (an older format read by newer code). ``partial=True`` lets the template
        name only part of the checkpoint: stored leaves outside it are left out, and
        top-level subtrees outside a dict template are not read at all.

        Raises ``FileNotFoundError`` when there is no checkpoint and ``CheckpointError``
        when it is unusable (naming the file or the leaf).
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        path = self.path(step)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no checkpoint {path}")
        try:
            return self._restore(path, template, upgrade, partial)
        except CheckpointError as exc:
            others = [s for s in self.steps() if s != step]
            if not others:
                raise
            raise CheckpointError(
                f"{exc} [other checkpoints in {self.directory}: steps {others}; restore one "
                f"with restore(step=...) or move {path} away]") from exc

    def _restore(self, path: str, template: Any, upgrade, partial: bool):
        meta = self._read_meta(path)
        self._verify_files(path, meta)
        self._check_fingerprint(path, meta)
        table = meta["leaves"]
        if partial and isinstance(template, Mapping):  # skip the subtrees nobody asked for
            table = [e for e in table if not e["path"] or e["path"][0][1] in template]
        values = self._load_values(path, table)
        place = template is None  # with a template, leaves are placed when fitted
        leaves = [(e["path"], self._convert(e, e["value"] if e["store"] == "json"
                                            else values[e["key"]], place)) for e in table]
        tree = _rebuild(leaves) if leaves else None
        if upgrade is not None:
            tree = upgrade(tree)
        if template is not None:
            tree = _fit(os.path.join(path, _META), tree, template, partial)
        return int(meta["step"]), tree, meta["extra"]

    def read_extra(self, step: int | None = None) -> dict:
        """``extra`` of the latest (or given) checkpoint, without loading arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._read_meta(self.path(step))["extra"]

    def _read_meta(self, path: str) -> dict:
        mpath = os.path.join(path, _META)
        if not os.path.isfile(mpath):
            raise CheckpointError(f"checkpoint {path} is incomplete: {mpath} is missing")
        try:
            with open(mpath, "rb") as f:
                meta = json.loads(f.read().decode())
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise CheckpointError(f"corrupt checkpoint metadata {mpath}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not all(
                k in meta for k in ("step", "extra", "leaves", "files")):
            raise CheckpointError(f"corrupt checkpoint metadata {mpath}: not a {FORMAT} file")
        return meta

    def _verify_files(self, path: str, meta: dict) -> None:
        for rel, info in meta["files"].items():
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                raise CheckpointError(f"corrupt checkpoint: file {full} is missing")
            size = os.path.getsize(full)
            if size != info["size"]:
                raise CheckpointError(f"corrupt checkpoint: file {full} has {size} bytes, "
                                      f"expected {info['size']} (truncated or overwritten)")
            if info.get("crc32") is not None and _crc32(full) != info["crc32"]:
                raise CheckpointError(f"corrupt checkpoint: file {full} fails its CRC-32 check")

    def _check_fingerprint(self, path: str, meta: dict) -> None:
        stored, current = meta.get("fingerprint"), self.fingerprint
        if (isinstance(stored, dict) and isinstance(current, dict)
                and isinstance(self.fingerprint_defaults, dict)):
            stored = fill_missing(stored, self.fingerprint_defaults, only=current)
        if current is None or stored == current:
            return
        where = os.path.join(path, _META)
        if isinstance(stored, dict) and isinstance(current, dict):
            diffs = [f"{k}: checkpoint {stored.get(k, '<absent>')!r} vs now "
                     f"{current.get(k, '<absent>')!r}"
                     for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
            detail = "; ".join(diffs[:10])
            if len(diffs) > 10:
                detail += f"; ... ({len(diffs)} fields)"
        else:
            detail = f"checkpoint {stored!r} vs now {current!r}"
        raise CheckpointError(
            f"incompatible checkpoint {where}: config fingerprint differs: {detail}")

    def _load_values(self, path: str, table: list) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = {}
        orbax_keys = [e["key"] for e in table if e["store"] == "orbax"]
        npz_entries = [e for e in table if e["store"] == "npz"]
        if orbax_keys:
            import orbax.checkpoint as ocp
            opath = os.path.join(path, _ORBAX)
            try:
                restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in orbax_keys}
                got = self._checkpointer().restore(
                    opath, args=ocp.args.PyTreeRestore(item={k: 0 for k in orbax_keys},
                                                       restore_args=restore_args))
            except Exception as exc:  # noqa: BLE001 - orbax/tensorstore raise many types
                raise CheckpointError(f"corrupt checkpoint: cannot read {opath}: "
                                      f"{type(exc).__name__}: {exc}") from exc
            values.update(got)
        if npz_entries:
            npath = os.path.join(path, _NPZ)
            try:
                with np.load(npath, allow_pickle=False) as z:
                    for e in npz_entries:
                        try:
                            values[e["key"]] = z[e["key"]]
                        except Exception as exc:  # noqa: BLE001
                            raise CheckpointError(
                                f"corrupt checkpoint: cannot read leaf {e['name']} ({e['key']}) "
                                f"from {npath}: {type(exc).__name__}: {exc}") from exc
            except CheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"corrupt checkpoint: cannot read {npath}: "
                                      f"{type(exc).__name__}: {exc}") from exc
        for e in table:
            if e["store"] == "json":
                continue
            v = values.get(e["key"])
            want = tuple(e["shape"]) if e["kind"] != "key" else None
            if v is None or (want is not None and tuple(v.shape) != want):
                raise CheckpointError(f"corrupt checkpoint {path}: leaf {e['name']} could not be "
                                      f"read with shape {e['shape']}")
        return values

    @staticmethod
    def _convert(entry: dict, value: Any, place: bool) -> Any:
        """A stored value as its kind: scalars as they are, keys wrapped, arrays as numpy
        (put on the default device when ``place`` and the leaf was a jax array)."""
        kind = entry["kind"]
        if kind == "scalar":
            return value
        if kind == "key":
            return jax.random.wrap_key_data(value, impl=entry["dtype"])
        value = np.asarray(value)
        return jax.device_put(value) if place and kind == "jax" else value


def _plain(path) -> tuple:
    """A key path as plain keys (dict key, index or attribute name)."""
    out = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            raise TypeError(f"unsupported key {k!r}")
    return tuple(out)


def _fit(where: str, tree: Any, template: Any, partial: bool) -> Any:
    """``tree`` (nested dicts/lists) in the structure of ``template``, leaf by leaf (shape,
    dtype and kind checked; jax leaves placed with the template leaf's sharding)."""
    t_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    wanted = {_plain(p): (_path_name(p), x) for p, x in t_leaves}
    s_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    stored = {_plain(p): x for p, x in s_leaves}
    taken = [k for k, (_, x) in wanted.items() if x is AS_STORED]  # subtrees taken as stored
    missing = [name for k, (name, x) in wanted.items()
               if x is not AS_STORED and k not in stored
               or x is AS_STORED and not any(s[:len(k)] == k for s in stored)]
    unexpected = [_path_name(p) for p, _ in s_leaves if (k := _plain(p)) not in wanted
                  and not any(k[:len(t)] == t for t in taken)]
    if missing or (unexpected and not partial):
        raise CheckpointError(
            f"incompatible checkpoint {where}: tree structure differs from the template: "
            f"leaves missing in checkpoint {missing[:10]}, "
            f"leaves not in template {[] if partial else unexpected[:10]}")
    if unexpected:
        log.info("checkpoint %s: %d stored leaves outside the template left out (%s%s)",
                 where, len(unexpected), ", ".join(unexpected[:3]),
                 " ..." if len(unexpected) > 3 else "")
    out = []
    for k, (name, want) in wanted.items():
        if want is AS_STORED:
            node = tree
            for key in k:
                node = node[key]
            out.append(node)
            continue
        value = stored[k]
        kind, shape, dtype = _describe(want)
        got_kind, got_shape, got_dtype = _describe(value)
        if (kind == "scalar") != (got_kind == "scalar") or (kind == "key") != (got_kind == "key"):
            raise CheckpointError(f"incompatible checkpoint {where}: leaf {name} is a "
                                  f"{got_kind} in the checkpoint, a {kind} in the template")
        if kind != "scalar":
            if got_shape != shape:
                raise CheckpointError(
                    f"incompatible checkpoint {where}: leaf {name} has shape {got_shape} in "
                    f"the checkpoint, {shape} in the template")
            if kind != "key" and got_dtype != dtype:
                raise CheckpointError(
                    f"incompatible checkpoint {where}: leaf {name} has dtype {got_dtype} in "
                    f"the checkpoint, {dtype} in the template")
        out.append(_place(value, want))
    return jax.tree_util.tree_unflatten(treedef, out)


def _place(value: Any, target: Any) -> Any:
    """A stored leaf as the template leaf's type: jax leaves on its sharding (or the
    default device), numpy scalars unwrapped, the rest as stored."""
    if isinstance(target, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(target, "sharding", None)
        return jax.device_put(value, sharding) if sharding is not None \
            else jax.device_put(value)
    if isinstance(target, np.generic):
        return np.asarray(value)[()]
    return value
