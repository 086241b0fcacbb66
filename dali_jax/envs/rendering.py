"""Fast 64x64 offscreen rendering of a MuJoCo model: ``FastRenderer`` -> uint8 (H, W, 3)."""
from __future__ import annotations

import atexit
import os
import weakref

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

_LIVE_RENDERERS: "weakref.WeakSet[FastRenderer]" = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def _close_renderers() -> None:
    """Frees the GL contexts before mujoco's EGL atexit hook terminates the display."""
    for r in list(_LIVE_RENDERERS):
        r.close()


class FastRenderer:
    """mujoco.Renderer at (size, size) with shadows and multisampling off -> uint8 (H, W, 3).

    ``straight_tendon=(site_a, site_b, tendon_id)`` draws that tendon as one straight capsule
    between the two sites instead of MuJoCo 3's sagging catenary (dozens of segments, 2-3x
    slower to rasterise); MuJoCo 2, used by the DALI release, drew it straight.
    """

    def __init__(self, model: mujoco.MjModel, size: int = 64, camera: int | str = 0,
                 straight_tendon: tuple[int, int, int] | None = None):
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = size
        model.vis.global_.offheight = size
        self.model = model
        self.camera = camera
        self._r: mujoco.Renderer | None = mujoco.Renderer(model, size, size)
        self._option = None
        self._tendon = straight_tendon
        if straight_tendon is not None:
            self._option = mujoco.MjvOption()
            self._option.flags[mujoco.mjtVisFlag.mjVIS_TENDON] = 0
            tid = straight_tendon[2]
            self._t_width = float(model.tendon_width[tid])
            self._t_rgba = model.tendon_rgba[tid].astype(np.float32)
        _LIVE_RENDERERS.add(self)
        global _ATEXIT_REGISTERED
        if not _ATEXIT_REGISTERED:  # after mujoco's own hook, so that it runs before it
            atexit.register(_close_renderers)
            _ATEXIT_REGISTERED = True

    def render(self, data: mujoco.MjData) -> np.ndarray:
        self._r.update_scene(data, camera=self.camera, scene_option=self._option)
        if self._tendon is not None:
            scene = self._r.scene
            if scene.ngeom < scene.maxgeom:
                g = scene.geoms[scene.ngeom]
                mujoco.mjv_initGeom(g, mujoco.mjtGeom.mjGEOM_CAPSULE, np.zeros(3), np.zeros(3),
                                    np.eye(3).ravel(), self._t_rgba)
                mujoco.mjv_connector(g, mujoco.mjtGeom.mjGEOM_CAPSULE, self._t_width,
                                     data.site_xpos[self._tendon[0]],
                                     data.site_xpos[self._tendon[1]])
                scene.ngeom += 1
        return self._r.render()

    def close(self) -> None:
        if self._r is not None:
            try:
                self._r.close()
            except Exception:  # pragma: no cover - best effort at shutdown
                pass
            self._r = None
