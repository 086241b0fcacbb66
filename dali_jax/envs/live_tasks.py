"""The live-model contextual tasks: ``BallInCupEnv`` (catch) and ``WalkerEnv`` (walk)."""
from __future__ import annotations

import logging
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from dali_jax.envs import contexts as C  # noqa: E402
from dali_jax.envs.live_env import ContextualDMCEnv  # noqa: E402

log = logging.getLogger(__name__)


class BallInCupEnv(ContextualDMCEnv):
    """Ball-in-Cup catch; context: gravity, string_length (docs/protocol.md's catch_context).

    string_length L sets the tendon "string" range to (0, L) and shifts the ball body's z by
    (0.3 - L). obs (8,): cup x, z, ball x, z positions, then their 4 velocities. Action (2,).
    Reward 1 while the ball is in the cup (returns in [0, 1000]); control step 0.02 s.
    """

    task = "ball_in_cup"
    xml_file = "ball_in_cup.xml"
    control_timestep = 0.02
    _MAX_INIT_TRIES = 1000

    def _setup_ids(self) -> None:
        m = self.model
        self._ball = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "ball")
        self._string = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_TENDON, "string")
        self._target = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "target")
        ball_geom = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "ball")
        self._ball_qx = m.jnt_qposadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, "ball_x")]
        self._ball_qz = m.jnt_qposadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, "ball_z")]
        self._margin = m.site_size[self._target, [0, 2]] - m.geom_size[ball_geom, 0]

    def _straight_tendon(self):
        m = self.model
        return (mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "cup"),
                mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "ball"), self._string)

    def _snapshot(self):
        out = super()._snapshot()
        m = self.model
        ball = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "ball")
        out["ball_z"] = float(m.body_pos[ball, 2])
        return out

    def _apply_context(self, ctx):
        m = self.model
        m.opt.gravity[:] = self._base["gravity"]
        m.opt.gravity[2] = -ctx["gravity"]
        length = ctx["string_length"]
        m.tendon_range[self._string] = (0.0, length)
        m.body_pos[self._ball, 2] = self._base["ball_z"] + (0.3 - length)
        mujoco.mj_setConst(m, self.data)

    def _initialize_episode(self):
        # Collision-free random ball position, as dm_control's BallInCup.
        rng, d = self._init_random, self.data
        for _ in range(self._MAX_INIT_TRIES):
            d.qpos[self._ball_qx] = rng.uniform(-0.2, 0.2)
            d.qpos[self._ball_qz] = rng.uniform(0.2, 0.5)
            self._forward_no_actuation()
            if d.ncon == 0:
                return
        log.warning("ball_in_cup: no collision-free initial ball position found under %s",
                    self.context)

    def _observe_state(self):
        d = self.data
        return np.concatenate([d.qpos, d.qvel])

    def _reward(self):
        target, ball = self.data.site_xpos[self._target], self.data.xpos[self._ball]
        return float(abs(target[0] - ball[0]) < self._margin[0]
                     and abs(target[2] - ball[2]) < self._margin[1])

    def in_target(self) -> float:
        """1.0 if the ball is in the cup."""
        return self._reward()


class WalkerEnv(ContextualDMCEnv):
    """Planar Walker walk; context: gravity, actuator_strength (+ every carl-bench feature).

    Feature semantics equal carl-bench's XML edits on walker.xml: actuator_strength, friction_*,
    joint_damping, joint_stiffness and geom_density scale the model's values (walker.xml has no
    joint stiffness, so joint_stiffness has no effect, as in CARL); gravity, timestep, density,
    viscosity and wind_* are set. obs (24,): 14 orientations, torso height, 9 velocities.
    Action (6,). Control step 0.025 s (10 physics steps at the default timestep).
    """

    task = "walker"
    xml_file = "walker.xml"
    control_timestep = C.WALKER_CONTROL_TIMESTEP
    _STAND_HEIGHT = 1.2
    _WALK_SPEED = 1.0

    def _setup_ids(self):
        m = self.model
        self._torso = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "torso")
        sid = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SENSOR, "torso_subtreelinvel")
        self._vel_adr = int(m.sensor_adr[sid])

    def _snapshot(self):
        out = super()._snapshot()
        m = self.model
        out.update(gear=m.actuator_gear[:, 0].copy(), friction=m.geom_friction.copy(),
                   damping=m.dof_damping.copy(), stiffness=m.jnt_stiffness.copy(),
                   mass=m.body_mass.copy(), inertia=m.body_inertia.copy(),
                   timestep=float(m.opt.timestep), density=float(m.opt.density),
                   viscosity=float(m.opt.viscosity), wind=m.opt.wind.copy(),
                   meaninertia=float(m.stat.meaninertia), meanmass=float(m.stat.meanmass))
        return out

    def _apply_context(self, ctx):
        m, b = self.model, self._base
        g = lambda k: ctx.get(k, C.FEATURES["walker"][k][0])  # noqa: E731
        m.opt.gravity[:] = b["gravity"]
        m.opt.gravity[2] = -g("gravity")
        m.actuator_gear[:, 0] = b["gear"] * g("actuator_strength")
        m.geom_friction[:] = b["friction"] * np.array(
            [g("friction_tangential"), g("friction_torsional"), g("friction_rolling")])
        m.dof_damping[:] = b["damping"] * g("joint_damping")
        m.jnt_stiffness[:] = b["stiffness"] * g("joint_stiffness")
        m.opt.timestep = g("timestep")
        m.opt.density = g("density")
        m.opt.viscosity = g("viscosity")
        m.opt.wind[:] = (g("wind_x"), g("wind_y"), g("wind_z"))
        # Every walker geom takes the default density, so masses and inertias scale with it.
        gd = g("geom_density")
        m.body_mass[:] = b["mass"] * gd
        m.body_inertia[:] = b["inertia"] * gd
        mujoco.mj_setConst(m, self.data)  # refreshes dof_M0, invweight0, actuator_acc0, ...
        if gd == 1.0:
            m.stat.meaninertia, m.stat.meanmass = b["meaninertia"], b["meanmass"]
        else:  # as the compiler computes them (the solver scales its tolerance by meaninertia)
            m.stat.meaninertia = float(np.mean(m.dof_M0))
            m.stat.meanmass = float(np.mean(m.body_mass[1:]))

    def _initialize_episode(self):
        # dm_control's randomize_limited_and_rotational_joints for hinge/slide joints.
        m, d, rng = self.model, self.data, self._init_random
        hinge, slide = int(mujoco.mjtJoint.mjJNT_HINGE), int(mujoco.mjtJoint.mjJNT_SLIDE)
        for j in range(m.njnt):
            adr, jtype = int(m.jnt_qposadr[j]), int(m.jnt_type[j])
            if jtype not in (hinge, slide):
                continue  # walker has no ball or free joints
            if m.jnt_limited[j]:
                lo, hi = m.jnt_range[j]
                d.qpos[adr] = rng.uniform(lo, hi)
            elif jtype == hinge:
                d.qpos[adr] = rng.uniform(-np.pi, np.pi)

    def _observe_state(self):
        # orientations: xx, xz of every body but the world (14); torso height; qvel (9)
        d, nb = self.data, self.model.nbody - 1
        out = np.empty(2 * nb + 1 + self.model.nv)
        out[:2 * nb].reshape(nb, 2)[:] = d.xmat[1:, 0:3:2]
        out[2 * nb] = d.xpos[self._torso, 2]
        out[2 * nb + 1:] = d.qvel
        return out

    def _reward(self):
        d = self.data
        height = d.xpos[self._torso, 2]
        from dm_control.utils import rewards  # present wherever the suite's XML is

        standing = rewards.tolerance(height, bounds=(self._STAND_HEIGHT, float("inf")),
                                     margin=self._STAND_HEIGHT / 2)
        upright = (1.0 + d.xmat[self._torso, 8]) / 2.0
        stand = (3.0 * standing + upright) / 4.0
        move = rewards.tolerance(d.sensordata[self._vel_adr],
                                 bounds=(self._WALK_SPEED, float("inf")),
                                 margin=self._WALK_SPEED / 2, value_at_margin=0.5,
                                 sigmoid="linear")
        return stand * (5.0 * move + 1.0) / 6.0
