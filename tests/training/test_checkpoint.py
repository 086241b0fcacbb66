"""Checkpointer: save and restore, keep-last-N, killed and failed saves, corrupt and
incompatible checkpoints."""
import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dali_jax.training.checkpoint import (CheckpointError, Checkpointer, CheckpointSaveError,
                                          config_fingerprint)
from dali_jax.training.replay import Replay


def make_tree():
    rng = np.random.default_rng(0)
    replay = Replay(4 * 3000, 4, {"image": ((64, 64, 3), np.uint8), "obs": ((8,), np.float32),
                                  "is_first": ((), bool)}, seq_len=16, seed=3)
    for t in range(3000):  # 4 x 3000 x 12 KiB = 147 MB of images
        replay.add({"image": np.full((4, 64, 64, 3), t % 251, np.uint8),
                    "obs": np.full((4, 8), t, np.float32), "is_first": np.full(4, t % 9 == 0)})
    replay.sample(2)
    params = {"enc": {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
                      "b": jnp.zeros((7,), jnp.bfloat16), "none": jnp.zeros((0, 3))},
              "layers": [jnp.arange(3.0), jnp.ones((2, 2), jnp.int32)]}
    agent = {"params": params, "opt": optax.adam(1e-3).init(params),
             "step": jnp.asarray(7, jnp.int32)}
    return {"agent": agent, "replay": replay.state_dict(),
            "rng": {"key": np.asarray(jax.random.key_data(jax.random.key(42)))}}, replay


@pytest.fixture(scope="module")
def tree_and_replay():
    return make_tree()


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_round_trip_with_template_and_replay(tmp_path, tree_and_replay):
    tree, replay = tree_and_replay
    ck = Checkpointer(tmp_path / "ck", keep=2, fingerprint={"lr": 3e-4, "task": "cup"})
    assert ck.latest_step() is None
    ck.save(100, tree, extra={"wall": np.float64(12.5), "contexts": np.asarray([[1.0, 2.0]])})
    assert ck.latest_step() == 100 and os.path.isdir(ck.path(100))
    assert ck.read_extra() == {"wall": 12.5, "contexts": [[1.0, 2.0]]}
    step, got, extra = ck.restore(dict(agent=abstract(tree["agent"]), replay=None, rng=None))
    assert step == 100 and extra == {"wall": 12.5, "contexts": [[1.0, 2.0]]}
    assert_trees_equal(tree, got)  # optax's namedtuples and the zero-size leaf included
    assert isinstance(got["agent"]["params"]["enc"]["w"], jax.Array)
    assert isinstance(got["replay"]["data/image"], np.ndarray)
    # The restored replay continues with the same samples.
    fresh = Replay(4 * 3000, 4, replay.spec)
    fresh.load_state_dict(got["replay"])
    ref = Replay(4 * 3000, 4, replay.spec)
    ref.load_state_dict(tree["replay"])
    for _ in range(2):
        a, b = ref.sample(4), fresh.sample(4)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # As stored: nested dicts and lists of numpy arrays, the zero-size leaf back in place.
    _, stored, _ = ck.restore()
    assert set(stored) == {"agent", "replay", "rng"}
    assert stored["agent"]["params"]["enc"]["none"].shape == (0, 3)
    np.testing.assert_array_equal(stored["agent"]["opt"][0]["mu"]["enc"]["w"], 0.0)
    # Only the items asked for are read.
    _, only, _ = ck.restore({"rng": None})
    assert set(only) == {"rng"}


def test_keeps_last_n_and_a_step_saved_twice_is_kept(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for s in (10, 20, 30):
        ck.save(s, {"x": {"v": jnp.full((3,), float(s)), "n": np.arange(s)}})
    assert ck.steps() == [20, 30]
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000020", "ckpt_00000030"]
    step, got, _ = ck.restore()
    assert step == 30 and float(got["x"]["v"][0]) == 30.0 and got["x"]["n"].shape == (30,)
    step, got, _ = ck.restore(step=20)
    assert step == 20 and float(got["x"]["v"][1]) == 20.0
    ck.save(30, {"x": {"v": jnp.full((3,), -1.0), "n": np.arange(2)}})
    assert ck.steps() == [20, 30] and float(ck.restore()[1]["x"]["v"][0]) == 30.0
    assert Checkpointer(tmp_path).steps() == [20, 30]  # a fresh process sees the same


def _save_small(tmp_path, **kw):
    ck = Checkpointer(tmp_path, **kw)
    ck.save(5, {"params": {"w": jnp.arange(6.0).reshape(2, 3)},
                "replay": {"obs": np.arange(1000, dtype=np.float32)}}, extra={"a": 1})
    return ck, ck.path(5)


def _data_files(path, item="replay"):
    return sorted(glob.glob(os.path.join(path, item, "**", "d", "*"), recursive=True),
                  key=os.path.getsize)


def test_a_killed_save_is_never_read_and_is_cleaned_up(tmp_path):
    ck, path = _save_small(tmp_path)
    # What a process killed mid-save leaves: orbax's temporary directory with some files.
    tmp = tmp_path / "ckpt_00000009.orbax-checkpoint-tmp-1234"
    shutil.copytree(path, tmp)
    ck2 = Checkpointer(tmp_path)
    assert ck2.latest_step() == 5 and ck2.restore()[0] == 5
    assert not tmp.exists()  # opening the directory removed it


def test_failed_save_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    ck, path = _save_small(tmp_path)
    real = Checkpointer._orbax_save

    def disk_full(self, step, items, meta):  # a partial write, then the disk is full
        tmp = os.path.join(self.directory, f"ckpt_{step:08d}.orbax-checkpoint-tmp-99")
        os.makedirs(tmp)
        open(os.path.join(tmp, "part"), "wb").write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

    def no_file_list(path):  # the data is committed, the file list cannot be written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    for patch in ((Checkpointer, "_orbax_save", disk_full), (ck, "_write_files", no_file_list)):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            with pytest.raises(CheckpointSaveError) as info:
                ck.save(6, {"params": {"w": jnp.zeros((2, 3))}})
        msg = str(info.value)
        assert ck.path(6) in msg and path in msg and "No space left" in msg
        assert os.listdir(tmp_path) == ["ckpt_00000005"]  # the partial save is removed
        step, got, _ = Checkpointer(tmp_path).restore()
        assert step == 5 and float(got["params"]["w"][0, 1]) == 1.0
    assert Checkpointer._orbax_save is real
    ck.save(6, {"params": {"w": jnp.zeros((2, 3))}})  # the disk has space again
    assert ck.steps() == [5, 6]


def test_background_save_and_its_error_raised_by_the_next_call(tmp_path, monkeypatch):
    import errno
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(1, {"x": {"v": np.ones(1000)}}, blocking=False)
    assert ck.restore()[0] == 1  # restore waits for the write
    assert os.path.isfile(os.path.join(ck.path(1), "files.json"))
    ck.save(2, {"x": {"v": np.full(1000, 2.0)}}, blocking=False)
    real = ck._mgr.wait_until_finished

    def disk_full():  # the background write fails (after its files were renamed in place)
        real()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), ck.path(2))
    monkeypatch.setattr(ck._mgr, "wait_until_finished", disk_full)
    with pytest.raises(CheckpointSaveError, match=r"ckpt_00000002.*No space left.*ckpt_00000001"):
        ck.save(3, {"x": {"v": np.full(1000, 3.0)}})
    monkeypatch.undo()
    assert ck.steps() == [1] and sorted(os.listdir(tmp_path)) == ["ckpt_00000001"]
    ck.save(3, {"x": {"v": np.full(1000, 3.0)}}, blocking=False)
    ck.wait()
    assert ck.steps() == [1, 3] and float(ck.restore()[1]["x"]["v"][0]) == 3.0


def test_truncated_file_names_the_file(tmp_path):
    ck, path = _save_small(tmp_path)
    victim = _data_files(path)[-1]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(CheckpointError, match=os.path.basename(victim) + ".*truncated"):
        ck.restore()


def test_one_flipped_bit_names_the_file(tmp_path):
    ck, path = _save_small(tmp_path)
    victim = _data_files(path)[-1]
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(victim, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=os.path.basename(victim) + ".*CRC-32"):
        ck.restore()


def test_missing_file_and_missing_or_corrupt_metadata(tmp_path):
    ck, path = _save_small(tmp_path)
    shutil.copytree(path, tmp_path / "copy")
    victim = _data_files(path, "params")[0]
    os.remove(victim)
    with pytest.raises(CheckpointError, match=os.path.basename(victim) + " is missing"):
        ck.restore()
    shutil.rmtree(path)
    shutil.copytree(tmp_path / "copy", path)
    listing = os.path.join(path, "files.json")
    open(listing, "w").write('{"meta/metadata": [1')
    with pytest.raises(CheckpointError, match="files.json"):
        ck.restore()
    os.remove(listing)  # a save stopped between orbax's commit and the file list
    assert ck.restore()[0] == 5
    open(os.path.join(path, "meta", "metadata"), "w").write('{"extra": ')
    with pytest.raises(CheckpointError, match=r"meta"):
        ck.restore()
    # Never a silent fallback: latest_step still reports the damaged checkpoint.
    assert ck.latest_step() == 5


def test_damaged_latest_is_an_error_that_lists_older_checkpoints(tmp_path):
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(1, {"x": {"v": np.ones(300)}})
    ck.save(2, {"x": {"v": np.full(300, 2.0)}})
    victim = _data_files(ck.path(2), "x")[-1]
    open(victim, "wb").write(b"\x00garbage" * (os.path.getsize(victim) // 8 + 1))
    with pytest.raises(CheckpointError, match=r"has \d+ bytes.*steps \[1\]"):
        ck.restore()
    assert float(ck.restore(step=1)[1]["x"]["v"][0]) == 1.0


def test_incompatible_template_names_the_leaf(tmp_path):
    ck, _ = _save_small(tmp_path)
    good = {"params": {"w": jnp.zeros((2, 3))}, "replay": {"obs": np.zeros(1000, np.float32)}}
    ck.restore(good)
    bad_shape = {"params": {"w": jnp.zeros((3, 3))}}
    with pytest.raises(CheckpointError, match=r"\['w'\] has shape \(2, 3\).*\(3, 3\)"):
        ck.restore(bad_shape)
    bad_dtype = {"replay": {"obs": np.zeros(1000, np.int32)}}
    with pytest.raises(CheckpointError, match=r"\['obs'\] has dtype float32.*int32"):
        ck.restore(bad_dtype)
    bad_tree = {"params": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}}
    with pytest.raises(CheckpointError, match=r"missing in checkpoint \[\"\['b'\]\"\]"):
        ck.restore(bad_tree)
    with pytest.raises(CheckpointError, match=r"no item \['agent'\]"):
        ck.restore({"agent": None})


def test_fingerprint_mismatch(tmp_path):
    _save_small(tmp_path, fingerprint={"seed": 1, "task": "cup"})
    with pytest.raises(CheckpointError, match=r"meta.*seed: checkpoint has 1, config has 2$"):
        Checkpointer(tmp_path, fingerprint={"seed": 2, "task": "cup"}).restore()
    nested = tmp_path / "nested"
    _save_small(nested, fingerprint={"model": {"units": 8, "act": "silu"}})
    with pytest.raises(CheckpointError, match=r"differs: model\.units: checkpoint has 8, config "
                                              r"has 16$"):
        Checkpointer(nested, fingerprint={"model": {"units": 16, "act": "silu"}}).restore()
    Checkpointer(tmp_path, fingerprint={"seed": 1, "task": "cup"}).restore()
    sub = tmp_path / "s"
    _save_small(sub, fingerprint=config_fingerprint({"a": 1}))
    with pytest.raises(CheckpointError, match="fingerprint differs"):
        Checkpointer(sub, fingerprint=config_fingerprint({"a": 2})).restore()
    assert config_fingerprint({"a": 1, "b": 2}) == config_fingerprint({"b": 2, "a": 1})


def test_earlier_format_is_named(tmp_path):
    """A directory in the format of the earlier checkpointer (meta.json, arrays.npz) is an
    error that says so, not a fresh start nor an orbax trace."""
    os.makedirs(tmp_path / "ckpt_00000100")
    (tmp_path / "ckpt_00000100" / "meta.json").write_text("{}")
    (tmp_path / "ckpt_00000100" / "arrays.npz").write_bytes(b"")
    ck = Checkpointer(tmp_path)
    assert ck.latest_step() == 100
    with pytest.raises(CheckpointError, match="earlier checkpointer"):
        ck.restore()


def test_no_checkpoint_and_bad_extra(tmp_path):
    ck = Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError):
        ck.restore()
    with pytest.raises(TypeError):
        ck.save(1, {"x": {"v": np.ones(2)}}, extra={"bad": object()})
    with pytest.raises(ValueError, match="reserved"):
        ck.save(1, {"meta": {"v": np.ones(2)}})
    with pytest.raises(ValueError, match="'x' must be a non-empty dict"):
        ck.save(1, {"x": np.ones(2)})
    assert ck.latest_step() is None
