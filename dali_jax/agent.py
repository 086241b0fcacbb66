"""The agent: networks, `init`, one jitted `train_step`, and `policy_step` for acting.

State pytree (checkpoints cleanly):
    params:      dict(encoder, rssm, decoder, reward, cont, actor, critic[, context])
    slow_critic: critic params (EMA, fraction 0.02 per update)
    opt:         dict(model, actor, critic) optax states
    retnorm:     dict(lo=(), hi=()) EMA of return percentiles
    step:        () int32 number of updates
    align_stats: dict(mean (Do,), var (Do,), count ()) running moments of f_psi's targets
                 (inferred-context methods with context.standardize only)

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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dali_jax import config as config_lib
from dali_jax.methods import config_switches
from dali_jax.models import behavior as B
from dali_jax.models import context as C
from dali_jax.models import distributions as D
from dali_jax.models import fastgrad as FG
from dali_jax.models import nets as N
from dali_jax.models import rssm as R

f32 = jnp.float32
sg = jax.lax.stop_gradient
tmap = jax.tree_util.tree_map

MODEL_KEYS = ("encoder", "rssm", "decoder", "reward", "cont")


def compute_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else f32
    return {"float32": f32, "bfloat16": jnp.bfloat16}[name]


@dataclasses.dataclass(frozen=True)
class Spec:
    """Shapes of the problem. obs: key -> (shape, dtype) of one env step."""
    obs: dict
    action_dim: int
    discrete: bool = False


def make_optimizer(lr, eps, clip):
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr, eps=eps))


class Agent:
    """Holds the (static) network definitions; every method is a pure function."""

    def __init__(self, config, spec: Spec):
        config_lib.validate(config)
        self.config = config
        self.spec = spec
        ctx = config.context
        self.switches = config_switches(config)
        sw = self.switches
        self.release_compat = bool(ctx.release_compat)
        s = config_lib.resolve_sizes(config)
        self.sizes = s
        dt = compute_dtype(config.compute_dtype)
        self.dtype = dt
        self.image_keys = tuple(k for k, (shape, _) in spec.obs.items() if len(shape) == 3)
        vec = tuple(k for k, (shape, _) in spec.obs.items() if len(shape) == 1 and k != "context")
        self.vector_keys = vec
        enc_vec = vec + (("context",) if sw["encoder_input"] or sw.get("gt_into_encoder") else ())
        dec_vec = {k: spec.obs[k][0][0] for k in vec}
        if sw["decoder_target"]:
            dec_vec["context"] = spec.obs["context"][0][0]
        self.enc_vector_keys = enc_vec
        self.dec_vector_shapes = dec_vec
        self.encoder = N.Encoder(enc_vec, self.image_keys, s["enc_layers"], s["enc_units"],
                                 s["cnn_depth"], config.model.conv_impl, dtype=dt)
        self.ctx_dim = {"none": 0, "ground_truth": spec.obs.get("context", ((0,),))[0][0],
                        "inferred": ctx.dim}[sw["source"]]
        post_inputs = self._embed_dim() + (self.ctx_dim if sw["posterior"] else 0)
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
        self.unroll = int(config.model.unroll)  # steps per observe / imagine scan iteration
        self.inferred = sw["source"] == "inferred"
        if self.inferred:
            # Pixel runs use the world-model embedding as the observation part of a token.
            self.token_obs_dim = (self._embed_dim() if self.image_keys
                                  else sum(spec.obs[k][0][0] for k in vec))
            # g_phi, f_psi and the inverse head compute in float32 whatever the world
            # model's dtype: the context's signal is a few percent of the forward error.
            self.ctx_encoder = C.ContextEncoder(ctx.encoder, s["ctx_hidden"], ctx.dim,
                                                ctx.window, ctx.readout, dtype=f32)
            self.forward_head = C.DynamicsHead(self.token_obs_dim, ctx.head_layers,
                                               s["ctx_head_units"], dtype=f32)
            self.inverse_head = C.DynamicsHead(spec.action_dim, ctx.head_layers,
                                               s["ctx_head_units"], dtype=f32)
            self.cross = C.CrossModal(self.state_dim, ctx.dim, dtype=f32)
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
        self.train_step = jax.jit(self.update, donate_argnums=(0,), compiler_options=opts)
        self.model_step = jax.jit(self.model_update, donate_argnums=(0,), compiler_options=opts)
        self.policy_step = jax.jit(self._policy_step, static_argnames=("mode",),
                                   compiler_options=opts)

    # ------------------------------------------------------------------ setup
    def _embed_dim(self):
        dummy = {k: jnp.zeros((1,) + tuple(shape), dtype)
                 for k, (shape, dtype) in self.spec.obs.items()}
        out = jax.eval_shape(lambda: self.encoder.init_with_output(
            jax.random.PRNGKey(0), dummy)[0])
        return out.shape[-1]

    def init(self, rng) -> dict:
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
                                   ks[2], z(cd) if sw["posterior"] else None,
                                   z(cd) if sw["dynamics"] else None)["params"]
        head_in = z(self.state_dim + (cd if sw["heads"] else 0))
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
                forward=self.forward_head.init(
                    ks[9], z(self.token_obs_dim + sp.action_dim + cd))["params"],
                cross=self.cross.init(ks[10], z(cd), z(self.state_dim))["params"])
            if self.config.context.loss in ("inverse", "both"):
                p["context"]["inverse"] = self.inverse_head.init(
                    ks[11], z(2 * self.token_obs_dim + cd))["params"]
        model_params = self._model_params(p)
        extra = {}
        if self.standardize:  # running moments of f_psi's targets (count 0: not yet seen)
            D_o = self.token_obs_dim
            extra["align_stats"] = dict(mean=jnp.zeros((D_o,), f32), var=jnp.ones((D_o,), f32),
                                        count=jnp.zeros((), f32))
        return dict(
            **extra,
            params=p,
            slow_critic=tmap(jnp.array, p["critic"]),
            opt=dict(model=self.opt["model"].init(model_params),
                     actor=self.opt["actor"].init(p["actor"]),
                     critic=self.opt["critic"].init(p["critic"])),
            retnorm=dict(lo=jnp.zeros((), f32), hi=jnp.zeros((), f32)),
            step=jnp.zeros((), jnp.int32))

    def _model_params(self, p):
        out = {k: p[k] for k in MODEL_KEYS}
        if "context" in p:
            out["context"] = p["context"]
        return out

    # ------------------------------------------------------------- components
    def head_input(self, state, ctx):
        f = R.feat(state)
        if self.switches["heads"]:
            ctx = jnp.broadcast_to(ctx.astype(f.dtype), f.shape[:-1] + ctx.shape[-1:])
            f = jnp.concatenate([f, ctx], -1)
        return f

    def infer_context(self, params, windows):
        """g_phi on explicit windows: (N, K, Din) tokens -> (N, Cc)."""
        return self.ctx_encoder.apply({"params": params["context"]["encoder"]}, windows)

    def context_chunk(self, params, batch, embed=None, steps=None):
        """Context of the last `steps` steps of a (B, L) sequence (default: all L).

        The earlier steps are history: they fill the windows of the later ones. Windows are
        causal and episode-bounded (`C.window_indices` on the batch's is_first, the
        sequence's first step counting as a start). embed: (B, L, E) world-model
        embeddings (used as token observations for pixels; None for features).
        Returns (ctx (B, steps, Cc) or None, aux dict(obs_vec (B, L, Do), idx
        (B, steps, K) window indices into L, is_first (B, L))).
        """
        src = self.switches["source"]
        L = batch["is_first"].shape[1]
        steps = L if steps is None else steps
        if src == "none":
            return None, {}
        if src == "ground_truth":
            return jnp.asarray(batch["context"][:, L - steps:], f32), {}
        is_first = jnp.asarray(batch["is_first"]).at[:, 0].set(True)
        obs_vec = self.token_obs(batch, embed)
        act = jnp.asarray(batch["action"], f32)
        K = self.config.context.window
        if self.release_compat:
            # Release: tokens pair o_k with a_k, and one window = the whole chunk.
            tok = C.tokens(obs_vec, act)
            idx = C.full_chunk_indices(is_first.shape[0], L)[:, L - steps:]
        else:
            tok = C.tokens(obs_vec, self.prev_actions(act, is_first))
            idx = C.window_indices(is_first, K)[:, L - steps:]
        ctx = self.ctx_encoder.apply({"params": params["context"]["encoder"]}, tok, idx,
                                     not self.release_compat, method=C.ContextEncoder.chunk)
        if self.release_compat:
            ctx = sg(ctx)  # release: the encoder is never updated
            # Its alignment loss runs over causal prefixes; we keep that for the metric.
            idx = C.window_indices(is_first, K)[:, L - steps:]
        return ctx, dict(obs_vec=obs_vec, action=act, idx=idx, is_first=is_first)

    def split_history(self, batch):
        """(H, chunk): a (B, H + T) batch's history length and its last T steps (the whole
        batch when it is no longer than T = train.batch_length)."""
        H = max(batch["is_first"].shape[1] - self.config.train.batch_length, 0)
        return H, {k: v[:, H:] for k, v in batch.items()}

    def token_obs(self, batch, embed):
        """Observation part of the context tokens: raw features (B, L, Do), or sg(embed)."""
        if self.image_keys:
            return sg(embed).astype(f32)
        return jnp.concatenate([batch[k].astype(f32) for k in self.vector_keys], -1)

    @staticmethod
    def prev_actions(action, is_first):
        """(B, T, A) actions taken at t -> action before t, zero at episode starts."""
        prev = jnp.concatenate([jnp.zeros_like(action[:, :1]), action[:, :-1]], 1)
        return prev * (1.0 - is_first.astype(f32))[..., None]

    @staticmethod
    def dyn_context(ctx, is_first):
        """Context for the prior step into t: c_{t-1} (c_t at an episode start). (B, T, Cc)."""
        prev = jnp.concatenate([ctx[:, :1], ctx[:, :-1]], 1)
        return jnp.where(is_first[..., None], ctx, prev)

    # ---------------------------------------------------------- world model
    def world_model_loss(self, mp, batch, rng, stats=None):
        """World-model (+ DALI) loss of a (B, H + T) batch; mp: model params.

        The last T = train.batch_length steps are the chunk every world-model loss is taken
        on; the H steps before it (history) only fill context windows. stats: the running
        moments of f_psi's targets (state["align_stats"]) when targets are standardised.
        Returns (scalar loss, (post, ctx_wm, metrics, updated stats or None)).
        """
        sw = self.switches
        scales = self.config.train.loss_scales
        L = batch["is_first"].shape[1]
        H, chunk = self.split_history(batch)
        is_first = jnp.asarray(chunk["is_first"]).at[:, 0].set(True)  # chunks start from h0
        obs = {k: chunk[k] for k in self.spec.obs}
        embed = self.encoder.apply({"params": mp["encoder"]}, obs)
        full_embed = embed
        if self.inferred and self.image_keys and H:  # history embeddings, tokens only
            hist = {k: batch[k][:, :H] for k in self.spec.obs}
            full_embed = jnp.concatenate(
                [sg(self.encoder.apply({"params": mp["encoder"]}, hist)), embed], 1)
        ctx, aux = self.context_chunk(mp, batch, full_embed, L - H)
        ctx_wm = None if ctx is None else sg(ctx)
        prev_act = self.prev_actions(chunk["action"].astype(f32), is_first)
        ctx_deep = ctx_wm  # what img_step and the heads read
        if ctx_wm is not None and self.config.context.deep_lag:
            key = jax.random.fold_in(rng, 1)  # observe's stream stays as without the lag
            idx = C.lagged_indices(is_first, self.config.context.deep_lag, key)
            ctx_deep = jnp.take_along_axis(ctx_wm, idx[..., None], 1)
        post, prior = R.observe(
            self.rssm, mp["rssm"], embed, prev_act, is_first, rng,
            ctx_post=ctx_wm if sw["posterior"] else None,
            ctx_dyn=self.dyn_context(ctx_deep, is_first) if sw["dynamics"] else None,
            unroll=self.unroll)
        batch = chunk
        hin = self.head_input(post, ctx_deep)
        losses = {}
        rec = self.decoder.apply({"params": mp["decoder"]}, hin)
        recon = 0.0
        for k, pred in rec.items():
            if k in self.image_keys:
                l = D.mse(pred, batch[k].astype(f32) / 255.0, 3)
            else:
                l = D.symlog_mse(pred, batch[k], 1)
            losses[f"recon_{k}"] = l
            recon = recon + l
        rew = D.TwoHot(self.reward.apply({"params": mp["reward"]}, hin))
        losses["reward"] = -rew.log_prob(batch["reward"].astype(f32))
        cont = D.Bernoulli(self.cont.apply({"params": mp["cont"]}, hin)[..., 0])
        losses["cont"] = -cont.log_prob(1.0 - batch["is_terminal"].astype(f32))
        dyn, rep, kl = R.kl_losses(post, prior, self.config.model.free_nats)
        losses["dyn"], losses["rep"] = dyn, rep
        total = (scales.recon * recon + scales.reward * losses["reward"]
                 + scales.cont * losses["cont"] + scales.dyn * dyn + scales.rep * rep)
        new_stats, align_metrics = None, {}
        if self.inferred:
            cfg = self.config.context
            align, new_stats, align_metrics = self._alignment(mp["context"], aux, ctx, stats)
            losses["dali"] = align
            total = total + cfg.loss_scale * align
            if sw["crossmodal"]:
                cross = lambda c, s: self.cross.apply({"params": mp["context"]["cross"]}, c, s)
                chi = C.crossmodal_loss(cross, ctx, R.feat(post), cfg.chi_fit_map)
                losses["chi"] = chi
                total = total + cfg.lambda_cross * chi
        metrics = {f"loss/{k}": v.mean() for k, v in losses.items()}
        metrics["model/kl"] = kl.mean()
        metrics["model/post_ent"] = D.OneHot(post["logit"], 1, normalized=True).entropy().mean()
        metrics["model/prior_ent"] = D.OneHot(prior["logit"], 1, normalized=True).entropy().mean()
        metrics["model/reward_pred"] = rew.mean().mean()
        if ctx is not None:
            metrics["context/std"] = ctx.std(axis=(0, 1)).mean()
        metrics.update(align_metrics)
        return total.mean(), (post, ctx_wm, metrics, new_stats)

    def _alignment(self, cp, aux, ctx, stats):
        """Dynamics-alignment loss (B, T) of the windows' contexts, the updated target
        moments, and `context/gain`: the loss with contexts shuffled across the batch (rolled
        by one sequence) minus the loss with the true ones, on every 4th window (how much
        the context tells f_psi; stop-gradient)."""
        cfg = self.config.context
        obs, is_first = aux["obs_vec"], aux["is_first"]
        act = aux["action"]
        trans = C.transition_indices(is_first, aux["idx"], cfg.pairs, cfg.future_steps)
        norm, new_stats = None, None
        if self.standardize:
            mean, var = C.target_moments(sg(obs), is_first, cfg.residual)
            if stats is None:  # called without a train state: this batch's moments
                stats = dict(mean=mean, var=var, count=jnp.zeros((), f32))
            d = jnp.where(stats["count"] > 0, cfg.stats_decay, 0.0)
            new_stats = dict(mean=d * stats["mean"] + (1 - d) * mean,
                             var=d * stats["var"] + (1 - d) * var, count=stats["count"] + 1)
            norm = (new_stats["mean"], jnp.sqrt(new_stats["var"] + 1e-6))
        fwd = lambda x: self.forward_head.apply({"params": cp["forward"]}, x)
        inv = lambda x: self.inverse_head.apply({"params": cp["inverse"]}, x)
        loss = lambda c, tr: C.alignment_loss(fwd, inv, obs, act, tr, c, cfg.loss,
                                              cfg.residual, norm)
        align = loss(ctx, trans)
        # The gain on every 4th window (a metric; a quarter of the cost).
        sub = lambda x: x[:, ::4]
        gain = sg(loss(jnp.roll(sub(ctx), 1, 0), tuple(map(sub, trans))).mean()
                  - sub(align).mean())
        return align, new_stats, {"context/gain": gain}

    # ----------------------------------------------------- actor and critic
    def _policy_dist(self, actor_params, hin):
        return N.actor_dist(self.actor.apply({"params": actor_params}, hin), self.spec.discrete,
                            self.config.model.unimix)

    def imagine(self, params, actor_params, start, ctx, is_terminal, rng, heads=None):
        """Imagined trajectory (H + 1, N, ...) from posterior states `start` (N, ...).

        ctx: (N, Cc) context held fixed over the horizon (or None). Adds `hin` (head
        inputs), `reward`, `cont` (first from the real is_terminal) and `weight`.
        heads: optional `heads(hin) -> dict` of further per-state outputs (critic values,
        logits).
        Every head runs inside the imagination scan on one step's N states at a time
        (on CPU faster than on the stacked (H + 1) * N rows); reward and
        continue heads run on the imagined states only (entry 0 of `reward` is zero and
        unused, entry 0 of `cont` comes from is_terminal).
        """
        sw = self.switches

        def policy(state, key):
            # The actor sees stop-gradient states (DreamerV3); its entropy and log-prob are
            # taken here so the actor loss need not run the actor a second time.
            hin = self.head_input(state, ctx)
            d = self._policy_dist(actor_params, sg(hin))
            a = d.sample(key)
            out = dict(action=a, entropy=d.entropy(), hin=hin)
            if self.spec.discrete:
                out["logp"] = d.log_prob(sg(a))
            if heads is not None:
                out.update(heads(hin))
            return out

        def outputs(state):  # reward and continue flag arriving in each imagined state
            hin = state["hin"]
            return dict(
                reward=D.TwoHot(self.reward.apply({"params": params["reward"]}, hin)).mean(),
                cont=D.Bernoulli(self.cont.apply({"params": params["cont"]}, hin)[..., 0]).mode())

        ctx_dyn = ctx if sw["dynamics"] else None
        traj = R.imagine(self.rssm, params["rssm"], policy, start,
                         self.config.train.imag_horizon, rng, ctx_dyn, outputs,
                         unroll=self.unroll)
        cont = jnp.concatenate([(1.0 - is_terminal.astype(f32))[None], traj["cont"][1:]], 0)
        traj.update(cont=cont, weight=B.trajectory_weight(cont, self.gamma))
        return traj

    def _imagine_frozen(self, params, start, ctx, is_terminal, rng, heads=None):
        """`imagine` with the world model, start states and context as stop-gradient."""
        frozen = sg({k: params[k] for k in ("rssm", "reward", "cont")})
        ctx = None if ctx is None else sg(ctx)
        return self.imagine(frozen, params["actor"], sg(start), ctx, is_terminal, rng, heads)

    def _critic_logits(self, critic_params, hin):
        """(..., F) -> (..., bins)."""
        return self.critic.apply({"params": critic_params}, hin)

    def _actor_terms(self, traj, value, retnorm):
        """Actor loss from a trajectory and its critic values (H + 1, N) -> (loss, aux)."""
        cfg = self.config.train
        ret = B.lambda_returns(traj["reward"], traj["cont"], value, self.gamma,
                               cfg.return_lambda)
        new_retnorm, scale = B.retnorm_update(retnorm, ret, cfg.retnorm_decay)
        ent = traj["entropy"][:-1]
        logp = traj["logp"][:-1] if self.spec.discrete else None
        loss, adv = B.actor_loss(logp, ent, ret, value[:-1], scale, traj["weight"],
                                 cfg.actent, self.spec.discrete)
        return loss, dict(traj=traj, ret=ret, retnorm=new_retnorm, ent=ent, adv=adv,
                          scale=scale)

    def _critic_terms(self, logits, slow_mean, weight, ret):
        """Critic loss from its logits (H, N, bins) and the slow critic's mean (H, N) on
        the first H states; slow_mean, weight (H + 1, N) and ret (H, N) are stop-gradient."""
        return B.critic_loss(D.TwoHot(logits), sg(slow_mean), sg(ret), sg(weight),
                             self.config.train.slowreg)

    def _value(self, critic_params, hin):
        """Critic mean (symexp of the two-hot expectation): (..., F) -> (...)."""
        return D.TwoHot(self._critic_logits(critic_params, hin)).mean()

    def actor_objective(self, params, retnorm, start, ctx, is_terminal, rng):
        """Actor loss as a function of the full parameter tree (scalar, aux).

        Only the actor receives gradients: the world model, reward, continue and critic
        parameters and the start states are stop-gradient; for continuous actions the
        gradient flows through the imagined dynamics into the actions.
        start: posterior states (N, ...); ctx: (N, Cc) or None; is_terminal: (N,).
        """
        heads = lambda hin: {"value": self._value(sg(params["critic"]), hin)}
        traj = self._imagine_frozen(params, start, ctx, is_terminal, rng, heads)
        return self._actor_terms(traj, traj["value"], retnorm)

    def critic_objective(self, params, slow_critic, traj, ret):
        """Critic loss (scalar): two-hot NLL of sg(lambda returns) plus the regulariser
        towards the slow critic's mean; trajectory and returns are stop-gradient."""
        hin = sg(traj["hin"][:-1])
        return self._critic_terms(self._critic_logits(params["critic"], hin),
                                  self._value(slow_critic, hin), traj["weight"], ret)

    def behavior_objective(self, params, slow_critic, retnorm, start, ctx, is_terminal, rng):
        """actor_objective + critic_objective with one imagination and one critic forward.

        The critic's logits on the trajectory serve both losses: `fastgrad.routed` sends the
        actor loss's cotangent only into the trajectory (towards the actor) and the critic
        loss's only into the critic's parameters, so the gradient equals grad(actor_objective) +
        grad(critic_objective) (tested) while the critic runs forward once instead of
        twice. Returns (actor_loss + critic_loss, aux) with aux["loss/actor"] and
        aux["loss/critic"].
        """
        def heads(hin):
            # Only the critic's logits leave the scan at full width (the critic loss needs
            # them against returns known after it); the actor's values and the slow
            # critic's regularisation target leave it as means.
            for_actor, for_critic = FG.routed(self._critic_logits, params["critic"], hin)
            return dict(value=D.TwoHot(for_actor).mean(), critic_logits=for_critic,
                        slow_value=sg(self._value(slow_critic, sg(hin))))

        traj = self._imagine_frozen(params, start, ctx, is_terminal, rng, heads)
        a_loss, aux = self._actor_terms(traj, traj["value"], retnorm)
        c_loss = self._critic_terms(traj["critic_logits"][:-1], traj["slow_value"][:-1],
                                    traj["weight"], aux["ret"])
        aux.update({"loss/actor": a_loss, "loss/critic": c_loss})
        return a_loss + c_loss, aux

    def _world_model_update(self, state, batch, rng):
        """One optimiser step of the world model (+ g_phi, f_psi, chi heads).
        -> (state with new params / model optimiser / align_stats, post, ctx_wm, metrics)."""
        p = state["params"]
        mp = self._model_params(p)
        (_, (post, ctx_wm, metrics, stats)), grads = jax.value_and_grad(
            self.world_model_loss, has_aux=True)(mp, batch, rng, state.get("align_stats"))
        if self.release_compat and "context" in grads:
            grads["context"] = tmap(jnp.zeros_like, grads["context"])  # release defect 1
        metrics["grad_norm/model"] = optax.tree_utils.tree_norm(grads)
        upd, opt_model = self.opt["model"].update(grads, state["opt"]["model"], mp)
        freeze = self.config.context.freeze_after
        if freeze > 0 and "context" in upd:  # g_phi and its heads stop after `freeze` updates
            live = (state["step"] < freeze).astype(f32)
            upd = dict(upd, context=tmap(lambda u: u * live.astype(u.dtype), upd["context"]))
        new = dict(state, params=dict(p, **optax.apply_updates(mp, upd)),
                   opt=dict(state["opt"], model=opt_model))
        if stats is not None:
            new["align_stats"] = stats
        return new, post, ctx_wm, metrics

    @staticmethod
    def _finite_or_keep(new, old, batch, metrics):
        """Non-finite guard of an update, decided on the device: `new` when every loss term
        and gradient norm in `metrics` is finite and the batch's float inputs are, else
        `old` unchanged (params, optimisers, slow critic, return norm, step). Adds
        `train/nonfinite` (1: skipped) and `train/nonfinite_inputs` (non-finite batch
        values) to `metrics`."""
        bad_inputs = sum(jnp.sum(~jnp.isfinite(v)) for v in batch.values()
                         if jnp.issubdtype(v.dtype, jnp.floating))
        terms = [v.astype(f32) for k, v in metrics.items()
                 if k.startswith(("loss/", "grad_norm/"))]
        ok = jnp.all(jnp.isfinite(jnp.stack(terms))) & (bad_inputs == 0)
        metrics["train/nonfinite"] = 1.0 - ok.astype(f32)
        metrics["train/nonfinite_inputs"] = jnp.asarray(bad_inputs, f32)
        return tmap(lambda n, o: jnp.where(ok, n, o), new, old), metrics

    def model_update(self, state, batch, rng):
        """World-model-only update (world model, g_phi, f_psi, chi; no actor-critic):
        offline model training and representation studies. -> (state, metrics)."""
        key = jax.random.fold_in(rng, state["step"])
        new, _, _, metrics = self._world_model_update(state, batch, key)
        return self._finite_or_keep(dict(new, step=state["step"] + 1), state, batch, metrics)

    def update(self, state, batch, rng):
        """One training update (world model, then actor and critic in imagination), pure:
        `train_step` is its jit with the state donated. -> (state, metrics)."""
        cfg = self.config.train
        k_wm, k_img = jax.random.split(jax.random.fold_in(rng, state["step"]))
        metrics = {}

        # World model (+ g_phi, f_psi, chi heads).
        wm, post, ctx_wm, m = self._world_model_update(state, batch, k_wm)
        metrics.update(m)
        p = dict(wm["params"])
        opt_model = wm["opt"]["model"]
        full_batch, batch = batch, self.split_history(batch)[1]

        # Actor and critic in imagination from every posterior state (B * T starts): one
        # gradient of both losses (each reaches only its own network; see behavior_objective).
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        start = tmap(flat, post)
        ctx0 = None if ctx_wm is None else flat(ctx_wm)
        ac = {"actor": p["actor"], "critic": p["critic"]}
        (_, aux), g = jax.value_and_grad(
            lambda q: self.behavior_objective(dict(p, **q), state["slow_critic"],
                                              state["retnorm"], start, ctx0,
                                              flat(batch["is_terminal"]), k_img),
            has_aux=True)(ac)
        a_grads, c_grads = g["actor"], g["critic"]
        a_loss, c_loss = aux["loss/actor"], aux["loss/critic"]
        upd, opt_actor = self.opt["actor"].update(a_grads, state["opt"]["actor"], p["actor"])
        p["actor"] = optax.apply_updates(p["actor"], upd)
        upd, opt_critic = self.opt["critic"].update(c_grads, state["opt"]["critic"],
                                                    p["critic"])
        p["critic"] = optax.apply_updates(p["critic"], upd)
        frac = cfg.slow_critic_fraction
        slow = tmap(lambda s, c: (1 - frac) * s + frac * c, state["slow_critic"], p["critic"])

        traj = aux["traj"]
        metrics.update({
            "loss/actor": a_loss, "loss/critic": c_loss,
            "grad_norm/actor": optax.tree_utils.tree_norm(a_grads),
            "grad_norm/critic": optax.tree_utils.tree_norm(c_grads),
            "behavior/entropy": aux["ent"].mean(), "behavior/return": aux["ret"].mean(),
            "behavior/imag_reward": traj["reward"][1:].mean(),
            "behavior/retnorm_scale": aux["scale"], "behavior/adv_std": aux["adv"].std(),
        })
        new = dict(wm, params=p, slow_critic=slow,
                   opt=dict(model=opt_model, actor=opt_actor, critic=opt_critic),
                   retnorm=aux["retnorm"], step=state["step"] + 1)
        return self._finite_or_keep(new, state, full_batch, metrics)

    # ------------------------------------------------------ imagination tools
    def decode(self, params, states, ctx=None):
        """Decoder means in observation space: vectors symexp'd, images clipped to [0, 1].
        states: (..., ...) RSSM states; ctx broadcast over their leading dims."""
        rec = self.decoder.apply({"params": params["decoder"]}, self.head_input(states, ctx))
        return {k: (jnp.clip(v, 0.0, 1.0) if k in self.image_keys else D.symexp(v))
                for k, v in rec.items()}

    def imagine_open_loop(self, params, start, actions, ctx, rng, first_step=None):
        """Open-loop imagination under given actions with the context held fixed.

        start: RSSM state (N, ...) (used as is), or, when `first_step` = dict(prev_state,
        prev_action (N, A), embed (N, E), is_first (N,)) is given, the start posterior is
        recomputed with `ctx` (so shallow variants, where c only enters the posterior, see
        it too). actions: (N, H, A); ctx: (N, Cc) or None. Returns (states (N, H, ...),
        decoded dict (N, H, ...)), the decoded step k being the state after actions[:, k].
        """
        sw = self.switches
        if first_step is not None:
            r0, rng = jax.random.split(rng)
            start, _ = self.rssm.apply(
                {"params": params["rssm"]}, first_step["prev_state"], first_step["prev_action"],
                first_step["embed"], first_step["is_first"], r0,
                ctx if sw["posterior"] else None,
                ctx if sw["dynamics"] else None, method=R.RSSM.obs_step)
        states = R.imagine_actions(self.rssm, params["rssm"], start, actions, rng,
                                   ctx if sw["dynamics"] else None)
        return states, self.decode(params, states, None if ctx is None else ctx[:, None])

    def openloop_report(self, params, batch, rng, context_steps: int = 5):
        """DreamerV3-style video report for pixel runs: filter the first `context_steps`
        steps of each sequence, imagine the rest open loop with the recorded actions,
        decode. batch: (B, T, ...) (a few sequences). Returns {key: (B, T, H, 3W, C)
        uint8}: true | model | error frames side by side, for every image key."""
        sw = self.switches
        is_first = jnp.asarray(batch["is_first"]).at[:, 0].set(True)
        obs = {k: batch[k] for k in self.spec.obs}
        embed = self.encoder.apply({"params": params["encoder"]}, obs)
        ctx, _ = self.context_chunk(params, batch, embed)
        prev_act = self.prev_actions(jnp.asarray(batch["action"], f32), is_first)
        k1, k2 = jax.random.split(rng)
        n = context_steps
        post, _ = R.observe(self.rssm, params["rssm"], embed[:, :n], prev_act[:, :n],
                            is_first[:, :n], k1,
                            ctx_post=ctx[:, :n] if sw["posterior"] else None,
                            ctx_dyn=self.dyn_context(ctx, is_first)[:, :n]
                            if sw["dynamics"] else None)
        start = tmap(lambda x: x[:, -1], post)
        c_last = None if ctx is None else ctx[:, n - 1]
        states = R.imagine_actions(self.rssm, params["rssm"], start,
                                   jnp.asarray(batch["action"], f32)[:, n - 1:-1], k2,
                                   c_last if sw["dynamics"] else None)
        rec_obs = self.decode(params, post, ctx[:, :n] if ctx is not None else None)
        rec_img = self.decode(params, states, None if c_last is None else c_last[:, None])
        out = {}
        for k in self.image_keys:
            model = jnp.concatenate([rec_obs[k], rec_img[k]], 1)
            true = jnp.asarray(batch[k], f32) / 255.0
            err = (model - true + 1.0) / 2.0
            video = jnp.concatenate([true, model, err], 3)
            out[k] = (jnp.clip(video, 0, 1) * 255).astype(jnp.uint8)
        return out

    # ---------------------------------------------------------------- acting
    def initial_carry(self, params, n: int) -> dict:
        """Acting carry for n envs (before their first step)."""
        A = self.spec.action_dim
        st = R.initial_state(self.rssm, params["rssm"], n)
        carry = dict(state=st, prev_action=jnp.zeros((n, A), f32))
        if self.ctx_dim:
            carry["ctx_prev"] = jnp.zeros((n, self.ctx_dim), f32)
        if self.inferred:
            K = self.config.context.window
            carry["window"] = jnp.zeros((n, K, self.token_obs_dim + A), f32)
        return carry

    def _policy_step(self, params, carry, obs, rng, mode="sample"):
        """One acting step for N envs. obs: dict of (N, ...) incl. `is_first` (N,) bool.

        mode: "sample" (training/eval with sampled actions) or "mode" (deterministic).
        Returns (action (N, A), new carry). Continuous actions are clipped to
        [-model.action_clip, model.action_clip] (the env's bounds): the returned action is
        the executed one, and the carry's `prev_action` (next step's token and RSSM input)
        holds it. A caller that executes another action (the random prefill) records it
        with `executed(carry, action)`.
        """
        sw = self.switches
        is_first = obs["is_first"].astype(bool)
        first = is_first.astype(f32)
        enc_obs = {k: obs[k] for k in self.spec.obs}
        embed = self.encoder.apply({"params": params["encoder"]}, enc_obs)
        prev_action = carry["prev_action"] * (1.0 - first)[:, None]
        new = dict(carry)
        ctx = None
        if sw["source"] == "ground_truth":
            ctx = obs["context"].astype(f32)
        elif self.inferred:
            tok_obs = self.token_obs(enc_obs, embed)
            if self.release_compat:
                # Release: zero-initialised buffer, never reset, (o_k, a_{k-1}) pairs.
                tok = C.tokens(tok_obs, carry["prev_action"])
                window = jnp.concatenate([carry["window"][:, 1:], tok[:, None]], 1)
            else:
                tok = C.tokens(tok_obs, prev_action)
                rolled = jnp.concatenate([carry["window"][:, 1:], tok[:, None]], 1)
                fresh = jnp.broadcast_to(tok[:, None], rolled.shape)
                window = jnp.where(is_first[:, None, None], fresh, rolled)
            new["window"] = window
            ctx = self.infer_context(params, window)
        ctx_post = ctx if sw["posterior"] else None
        ctx_dyn = None
        if sw["dynamics"]:
            ctx_dyn = jnp.where(is_first[:, None], ctx, carry["ctx_prev"])
        k1, k2 = jax.random.split(rng)
        post, _ = self.rssm.apply({"params": params["rssm"]}, carry["state"], prev_action,
                                  embed, is_first, k1, ctx_post, ctx_dyn,
                                  method=R.RSSM.obs_step)
        dist = self._policy_dist(params["actor"], self.head_input(post, ctx))
        action = dist.sample(k2) if mode == "sample" else dist.mode()
        action = sg(action)
        clip = self.config.model.action_clip
        if not self.spec.discrete and clip > 0:  # the action the env executes
            action = jnp.clip(action, -clip, clip)
        new.update(state=post, prev_action=action)
        if self.ctx_dim:
            new["ctx_prev"] = ctx
        return action, new

    @staticmethod
    def executed(carry, action):
        """The carry after the env executed `action` (N, A) instead of the policy's."""
        return dict(carry, prev_action=jnp.asarray(action, f32))


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def trained_param_count(params) -> int:
    """Model + actor + critic parameters (slow critic and g_phi heads excluded)."""
    return count_params({k: v for k, v in params.items() if k != "context"})
