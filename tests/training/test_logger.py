"""Logger (JSONL + TensorBoard), Progress line, and the graceful-stop signal helper."""
import glob
import io
import json
import os
import signal
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from dali_jax.training.logger import Logger, Progress
from dali_jax.training.signals import GracefulStop, stop_requested


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_events(path):
    """(tag, step, kind, value or (h, w)) of each summary value in an event file (TFRecord)."""
    from tensorboardX.proto import event_pb2
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        record = data[pos + 12:pos + 12 + length]
        pos += 12 + length + 4
        event = event_pb2.Event.FromString(record)
        for v in event.summary.value:
            kind = "image" if v.HasField("image") else "scalar"
            out.append((v.tag, event.step, kind, v.simple_value if kind == "scalar" else
                        (v.image.height, v.image.width)))
    return out


def test_jsonl_and_event_files(tmp_path):
    log = Logger(tmp_path)
    log.scalars(10, {"loss/model": np.float32(1.5), "return": jnp.asarray(812.25), "fps": 3})
    log.scalars(20, {"loss/model": 0.75})
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 255
    log.images(20, {"frames/true": img, "frames/pair": np.stack([img, img])})
    log.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[0]["loss/model"] == 1.5 and rows[0]["return"] == 812.25 and rows[0]["fps"] == 3.0
    assert set(rows[1]) == {"step", "time", "loss/model"} and rows[1]["loss/model"] == 0.75
    assert rows[0]["time"] <= rows[1]["time"]
    events = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 0
    assert len(events) == 1
    ev = read_events(events[0])
    assert [(s, v) for t, s, k, v in ev if t == "loss/model"] == [(10, 1.5), (20, 0.75)]
    assert [(s, v) for t, s, k, v in ev if t == "return"] == [(10, 812.25)]
    images = {t: v for t, s, k, v in ev if k == "image"}
    assert images["frames/true"] == (8, 8)
    assert "frames/pair" in images


def test_resume_purges_later_lines_and_appends(tmp_path):
    with Logger(tmp_path, use_tensorboard=False) as log:
        for s in (1, 2, 3, 4):
            log.scalars(s, {"x": s})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "x"')  # line cut by a crash
    with Logger(tmp_path, use_tensorboard=False, purge_step=3) as log:
        log.scalars(3, {"x": 30})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["x"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert not glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))


def test_images_reject_bad_input(tmp_path):
    with Logger(tmp_path) as log:
        with pytest.raises(TypeError, match="uint8"):
            log.images(0, {"a": np.zeros((4, 4, 3), np.float32)})
        with pytest.raises(ValueError, match="shape"):
            log.images(0, {"a": np.zeros((4, 4), np.uint8)})


def test_progress_line_shows_rate_eta_and_fields():
    out = io.StringIO()
    p = Progress(1000, interval=0.0, file=out)
    p.update(10, ret=None)
    first = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "ret=-" in first and "None" not in first
    p.update(100, ret=812.345, ctx="double_box")
    p.update(250, ret=900.0)
    p.close()
    text = out.getvalue()
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert "250/1000" in last and "ret=900" in last and "ctx=double_box" in last
    assert "step/s" in last or "s/step" in last
    assert "<" in last  # tqdm's elapsed<remaining (ETA)


def test_progress_throttles_redraws():
    out = io.StringIO()
    p = Progress(10_000, interval=60.0, file=out)
    for s in range(1, 2000):
        p.update(s, ret=float(s))
    n_draws = out.getvalue().count("\r")
    p.close()
    assert n_draws <= 3, n_draws


def test_graceful_stop_flag_then_keyboard_interrupt():
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop(verbose=False) as stop:
        assert not stop.stop_requested() and not stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.stop_requested() and stop_requested() and stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM keeps the graceful path
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert not stop_requested()


def test_graceful_stop_first_sigint_only_sets_flag():
    with GracefulStop(verbose=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.stop_requested() and stop.signal_name == "SIGINT"
