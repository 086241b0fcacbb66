"""Checkpoints on orbax's `CheckpointManager`, with what it lacks: file checksums, a config
fingerprint, zero-size arrays, and errors that name the file or the leaf.

Layout of ``directory``::

    ckpt_00001000/              one committed checkpoint (step 1000), orbax's atomic commit
      <item>/                   one orbax PyTree item per top-level key of the saved tree
      meta/                     JSON: extra, fingerprint, the zero-size leaves' shapes
      files.json                size and CRC-32 of every file above (written after the commit)
    ckpt_00002000.orbax-checkpoint-tmp-*/   a save in progress or killed: never read

orbax writes a save into a temporary directory and renames it when complete, so a kill at
any moment leaves the committed checkpoints as they were; its temporary directories are
removed when the next `Checkpointer` opens the directory. A save may write in the
background (``blocking=False``): the caller goes on once the arrays are on the host.

orbax stores no checksums: ``files.json`` lets ``restore`` tell a truncated, overwritten or
missing file by name (zstd-compressed data catches most damage, not all). A checkpoint
committed without ``files.json`` (a kill in the instant between the two) restores
unverified, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from typing import Any, Mapping

import jax
import numpy as np

from dali_jax.config import differences

__all__ = ["Checkpointer", "CheckpointError", "CheckpointSaveError", "config_fingerprint"]

log = logging.getLogger(__name__)

_PREFIX, _DIGITS = "ckpt", 8
_META, _FILES = "meta", "files.json"
_TMP = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt, incomplete or incompatible with the current run."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (the message names its path and the cause); the
    checkpoints written before are left as they were."""


def config_fingerprint(config: Any) -> str:
    """sha256 of the canonical JSON of ``config`` (a mapping; other values via ``str``)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _plain(path) -> tuple:
    """A key path as plain keys: a dict key, an index or an attribute name."""
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def _name(path) -> str:
    return "".join(f"[{k!r}]" for k in path) or "<root>"


def _json_default(x):
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"checkpoint extra: {type(x).__name__} is not JSON serialisable")


class Checkpointer:
    """Saves and restores ``(step, tree, extra)`` under ``directory``, keeping the last ``keep``.

    ``tree`` is a dict of items (e.g. agent state, replay, rng), each a dict, list or tuple
    of jax or numpy arrays (nested); ``extra`` is JSON. ``fingerprint`` (a str or a JSON-able
    mapping) is stored with every save, and ``restore`` raises ``CheckpointError`` naming
    the differing fields when the stored one differs.
    """

    def __init__(self, directory: str, keep: int = 2, fingerprint: str | Mapping | None = None):
        import orbax.checkpoint as ocp

        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = int(keep)
        self.fingerprint = None if fingerprint is None else json.loads(
            json.dumps(fingerprint, default=str))
        os.makedirs(self.directory, exist_ok=True)
        self._ocp = ocp
        self._mgr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, step_prefix=_PREFIX, step_format_fixed_length=_DIGITS,
            enable_async_checkpointing=True, cleanup_tmp_directories=True))
        self._pending: int | None = None  # a step whose write may be in flight

    # ----------------------------------------------------------------- listing
    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        if self._pending is None:  # (another process may have written; not while writing)
            self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"{_PREFIX}_{int(step):0{_DIGITS}d}")

    # ------------------------------------------------------------------ saving
    def save(self, step: int, tree: Mapping[str, Any], extra: Mapping | None = None,
             blocking: bool = True) -> None:
        """Writes ``tree`` and ``extra`` as checkpoint ``step``; a step already saved is kept
        as it is. ``blocking=False`` returns once the arrays are on the host and writes in the
        background (the arrays must not change until ``wait``). Raises ``CheckpointSaveError``
        when the write fails (the partial save removed, the earlier checkpoints untouched);
        the error of a background write is raised by the next ``save``, ``wait`` or
        ``restore``."""
        self.wait()
        step = int(step)
        extra = json.loads(json.dumps(dict(extra or {}), default=_json_default))
        if step in self.steps():
            log.info("checkpoint %s exists; not saved again", self.path(step))
            return
        items, empty = {}, {}
        for key, item in tree.items():
            if key in (_META, _FILES):
                raise ValueError(f"checkpoint item name {key!r} is reserved")
            if not isinstance(item, (dict, list, tuple)) or not item:
                raise ValueError(f"checkpoint item {key!r} must be a non-empty dict, list or "
                                 f"tuple of arrays; got {type(item).__name__}")
            items[key], empty[key] = _without_empty(jax.device_get(item))
        meta = dict(step=step, extra=extra, fingerprint=self.fingerprint, empty=empty)
        try:
            self._orbax_save(step, items, meta)
        except Exception as exc:  # noqa: BLE001 - OSError, orbax and tensorstore errors
            self._failed(step, exc)
        self._pending = step
        if blocking:
            self.wait()

    def wait(self) -> None:
        """Blocks until a background write has finished and its file list is written; raises
        ``CheckpointSaveError`` when it failed."""
        step, self._pending = self._pending, None
        if step is None:
            return
        try:
            self._mgr.wait_until_finished()
            self._write_files(self.path(step))
        except Exception as exc:  # noqa: BLE001
            self._failed(step, exc)

    def _failed(self, step: int, exc: BaseException):
        final = self.path(step)
        for name in os.listdir(self.directory):
            if name.startswith(os.path.basename(final) + _TMP):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        if os.path.isdir(final):  # committed but not listed in files.json
            shutil.rmtree(final, ignore_errors=True)
        latest = self.latest_step()
        kept = (f"the latest checkpoint is still {self.path(latest)}" if latest is not None
                else "no earlier checkpoint exists")
        raise CheckpointSaveError(f"cannot write checkpoint {final}: "
                                  f"{type(exc).__name__}: {exc}; {kept}") from exc

    def _orbax_save(self, step: int, items: dict, meta: dict) -> None:
        args = {k: self._ocp.args.StandardSave(v) for k, v in items.items()}
        self._mgr.save(step, args=self._ocp.args.Composite(
            **args, **{_META: self._ocp.args.JsonSave(meta)}))

    def _write_files(self, path: str) -> None:
        files = {}
        for root, _, names in os.walk(path):
            for name in names:
                full = os.path.join(root, name)
                files[os.path.relpath(full, path)] = [os.path.getsize(full), _crc32(full)]
        tmp = os.path.join(path, _FILES + ".tmp")
        with open(tmp, "w") as f:
            json.dump(files, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, _FILES))

    # --------------------------------------------------------------- restoring
    def restore(self, template: Mapping[str, Any] | None = None, step: int | None = None
                ) -> tuple[int, dict, dict]:
        """Loads the latest (or the given) checkpoint: ``(step, tree, extra)``.

        ``template``: None reads every item as stored (nested dicts/lists of numpy arrays);
        else a dict naming the items to read, each None (as stored) or a pytree like the
        saved one (leaves arrays or ``jax.ShapeDtypeStruct``): the result has its structure,
        leaf by leaf checked for shape and dtype, jax leaves placed with the template leaf's
        sharding. Raises ``FileNotFoundError`` when there is no checkpoint and
        ``CheckpointError`` naming the file or the leaf when it is unusable.
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
            return self._restore(step, path, template)
        except CheckpointError as exc:
            others = [s for s in self.steps() if s != step]
            if not others:
                raise
            raise CheckpointError(
                f"{exc} [other checkpoints in {self.directory}: steps {others}; restore one "
                f"with restore(step=...) or move {path} away]") from exc

    def read_extra(self, step: int | None = None) -> dict:
        """``extra`` of the latest (or given) checkpoint, without loading arrays."""
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._meta(step, self.path(step))["extra"]

    def _restore(self, step: int, path: str, template):
        self._verify_files(path)
        meta = self._meta(step, path)
        self._check_fingerprint(path, meta)
        items = list(meta["empty"])
        names = items if template is None else list(template)
        missing = [n for n in names if n not in items]
        if missing:
            raise CheckpointError(f"incompatible checkpoint {path}: no item {missing} "
                                  f"(it holds {items})")
        ocp = self._ocp
        want = {n: None if template is None else template[n] for n in names}
        args = {}
        for n, t in want.items():
            if t is None:
                args[n] = ocp.args.StandardRestore()
            else:
                where = os.path.join(path, n)
                try:
                    shapes = ocp.StandardCheckpointer().metadata(where)
                    shapes = getattr(shapes, "item_metadata", shapes)  # orbax >= 0.12: a step's
                    shapes = getattr(shapes, "tree", shapes)
                except Exception as exc:  # noqa: BLE001
                    raise CheckpointError(f"corrupt checkpoint {where}: {type(exc).__name__}: "
                                          f"{exc}") from exc
                _check_leaves(where, shapes, t)
                args[n] = ocp.args.StandardRestore(_abstract(t))
        try:
            got = self._mgr.restore(step, args=ocp.args.Composite(**args))
        except Exception as exc:  # noqa: BLE001 - orbax/tensorstore raise many types
            raise CheckpointError(f"corrupt checkpoint {path}: {type(exc).__name__}: "
                                  f"{exc}") from exc
        tree = {n: _with_empty(got[n], meta["empty"][n], want[n]) for n in names}
        return step, tree, meta["extra"]

    def _meta(self, step: int, path: str) -> dict:
        where = os.path.join(path, _META)
        if not os.path.isdir(where):
            old = os.path.isfile(os.path.join(path, "meta.json"))
            raise CheckpointError(
                f"checkpoint {path} has no {_META}/ item"
                + (": it is in the format of dali_jax's earlier checkpointer (meta.json, "
                   "arrays.npz), which this version does not read" if old else ""))
        try:
            got = self._mgr.restore(step, args=self._ocp.args.Composite(
                **{_META: self._ocp.args.JsonRestore()}))[_META]
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"corrupt checkpoint metadata {where}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(got, dict) or not {"extra", "empty"} <= set(got):
            raise CheckpointError(f"corrupt checkpoint metadata {where}")
        return got

    def _verify_files(self, path: str) -> None:
        listing = os.path.join(path, _FILES)
        if not os.path.isfile(listing):
            log.warning("checkpoint %s has no %s (its save was stopped right after the commit):"
                        " restored unverified", path, _FILES)
            return
        try:
            with open(listing) as f:
                files = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"corrupt checkpoint file list {listing}: {exc}") from exc
        for rel, (size, crc) in files.items():
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                raise CheckpointError(f"corrupt checkpoint: file {full} is missing")
            if os.path.getsize(full) != size:
                raise CheckpointError(f"corrupt checkpoint: file {full} has "
                                      f"{os.path.getsize(full)} bytes, expected {size} "
                                      f"(truncated or overwritten)")
            if _crc32(full) != crc:
                raise CheckpointError(f"corrupt checkpoint: file {full} fails its CRC-32 check")

    def _check_fingerprint(self, path: str, meta: dict) -> None:
        stored, current = meta.get("fingerprint"), self.fingerprint
        if current is None or stored == current:
            return
        if isinstance(stored, dict) and isinstance(current, dict):
            detail = differences(stored, current, ("checkpoint", "config"), limit=10)
        else:
            detail = f"checkpoint {stored!r} vs now {current!r}"
        raise CheckpointError(f"incompatible checkpoint {os.path.join(path, _META)}: config "
                              f"fingerprint differs: {detail}")


# ---------------------------------------------------------------- leaves
def _without_empty(tree):
    """(tree with None for each zero-size array (orbax refuses them), [[path, shape, dtype]])."""
    empty = []

    def drop(path, x):
        if np.size(x) == 0 and hasattr(x, "shape"):
            empty.append([list(_plain(path)), list(x.shape), str(x.dtype)])
            return None
        return x
    return jax.tree_util.tree_map_with_path(drop, tree), empty


def _with_empty(tree, empty: list, template):
    """The restored item with its zero-size arrays back (as the template's leaves or numpy)."""
    if template is not None:
        return jax.tree_util.tree_map(
            lambda got, t: _zeros_like(t) if np.size(t) == 0 and got is None else got,
            tree, template, is_leaf=lambda x: x is None)
    for path, shape, dtype in empty:
        node = tree
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = np.zeros(shape, dtype)
    return tree


def _zeros_like(t):
    z = np.zeros(t.shape, t.dtype)
    return jax.device_put(z) if isinstance(t, (jax.Array, jax.ShapeDtypeStruct)) else z


def _abstract(template):
    """What orbax restores into: jax leaves as ShapeDtypeStruct with a sharding, numpy leaves
    as numpy, zero-size leaves as None (they are not stored)."""
    device = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices()[:1], ("d",)),
                                        jax.sharding.PartitionSpec())

    def one(x):
        if np.size(x) == 0:
            return None
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
            return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=getattr(x, "sharding", None) or device)
        return np.zeros(np.shape(x), np.asarray(x).dtype)
    return jax.tree_util.tree_map(one, template)


def _check_leaves(where: str, stored, template) -> None:
    """CheckpointError naming the leaves whose path, shape or dtype differs."""
    s = {_plain(p): x for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
    t = {_plain(p): x for p, x in jax.tree_util.tree_flatten_with_path(template)[0]
         if np.size(x) > 0}
    missing, extra = [_name(k) for k in t if k not in s], [_name(k) for k in s if k not in t]
    if missing or extra:
        raise CheckpointError(f"incompatible checkpoint {where}: tree structure differs from "
                              f"the template: leaves missing in checkpoint {missing[:10]}, "
                              f"leaves not in template {extra[:10]}")
    for k, x in t.items():
        got = s[k]
        if tuple(got.shape) != tuple(x.shape):
            raise CheckpointError(f"incompatible checkpoint {where}: leaf {_name(k)} has shape "
                                  f"{tuple(got.shape)} in the checkpoint, {tuple(x.shape)} in "
                                  f"the template")
        if np.dtype(got.dtype) != np.dtype(x.dtype):
            raise CheckpointError(f"incompatible checkpoint {where}: leaf {_name(k)} has dtype "
                                  f"{np.dtype(got.dtype)} in the checkpoint, "
                                  f"{np.dtype(x.dtype)} in the template")
