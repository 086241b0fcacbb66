"""The agent's core: networks, `init`, and the jits of the pure update (`train_step`).

Train state: `TrainState` (a pytree; `state_dict()` gives the plain nested dicts that
checkpoints hold; the trainer rebuilds a TrainState from them with Agent.init's structure).

Batch (B, H + T, ...): the observation keys (`obs` float32 (Do,), `image` uint8 (64,64,3),
`context` float32 (2,) normalised ground truth), `action` (A,) = action executed at step t,
`reward` (reward on arriving at t), `is_first`, `is_last`, `is_terminal`. The last
T = train.batch_length steps are the training chunk; the H = `agent.history` steps before it
(K for the inferred-context methods) only fill the context windows of the chunk's steps,
so that they equal the acting-time windows. `agent.sequence_length` = H + T.

Acting carry: dict(state=RSSM state (N, ...), prev_action (N, A), window (N, K, Din)
context tokens, ctx_prev (N, Cc)).
"""
from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dali_jax import config as config_lib
from dali_jax.agent import acting
from dali_jax.agent.actor_critic import ActorCritic
from dali_jax.agent.update import Update
from dali_jax.agent.world_model import WorldModel
from dali_jax.methods import config_switches
from dali_jax.models import alignment as A
from dali_jax.models import context_encoder as CE
from dali_jax.models import fastgrad as FG
from dali_jax.models import nets as N
from dali_jax.models import rssm as R

f32 = jnp.float32
tmap = jax.tree_util.tree_map

MODEL_KEYS = ("encoder", "rssm", "decoder", "reward", "cont")


def compute_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else f32
    return {"float32": f32, "bfloat16": jnp.bfloat16}[name]


@flax.struct.dataclass
class TrainState:
    """Everything an update changes (a pytree).

    params:      dict(encoder, rssm, decoder, reward, cont, actor, critic[, context])
    slow_critic: critic params (EMA, fraction 0.02 per update)
    opt:         dict(model, actor, critic) optax states
    retnorm:     dict(lo=(), hi=()) EMA of return percentiles
    step:        () int32 number of updates
    align_stats: dict(mean (Do,), var (Do,), count ()) running moments of f_psi's targets
                 (inferred-context methods with context.standardize), else None
    """
    params: dict
    slow_critic: dict
    opt: dict
    retnorm: dict
    step: jax.Array
    align_stats: dict | None = None

    def state_dict(self) -> dict:
        """Plain nested dicts (the checkpoint layout; align_stats left out when None)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in d.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Spec:
    """Shapes of the problem. obs: key -> (shape, dtype) of one env step."""
    obs: dict
    action_dim: int
    discrete: bool = False


def make_optimizer(lr, eps, clip):
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr, eps=eps))


class Agent(WorldModel, ActorCritic, Update):
    """Holds the (static) network definitions; every method is a pure function.

    The world-model loss is in `world_model.py`, the actor-critic objective in
    `actor_critic.py`, the update in `update.py`, acting in `acting.py`; here: networks and
    `init`."""

    def __init__(self, config, spec: Spec):
        config_lib.validate(config)
        self.config = config
        self.spec = spec
        ctx = config.context
        self.switches = config_switches(config)
        self.release_compat = bool(ctx.release_compat)
        s = config_lib.resolve_sizes(config)
        self.sizes = s
        dt = compute_dtype(config.compute_dtype)
        self.dtype = dt
        self._world_model_networks(s, dt)
        self._context_networks(s)
        # Training sequences: `history` steps (context windows only) + the T-step chunk.
        self.history = config_lib.history_steps(config)
        self.sequence_length = self.history + config.train.batch_length
        self.standardize = self.inferred and ctx.standardize and ctx.loss != "inverse"
        c = config.train
        self.gamma = 1.0 - 1.0 / c.horizon
        self.opt = dict(model=make_optimizer(c.model_lr, c.model_eps, c.model_clip),
                        actor=make_optimizer(c.actor_lr, c.actor_eps, c.actor_clip),
                        critic=make_optimizer(c.critic_lr, c.critic_eps, c.critic_clip))
        level = config.get("xla_opt_level", -1)  # run configs saved before the field
        opts = self.compiler_options = (
            None if level < 0 else {"xla_backend_optimization_level": level})
        if not config.model.get("custom_vjp", True):  # plain autodiff in every entry point
            for name in ("update", "model_update", "world_model_loss", "actor_objective",
                         "critic_objective", "behavior_objective", "imagine"):
                setattr(self, name, FG.with_plain_autodiff(getattr(self, name)))
        self.train_step = jax.jit(self.update, donate_argnums=(0,), compiler_options=opts)
        self.model_step = jax.jit(self.model_update, donate_argnums=(0,), compiler_options=opts)
        self.policy_step = jax.jit(functools.partial(acting.policy_step, self),
                                   static_argnames=("mode",), compiler_options=opts)

    # ------------------------------------------------------------------ setup
    def _world_model_networks(self, s, dt):
        """Encoder, RSSM, decoder, reward / continue heads, actor, critic (sizes s)."""
        config, spec, sw = self.config, self.spec, self.switches
        self.image_keys = tuple(k for k, (shape, _) in spec.obs.items() if len(shape) == 3)
        vec = tuple(k for k, (shape, _) in spec.obs.items() if len(shape) == 1 and k != "context")
        self.vector_keys = vec
        enc_vec = vec + (("context",) if sw.encoder_input or sw.gt_into_encoder else ())
        dec_vec = {k: spec.obs[k][0][0] for k in vec}
        if sw.decoder_target:
            dec_vec["context"] = spec.obs["context"][0][0]
        self.enc_vector_keys = enc_vec
        self.dec_vector_shapes = dec_vec
        self.encoder = N.Encoder(enc_vec, self.image_keys, s["enc_layers"], s["enc_units"],
                                 s["cnn_depth"], config.model.conv_impl, dtype=dt)
        self.ctx_dim = {"none": 0, "ground_truth": spec.obs.get("context", ((0,),))[0][0],
                        "inferred": config.context.dim}[sw.source]
        post_inputs = self._embed_dim() + (self.ctx_dim if sw.posterior else 0)
        self.rssm = R.RSSM(s["deter"], s["units"], s["stoch"], s["classes"], config.model.unimix,
                           config.model.action_clip, dtype=dt, post_inputs=post_inputs)
        self.decoder = N.Decoder(dec_vec, {k: spec.obs[k][0] for k in self.image_keys},
                                 s["enc_layers"], s["enc_units"], s["cnn_depth"],
                                 config.model.conv_impl, dtype=dt)
        self.reward = N.Head(255, s["layers"], s["units"], outscale=0.0, dtype=dt)
        self.cont = N.Head(1, s["layers"], s["units"], dtype=dt)
        self.actor = N.Actor(spec.action_dim, spec.discrete, s["layers"], s["units"], dtype=dt)
        self.critic = N.Head(255, s["layers"], s["units"], outscale=0.0, dtype=dt)
        self.state_dim = s["deter"] + s["stoch"] * s["classes"]

    def _context_networks(self, s):
        """g_phi, f_psi, the inverse head and the chi maps (inferred-context methods)."""
        spec, ctx = self.spec, self.config.context
        self.inferred = self.switches.source == "inferred"
        if self.inferred:
            # Pixel runs use the world-model embedding as the observation part of a token.
            self.token_obs_dim = (self._embed_dim() if self.image_keys
                                  else sum(spec.obs[k][0][0] for k in self.vector_keys))
            # g_phi, f_psi and the inverse head compute in float32 whatever the world
            # model's dtype: the context's signal is a few percent of the forward error.
            self.ctx_encoder = CE.ContextEncoder(ctx.encoder, s["ctx_hidden"], ctx.dim,
                                                ctx.window, ctx.readout, dtype=f32)
            self.forward_head = A.DynamicsHead(self.token_obs_dim, ctx.head_layers,
                                               s["ctx_head_units"], dtype=f32)
            self.inverse_head = A.DynamicsHead(spec.action_dim, ctx.head_layers,
                                               s["ctx_head_units"], dtype=f32)
            self.cross = A.CrossModal(self.state_dim, ctx.dim, dtype=f32)

    def _embed_dim(self):
        dummy = {k: jnp.zeros((1,) + tuple(shape), dtype)
                 for k, (shape, dtype) in self.spec.obs.items()}
        out = jax.eval_shape(lambda: self.encoder.init_with_output(
            jax.random.PRNGKey(0), dummy)[0])
        return out.shape[-1]

    def init(self, rng) -> TrainState:
        """Fresh training state from an RNG key."""
        ks = jax.random.split(rng, 12)
        sp = self.spec
        obs = {k: jnp.zeros((1,) + tuple(shape), dtype) for k, (shape, dtype) in sp.obs.items()}
        p = {}
        p["encoder"] = self.encoder.init(ks[0], obs)["params"]
        embed = self.encoder.apply({"params": p["encoder"]}, obs)
        cd = self.ctx_dim
        z = lambda n: jnp.zeros((1, n), f32)
        sw = self.switches
        state0 = dict(deter=z(self.sizes["deter"]),
                      logit=jnp.zeros((1, self.sizes["stoch"], self.sizes["classes"]), f32),
                      stoch=jnp.zeros((1, self.sizes["stoch"], self.sizes["classes"]), f32))
        p["rssm"] = self.rssm.init(ks[1], state0, z(sp.action_dim), embed, jnp.ones((1,), bool),
                                   ks[2], z(cd) if sw.posterior else None,
                                   z(cd) if sw.dynamics else None)["params"]
        head_in = z(self.state_dim + (cd if sw.heads else 0))
        p["decoder"] = self.decoder.init(ks[3], head_in)["params"]
        p["reward"] = self.reward.init(ks[4], head_in)["params"]
        p["cont"] = self.cont.init(ks[5], head_in)["params"]
        p["actor"] = self.actor.init(ks[6], head_in)["params"]
        p["critic"] = self.critic.init(ks[7], head_in)["params"]
        if self.inferred:
            K = self.config.context.window
            tok = jnp.zeros((1, K, self.token_obs_dim + sp.action_dim), f32)
            p["context"] = dict(
                encoder=self.ctx_encoder.init(ks[8], tok)["params"],
                cross=self.cross.init(ks[10], z(cd), z(self.state_dim))["params"])
            if self.config.context.loss in ("forward", "both"):  # f_psi
                p["context"]["forward"] = self.forward_head.init(
                    ks[9], z(self.token_obs_dim + sp.action_dim + cd))["params"]
            if self.config.context.loss in ("inverse", "both"):
                p["context"]["inverse"] = self.inverse_head.init(
                    ks[11], z(2 * self.token_obs_dim + cd))["params"]
        model_params = self.model_params(p)
        align_stats = None
        if self.standardize:  # running moments of f_psi's targets (count 0: not yet seen)
            D_o = self.token_obs_dim
            align_stats = dict(mean=jnp.zeros((D_o,), f32), var=jnp.ones((D_o,), f32),
                               count=jnp.zeros((), f32))
        return TrainState(
            params=p,
            slow_critic=tmap(jnp.array, p["critic"]),
            opt=dict(model=self.opt["model"].init(model_params),
                     actor=self.opt["actor"].init(p["actor"]),
                     critic=self.opt["critic"].init(p["critic"])),
            retnorm=dict(lo=jnp.zeros((), f32), hi=jnp.zeros((), f32)),
            step=jnp.zeros((), jnp.int32), align_stats=align_stats)

    def model_params(self, p):
        out = {k: p[k] for k in MODEL_KEYS}
        if "context" in p:
            out["context"] = p["context"]
        return out

    # ---------------------------------------------------------------- acting
    def initial_carry(self, params, n: int) -> dict:
        """Acting carry for n envs (`acting.initial_carry`)."""
        return acting.initial_carry(self, params, n)

    executed = staticmethod(acting.executed)


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def trained_param_count(params) -> int:
    """Model + actor + critic parameters (slow critic and g_phi heads excluded)."""
    return count_params({k: v for k, v in params.items() if k != "context"})
