"""Checkpointer: save and restore, atomic commit, keep-last-N, corrupt and incompatible
checkpoints."""
import os
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dali_jax.config import fill_missing
from dali_jax.training.checkpoint import (AS_STORED, CheckpointError, Checkpointer,
                                          config_fingerprint)
from dali_jax.training.replay import Replay


def make_tree(scale=1.0):
    rng = np.random.default_rng(0)
    replay = Replay(4 * 3000, 4, {"image": ((64, 64, 3), np.uint8), "obs": ((8,), np.float32),
                                  "is_first": ((), bool)}, seq_len=16, seed=3)
    for t in range(3000):  # 4 x 3000 x 12 KiB = 147 MB of images
        replay.add({"image": np.full((4, 64, 64, 3), t % 251, np.uint8),
                    "obs": np.full((4, 8), t, np.float32), "is_first": np.full(4, t % 9 == 0)})
    replay.sample(2)
    return {
        "params": {"enc": {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32) * scale,
                           "b": jnp.zeros((7,), jnp.bfloat16)},
                   "layers": [jnp.arange(3.0) * scale, jnp.ones((2, 2), jnp.int32)]},
        "opt": {"count": jnp.asarray(7, jnp.int32), "mu": jnp.zeros((0,))},
        "rng": jax.random.key(42),
        "np_rng": np.asarray([1, 2], np.uint32),
        "counters": {"env_steps": 12345, "updates": 6172, "lr": 3e-4, "done": False},
        "replay": replay.state_dict(),
    }, replay


@pytest.fixture(scope="module")
def tree_and_replay():
    return make_tree()


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(jax.random.key_data(x), jax.random.key_data(y))
        else:
            assert np.asarray(x).dtype == np.asarray(y).dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_template_and_replay(tmp_path, tree_and_replay):
    tree, replay = tree_and_replay
    ck = Checkpointer(tmp_path / "ck", keep=2, fingerprint={"lr": 3e-4, "task": "cup"})
    assert ck.latest_step() is None
    ck.save(100, tree, extra={"wall": np.float64(12.5), "contexts": np.asarray([[1.0, 2.0]])})
    assert ck.latest_step() == 100
    step, got, extra = ck.restore(template=tree)
    assert step == 100 and extra == {"wall": 12.5, "contexts": [[1.0, 2.0]]}
    assert_trees_equal(tree, got)
    assert isinstance(got["params"]["enc"]["w"], jax.Array)
    assert isinstance(got["replay"]["data/image"], np.ndarray)
    assert isinstance(got["counters"]["env_steps"], int)
    assert jax.dtypes.issubdtype(got["rng"].dtype, jax.dtypes.prng_key)
    # The restored replay continues with the same samples.
    fresh = Replay(4 * 3000, 4, {k[5:]: (v.shape[2:], v.dtype)
                                 for k, v in tree["replay"].items() if k.startswith("data/")})
    fresh.load_state_dict(got["replay"])
    ref = Replay(4 * 3000, 4, fresh.spec)
    ref.load_state_dict(tree["replay"])
    for _ in range(2):
        a, b = ref.sample(4), fresh.sample(4)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_restore_without_template_and_shape_dtype_template(tmp_path):
    tree = {"a": {"w": jnp.ones((2, 3))}, "b": [np.arange(4), 5], "k": jax.random.key(1)}
    ck = Checkpointer(tmp_path)
    ck.save(3, tree)
    step, got, extra = ck.restore()
    assert step == 3 and extra == {}
    np.testing.assert_array_equal(got["a"]["w"], np.ones((2, 3)))
    assert isinstance(got["b"], list) and got["b"][1] == 5
    np.testing.assert_array_equal(got["b"][0], np.arange(4))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.Array) else x, tree)
    _, got2, _ = ck.restore(template=abstract)
    assert isinstance(got2["a"]["w"], jax.Array)
    np.testing.assert_array_equal(got2["a"]["w"], np.ones((2, 3)))
    assert got2["a"]["w"].sharding == tree["a"]["w"].sharding


def test_keeps_last_n_and_background_save(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for s in (10, 20, 30):
        ck.save(s, {"x": jnp.full((3,), float(s)), "n": np.arange(s)}, blocking=(s != 30))
    ck.wait()
    assert ck.steps() == [20, 30]
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000020", "ckpt_00000030"]
    step, got, _ = ck.restore()
    assert step == 30 and float(got["x"][0]) == 30.0 and got["n"].shape == (30,)
    step, got, _ = ck.restore(step=20)
    assert step == 20 and float(got["x"][1]) == 20.0
    ck.save(30, {"x": jnp.full((3,), -1.0), "n": np.arange(2)})  # same step again: replaced
    assert ck.steps() == [20, 30] and float(ck.restore()[1]["x"][0]) == -1.0


def test_crash_mid_save_leaves_latest_intact(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(1, {"x": jnp.ones(2), "big": np.ones(10)})
    import dali_jax.training.checkpoint as mod

    def crash(*a, **k):
        raise OSError("disk died")
    # Fail after orbax and npz were written but before meta.json / the final rename: an
    # error naming the checkpoint, and the partial save removed.
    monkeypatch.setattr(mod, "_crc32", crash)
    with pytest.raises(mod.CheckpointSaveError, match="ckpt_00000002.*disk died"):
        ck.save(2, {"x": jnp.zeros(2), "big": np.zeros(10)})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000001"]
    # What a killed process leaves: a partial save with its files.
    partial = tmp_path / "ckpt_00000002.partial-deadbeef"
    shutil.copytree(tmp_path / "ckpt_00000001", partial)
    # A fresh process sees step 1 only.
    ck2 = Checkpointer(tmp_path)
    assert ck2.latest_step() == 1
    step, got, _ = ck2.restore()
    assert step == 1 and float(got["x"][0]) == 1.0
    # Also an orbax temporary dir with a step-like name is never taken as a checkpoint.
    os.makedirs(tmp_path / "ckpt_00000009.orbax-checkpoint-tmp-123")
    assert ck2.latest_step() == 1
    ck2.save(3, {"x": jnp.ones(2), "big": np.ones(10)})  # cleans partial saves
    assert not any(".partial-" in n for n in os.listdir(tmp_path))


def _save_small(tmp_path, **kw):
    ck = Checkpointer(tmp_path, **kw)
    ck.save(5, {"params": {"w": jnp.arange(6.0).reshape(2, 3)},
                "replay": {"obs": np.arange(1000, dtype=np.float32)}}, extra={"a": 1})
    return ck, ck.path(5)


def _orbax_data_files(path):
    out = []
    for root, _, names in os.walk(os.path.join(path, "orbax")):
        out += [os.path.join(root, n) for n in names if "/d/" in os.path.join(root, n) + "/"]
    return [f for f in out if os.path.basename(os.path.dirname(f)) == "d"]


def test_truncated_npz_names_the_file(tmp_path):
    ck, path = _save_small(tmp_path)
    npz = os.path.join(path, "arrays.npz")
    with open(npz, "r+b") as f:
        f.truncate(os.path.getsize(npz) // 2)
    with pytest.raises(CheckpointError, match=r"arrays\.npz.*truncated"):
        ck.restore()


def test_garbage_in_npz_same_size_is_detected(tmp_path):
    ck, path = _save_small(tmp_path)
    npz = os.path.join(path, "arrays.npz")
    data = bytearray(open(npz, "rb").read())
    data[len(data) // 2] ^= 0xFF  # inside the array bytes: caught by the zip CRC
    open(npz, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"arrays\.npz"):
        ck.restore()


def test_garbage_in_orbax_file_names_the_file(tmp_path):
    ck, path = _save_small(tmp_path)
    files = _orbax_data_files(path)
    assert files
    victim = max(files, key=os.path.getsize)
    size = os.path.getsize(victim)
    open(victim, "wb").write(b"\x00garbage" * (size // 8) + b"x" * (size % 8))
    with pytest.raises(CheckpointError, match=os.path.basename(victim) + ".*CRC"):
        ck.restore()


def test_missing_file_and_missing_or_corrupt_meta(tmp_path):
    ck, path = _save_small(tmp_path)
    victim = _orbax_data_files(path)[0]
    os.remove(victim)
    with pytest.raises(CheckpointError, match=os.path.basename(victim) + " is missing"):
        ck.restore()
    meta = os.path.join(path, "meta.json")
    with open(meta, "w") as f:
        f.write('{"format": "dali_jax.checkpoint/1", "step": 5, "extr')
    with pytest.raises(CheckpointError, match="meta.json"):
        ck.restore()
    os.remove(meta)
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        ck.restore()
    # Never a silent fallback: latest_step still reports the damaged checkpoint.
    assert ck.latest_step() == 5


def test_damaged_latest_is_an_error_that_lists_older_checkpoints(tmp_path):
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(1, {"x": np.ones(3)})
    ck.save(2, {"x": np.full(3, 2.0)})
    os.remove(os.path.join(ck.path(2), "arrays.npz"))
    with pytest.raises(CheckpointError, match=r"arrays\.npz is missing.*steps \[1\]"):
        ck.restore()
    assert float(ck.restore(step=1)[1]["x"][0]) == 1.0


def test_incompatible_template_names_the_leaf(tmp_path):
    ck, _ = _save_small(tmp_path)
    good = {"params": {"w": jnp.zeros((2, 3))}, "replay": {"obs": np.zeros(1000, np.float32)}}
    ck.restore(template=good)
    bad_shape = {"params": {"w": jnp.zeros((3, 3))}, "replay": {"obs": np.zeros(1000, np.float32)}}
    with pytest.raises(CheckpointError, match=r"\['params'\]\['w'\] has shape \(2, 3\).*\(3, 3\)"):
        ck.restore(template=bad_shape)
    bad_dtype = {"params": {"w": jnp.zeros((2, 3))}, "replay": {"obs": np.zeros(1000, np.int32)}}
    with pytest.raises(CheckpointError, match=r"\['replay'\]\['obs'\] has dtype float32.*int32"):
        ck.restore(template=bad_dtype)
    bad_tree = {"params": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)},
                "replay": {"obs": np.zeros(1000, np.float32)}}
    with pytest.raises(CheckpointError, match=r"missing in checkpoint \[\"\['params'\]\['b'\]\"\]"):
        ck.restore(template=bad_tree)


class _State(NamedTuple):
    params: dict
    step: jax.ShapeDtypeStruct


def test_partial_template_typed_container_as_stored_and_upgrade(tmp_path, monkeypatch):
    """A typed template fits the plain dicts it was saved as; AS_STORED takes a subtree as
    stored; partial drops stored leaves the template lacks and does not read top-level
    subtrees outside it; upgrade maps the stored layout first."""
    ck = Checkpointer(tmp_path)
    w = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    ck.save(1, {"agent": {"params": {"w": w, "old": np.ones(4, np.float32)},
                          "step": np.int32(7)},
                "replay": {"obs": np.arange(10, dtype=np.float32)}, "rng": np.uint32([1, 2])})
    agent = _State(params={"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)},
                   step=jax.ShapeDtypeStruct((), jnp.int32))
    with pytest.raises(CheckpointError, match=r"leaves not in template \[\"\['agent'\]\['par"):
        ck.restore({"agent": agent, "replay": AS_STORED, "rng": AS_STORED})
    _, got, _ = ck.restore({"agent": agent, "replay": AS_STORED, "rng": AS_STORED},
                           partial=True)
    assert isinstance(got["agent"], _State) and isinstance(got["agent"].params["w"], jax.Array)
    np.testing.assert_array_equal(got["agent"].params["w"], w)
    assert int(got["agent"].step) == 7
    assert list(got["replay"]) == ["obs"] and isinstance(got["replay"]["obs"], np.ndarray)
    np.testing.assert_array_equal(got["replay"]["obs"], np.arange(10))
    np.testing.assert_array_equal(got["rng"], [1, 2])
    read = []
    load = Checkpointer._load_values
    monkeypatch.setattr(Checkpointer, "_load_values",
                        lambda self, path, table: read.extend(e["name"] for e in table)
                        or load(self, path, table))
    _, got, _ = ck.restore({"agent": agent}, partial=True)
    assert set(got) == {"agent"} and not any("replay" in n or "rng" in n for n in read)
    with pytest.raises(CheckpointError, match=r"missing in checkpoint \[\"\['replay2'\]\"\]"):
        ck.restore({"agent": agent, "replay2": AS_STORED}, partial=True)

    def rename(tree):
        tree["agent"]["params"]["v"] = tree["agent"]["params"].pop("w") * 2
        return tree
    template = {"agent": _State(params={"v": agent.params["w"]}, step=agent.step)}
    _, got, _ = ck.restore(template, upgrade=rename, partial=True)
    np.testing.assert_array_equal(got["agent"].params["v"], 2 * w)


def test_fingerprint_mismatch(tmp_path):
    _save_small(tmp_path, fingerprint={"seed": 1, "task": "cup"})
    with pytest.raises(CheckpointError, match=r"meta\.json.*seed: checkpoint 1 vs now 2"):
        Checkpointer(tmp_path, fingerprint={"seed": 2, "task": "cup"}).restore()
    Checkpointer(tmp_path, fingerprint={"seed": 1, "task": "cup"}).restore()
    sub = tmp_path / "s"
    _save_small(sub, fingerprint=config_fingerprint({"a": 1}))
    with pytest.raises(CheckpointError, match="fingerprint differs"):
        Checkpointer(sub, fingerprint=config_fingerprint({"a": 2})).restore()
    assert config_fingerprint({"a": 1, "b": 2}) == config_fingerprint({"b": 2, "a": 1})


def test_a_field_added_after_the_checkpoint_takes_its_default(tmp_path):
    """A checkpoint written before an option existed (its nested fingerprint lacks the
    field) restores while the option is at its default, and not when it is changed."""
    _save_small(tmp_path, fingerprint={"task": "cup", "model": {"size": "tiny"}})
    defaults = {"model": {"size": "small", "new_option": True}, "context": {"k": 64}}
    now = {"task": "cup", "model": {"size": "tiny", "new_option": True}}
    Checkpointer(tmp_path, fingerprint=now, fingerprint_defaults=defaults).restore()
    with pytest.raises(CheckpointError, match="fingerprint differs"):  # no defaults given
        Checkpointer(tmp_path, fingerprint=now).restore()
    changed = {"task": "cup", "model": {"size": "tiny", "new_option": False}}
    with pytest.raises(CheckpointError, match="fingerprint differs: model"):
        Checkpointer(tmp_path, fingerprint=changed, fingerprint_defaults=defaults).restore()
    with pytest.raises(CheckpointError, match="fingerprint differs: context"):  # a new group
        Checkpointer(tmp_path, fingerprint=dict(now, context={"k": 32}),
                     fingerprint_defaults=defaults).restore()


def test_options_not_adopted_in_a_checkpoint_fingerprint(tmp_path):
    """A fingerprint holding options measured and not adopted (config.NOT_ADOPTED) restores
    while they are at the value that runs today's behaviour, and not otherwise."""
    defaults = {"model": {"size": "small"}, "context": {"k": 64}}
    now = {"task": "cup", "model": {"size": "tiny"}, "context": {"k": 64}}
    old = {"task": "cup", "model": {"size": "tiny", "unroll": 4},
           "context": {"k": 64, "deep_lag": 0, "pairs": "window"}}
    _save_small(tmp_path, fingerprint=old)
    Checkpointer(tmp_path, fingerprint=now, fingerprint_defaults=defaults).restore()
    _save_small(tmp_path / "lag", fingerprint=dict(old, context={"k": 64, "deep_lag": 4}))
    with pytest.raises(CheckpointError, match="fingerprint differs: context"):
        Checkpointer(tmp_path / "lag", fingerprint=now, fingerprint_defaults=defaults).restore()


def test_fill_missing_takes_defaults_for_absent_fields_only():
    """The one helper behind load_config, the fingerprint check and the study's
    config_conflict: a saved config's absent fields take their defaults."""
    saved = {"task": "cup", "model": {"size": "tiny"}, "gone": 1}
    defaults = {"task": "walker", "model": {"size": "small", "new": True},
                "context": {"k": 64}}
    assert fill_missing(saved, defaults) == {
        "task": "cup", "model": {"size": "tiny", "new": True}, "gone": 1, "context": {"k": 64}}
    only = {"task": "x", "model": {"size": "x", "new": "x"}}  # the compared part: no context
    assert fill_missing(saved, defaults, only=only) == {
        "task": "cup", "model": {"size": "tiny", "new": True}, "gone": 1}
    assert saved == {"task": "cup", "model": {"size": "tiny"}, "gone": 1}  # not modified


def test_fill_missing_gives_configs_older_than_a_changed_default_its_legacy_value():
    """context.inverse_weight defaults to 30; configs written before the field existed ran
    with 1 (config.LEGACY), and those written before context.alignment set the alignment
    fields one by one ("custom"); those that store a field keep theirs."""
    from dali_jax.config import LEGACY, get_config
    defaults = get_config().to_dict()
    assert defaults["context"]["inverse_weight"] == 30.0 != LEGACY["context"]["inverse_weight"]
    old = {"context": {"loss": "both"}}
    assert fill_missing(old, defaults)["context"]["inverse_weight"] == 1.0
    assert fill_missing(old, defaults)["context"]["alignment"] == "custom"
    assert fill_missing({"context": {"inverse_weight": 7.0}}, defaults)["context"] == dict(
        defaults["context"], inverse_weight=7.0, alignment="custom")
    assert fill_missing({}, {"context": {"k": 1}}) == {"context": {"k": 1}}  # no field added
    assert fill_missing({}, {"context": 3}) == {"context": 3}  # nor a leaf replaced


def test_no_checkpoint_and_bad_extra(tmp_path):
    ck = Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError):
        ck.restore()
    with pytest.raises(TypeError):
        ck.save(1, {"x": np.ones(2)}, extra={"bad": object()})
    assert ck.latest_step() is None


def _to_legacy(node):
    """The agent state as written before the posterior split: obs_out = {kernel
    [W_h; W_e], norm} in every RSSM dict (params and optimiser moments)."""
    if isinstance(node, dict):
        node = {k: _to_legacy(v) for k, v in node.items()}
        if "obs_h" in node:
            node["obs_out"] = dict(kernel=np.concatenate([node.pop("obs_h")["kernel"],
                                                          node.pop("obs_e")["kernel"]], 0),
                                   norm=node.pop("obs_norm"))
        return node
    if isinstance(node, (list, tuple)):
        return [_to_legacy(v) for v in node]
    return np.asarray(node) if hasattr(node, "shape") else node


def test_checkpoints_of_the_one_layer_posterior_still_load(agent_cache, tmp_path):
    """A checkpoint written before the posterior layer was split (obs_out) restores into the
    split layout with the same numbers, optimiser moments included."""
    from dali_jax.training.resume import restore_checkpoint
    agent = agent_cache("dali_d")
    state = agent.init(jax.random.PRNGKey(0))
    state = jax.tree_util.tree_map(lambda x: x + 0.5 if x.dtype == np.float32 else x, state)
    ck = Checkpointer(str(tmp_path))
    ck.save(1, dict(agent=state), {})
    ck.wait()
    _, tree, _ = ck.restore()  # nested dicts and lists, as the trainer reads them
    tree = _to_legacy(tree)
    assert "obs_out" in tree["agent"]["params"]["rssm"]
    assert str(tree).count("'obs_out'") >= 3  # params and Adam's two moments
    ck.save(2, tree, {})  # as the trainer of that time wrote it
    _, got, _ = restore_checkpoint(ck, agent, replay=False)
    got = got["agent"]
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
