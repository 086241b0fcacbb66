"""Replay: contiguous single-env windows, uniform starts, FIFO eviction, exact state save and
restore, prefetching."""
import threading
import time

import numpy as np
import pytest

from dali_jax.training.replay import Prefetcher, Replay

SPEC = {
    "obs": ((3,), np.float32),
    "image": ((4, 4, 3), np.uint8),
    "action": ((2,), np.float32),
    "reward": ((), np.float32),
    "is_first": ((), bool),
    "is_last": ((), bool),
    "is_terminal": ((), bool),
    "t": ((), np.int64),     # global step counter
    "env": ((), np.int64),   # env index
}


def make_step(t, num_envs, episode_len=7):
    env = np.arange(num_envs)
    return {
        "obs": np.stack([np.full(3, t * 10 + e, np.float32) for e in env]),
        "image": np.full((num_envs, 4, 4, 3), t % 256, np.uint8),
        "action": np.zeros((num_envs, 2), np.float32),
        "reward": np.full(num_envs, t, np.float32),
        "is_first": np.full(num_envs, t % episode_len == 0),
        "is_last": np.full(num_envs, t % episode_len == episode_len - 1),
        "is_terminal": np.zeros(num_envs, bool),
        "t": np.full(num_envs, t, np.int64),
        "env": env.astype(np.int64),
    }


def filled(capacity, num_envs, steps, seq_len=8, seed=0):
    r = Replay(capacity, num_envs, SPEC, seq_len=seq_len, seed=seed)
    for t in range(steps):
        r.add(make_step(t, num_envs))
    return r


def test_windows_are_contiguous_and_from_one_env():
    r = filled(capacity=4 * 50, num_envs=4, steps=130, seq_len=8)  # wrapped: 50 per env kept
    assert len(r) == 200 and r.num_added == 520
    b = r.sample(256)
    assert b["t"].shape == (256, 8) and b["image"].shape == (256, 8, 4, 4, 3)
    assert b["image"].dtype == np.uint8 and b["is_first"].dtype == bool
    np.testing.assert_array_equal(np.diff(b["t"], axis=1), 1)
    assert (b["env"] == b["env"][:, :1]).all()
    # Fields of a step stay together.
    np.testing.assert_array_equal(b["obs"][..., 0], b["t"] * 10 + b["env"])
    np.testing.assert_array_equal(b["image"][..., 0, 0, 0], b["t"] % 256)
    # Only stored (not evicted) steps: the last 50 of 130.
    assert b["t"].min() >= 80 and b["t"].max() <= 129
    assert set(np.unique(b["env"])) == {0, 1, 2, 3}


def test_start_positions_are_uniform():
    r = filled(capacity=2 * 40, num_envs=2, steps=60, seq_len=10)  # 31 starts per env
    n = 31 * 2 * 200
    b = r.sample(n)
    starts = (b["t"][:, 0] - 20) + 31 * b["env"][:, 0]
    assert starts.min() == 0 and starts.max() == 61
    counts = np.bincount(starts, minlength=62)
    expected = n / 62
    chi2 = ((counts - expected) ** 2 / expected).sum()
    # 61 degrees of freedom: mean 61, sd ~11; 120 is far in the tail (p ~ 1e-5).
    assert chi2 < 120, chi2
    # A window must never run past the newest step: the last start is 59 - 9 = 50.
    assert b["t"][:, 0].max() == 50


def test_fifo_eviction_order():
    r = Replay(3 * 5, 3, SPEC, seq_len=5)
    for t in range(5):
        r.add(make_step(t, 3))
    st = r.state_dict()
    np.testing.assert_array_equal(st["data/t"][0], [0, 1, 2, 3, 4])
    r.add(make_step(5, 3))
    r.add(make_step(6, 3))
    st = r.state_dict()
    np.testing.assert_array_equal(st["data/t"][1], [2, 3, 4, 5, 6])  # 0 and 1 evicted first
    assert len(r) == 15
    b = r.sample(20)
    np.testing.assert_array_equal(b["t"], np.tile(np.arange(2, 7), (20, 1)))


def test_sample_needs_a_full_window_and_checks_inputs():
    r = filled(capacity=40, num_envs=2, steps=7, seq_len=8)
    with pytest.raises(ValueError, match="need >= 8"):
        r.sample(4)
    assert r.sample(4, seq_len=7)["t"].shape == (4, 7)
    bad = make_step(0, 2)
    del bad["reward"]
    with pytest.raises(KeyError, match="reward"):
        r.add(bad)
    bad = make_step(0, 3)
    with pytest.raises(ValueError, match="shape"):
        r.add(bad)


def test_state_round_trip_gives_identical_subsequent_samples():
    r = filled(capacity=3 * 20, num_envs=3, steps=33, seq_len=6, seed=5)
    r.sample(4)
    state = r.state_dict()
    assert all(isinstance(v, (int, np.ndarray)) for v in state.values())
    a = [r.sample(8) for _ in range(3)]
    assert not np.array_equal(a[0]["t"], a[1]["t"])  # the internal stream advances
    r.add(make_step(33, 3))
    a.append(r.sample(8))

    # Restore into a fresh buffer (ints passed back as 0-d arrays, as a checkpoint returns them).
    q = Replay(3 * 20, 3, SPEC, seq_len=6, seed=123)
    q.load_state_dict({k: np.asarray(v) if isinstance(v, int) else v for k, v in state.items()})
    assert len(q) == len(r) - 0 and q.num_added == 33 * 3
    b = [q.sample(8) for _ in range(3)]
    q.add(make_step(33, 3))
    b.append(q.sample(8))
    for x, y in zip(a, b):
        for k in SPEC:
            np.testing.assert_array_equal(x[k], y[k])
    # An explicit generator bypasses (and does not advance) the internal stream.
    g1, g2 = np.random.default_rng(1), np.random.default_rng(1)
    np.testing.assert_array_equal(r.sample(5, rng=g1)["t"], q.sample(5, rng=g2)["t"])
    np.testing.assert_array_equal(r.sample(5)["t"], q.sample(5)["t"])


def test_load_state_rejects_other_spec():
    r = filled(capacity=20, num_envs=2, steps=4)
    st = r.state_dict()
    other = Replay(20, 2, {k: v for k, v in SPEC.items() if k != "t"})
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict(st)


def test_prefetch_delivers_batches_and_measures_wait():
    r = filled(capacity=40, num_envs=2, steps=20, seq_len=4)
    with Prefetcher(lambda: r.sample(3), depth=2) as p:
        batches = [next(p) for _ in range(5)]
        assert p.num_batches == 5
        waited, wall = p.reset_wait()
        assert 0.0 <= waited <= wall
    for b in batches:
        assert b["t"].shape == (3, 4)
        np.testing.assert_array_equal(np.diff(b["t"], axis=1), 1)
    assert not p._thread.is_alive()


def test_prefetch_wait_time_counts_slow_sampling():
    def slow():
        time.sleep(0.05)
        return 1
    with Prefetcher(slow, depth=1) as p:
        p.reset_wait()
        for _ in range(4):
            next(p)
        assert p.wait_seconds > 0.1
        assert p.wait_fraction() > 0.5


def test_prefetch_propagates_exceptions():
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 3:
            raise ZeroDivisionError("boom in sampler")
        return len(calls)

    p = Prefetcher(fn, depth=2)
    assert next(p) == 1 and next(p) == 2
    with pytest.raises(ZeroDivisionError, match="boom in sampler"):
        next(p)
    p._thread.join(2)
    assert not p._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        next(p)


def test_prefetch_close_unblocks_a_full_queue():
    p = Prefetcher(lambda: np.zeros(3), depth=1)
    time.sleep(0.05)  # the producer is now blocked on the full queue
    p.close()
    assert not p._thread.is_alive()


def test_prefetch_device_put_with_sharding():
    import jax
    r = filled(capacity=40, num_envs=2, steps=20, seq_len=4)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with Prefetcher(lambda: r.sample(2), sharding=sharding) as p:
        b = next(p)
    assert isinstance(b["obs"], jax.Array) and b["obs"].shape == (2, 4, 3)
    assert b["obs"].sharding == sharding


def test_add_and_prefetched_sample_run_concurrently():
    r = filled(capacity=2 * 30, num_envs=2, steps=30, seq_len=5)
    stop = threading.Event()

    def writer():
        t = 30
        while not stop.is_set():
            r.add(make_step(t, 2))
            t += 1

    w = threading.Thread(target=writer)
    w.start()
    try:
        with Prefetcher(lambda: r.sample(16), depth=2) as p:
            for _ in range(50):
                b = next(p)
                np.testing.assert_array_equal(np.diff(b["t"], axis=1), 1)
                np.testing.assert_array_equal(b["obs"][..., 0], b["t"] * 10 + b["env"])
    finally:
        stop.set()
        w.join()
