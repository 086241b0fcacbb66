"""The world-model side of the agent: context inference on training sequences, the
filter over the chunk, and the world-model loss (reconstruction, reward, continue, KL,
dynamics alignment, chi). A mixin of `Agent` (it reads the networks `Agent` builds)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dali_jax.models import alignment as A
from dali_jax.models import context_encoder as CE
from dali_jax.models import distributions as D
from dali_jax.models import rssm as R

f32 = jnp.float32
sg = jax.lax.stop_gradient
tmap = jax.tree_util.tree_map


class WorldModel:
    def head_input(self, state, ctx):
        f = R.feat(state)
        if self.switches.heads:
            ctx = jnp.broadcast_to(ctx.astype(f.dtype), f.shape[:-1] + ctx.shape[-1:])
            f = jnp.concatenate([f, ctx], -1)
        return f

    def infer_context(self, params, windows):
        """g_phi on explicit windows: (N, K, Din) tokens -> (N, Cc)."""
        return self.ctx_encoder.apply({"params": params["context"]["encoder"]}, windows)

    def context_chunk(self, params, batch, embed=None, steps=None):
        """Context of the last `steps` steps of a (B, L) sequence (default: all L).

        The earlier steps are history: they fill the windows of the later ones. Windows are
        causal and episode-bounded (`CE.window_indices` on the batch's is_first, the
        sequence's first step counting as a start). embed: (B, L, E) world-model
        embeddings (used as token observations for pixels; None for features).
        Returns (ctx (B, steps, Cc) or None, aux dict(obs_vec (B, L, Do), idx
        (B, steps, K) window indices into L, is_first (B, L))).
        """
        src = self.switches.source
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
            tok = CE.tokens(obs_vec, act)
            idx = CE.full_chunk_indices(is_first.shape[0], L)[:, L - steps:]
        else:
            tok = CE.tokens(obs_vec, self.prev_actions(act, is_first))
            idx = CE.window_indices(is_first, K)[:, L - steps:]
        ctx = self.ctx_encoder.apply({"params": params["context"]["encoder"]}, tok, idx,
                                     not self.release_compat, method=CE.ContextEncoder.chunk)
        if self.release_compat:
            ctx = sg(ctx)  # release: the encoder is never updated
            # Its alignment loss runs over causal prefixes; we keep that for the metric.
            idx = CE.window_indices(is_first, K)[:, L - steps:]
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
    def observe_chunk(self, mp, batch, rng):
        """Embed the chunk of a (B, H + T) batch, infer its contexts (the H history steps
        only fill their windows) and filter it. mp: model params.
        -> (chunk (B, T, ...), post, prior, ctx (B, T, Cc) or None, ctx_deep: sg(ctx) as
        img_step and the heads read it, aux (`context_chunk`))."""
        sw = self.switches
        H, chunk = self.split_history(batch)
        is_first = jnp.asarray(chunk["is_first"]).at[:, 0].set(True)  # chunks start from h0
        embed = self.encoder.apply({"params": mp["encoder"]}, {k: chunk[k] for k in self.spec.obs})
        full_embed = embed
        if self.inferred and self.image_keys and H:  # history embeddings, tokens only
            hist = {k: batch[k][:, :H] for k in self.spec.obs}
            full_embed = jnp.concatenate(
                [sg(self.encoder.apply({"params": mp["encoder"]}, hist)), embed], 1)
        ctx, aux = self.context_chunk(mp, batch, full_embed, chunk["is_first"].shape[1])
        ctx_deep = None if ctx is None else sg(ctx)
        post, prior = R.observe(
            self.rssm, mp["rssm"], embed, self.prev_actions(chunk["action"].astype(f32), is_first),
            is_first, rng, ctx_post=None if ctx is None or not sw.posterior else sg(ctx),
            ctx_dyn=self.dyn_context(ctx_deep, is_first) if sw.dynamics else None)
        return chunk, post, prior, ctx, ctx_deep, aux

    def prediction_losses(self, mp, hin, chunk):
        """Decoder, reward and continue terms (B, T) from head inputs hin (B, T, F).
        -> (dict recon_<key> / reward / cont, the reward distribution)."""
        losses = {}
        for k, pred in self.decoder.apply({"params": mp["decoder"]}, hin).items():
            if k in self.image_keys:
                losses[f"recon_{k}"] = D.mse(pred, chunk[k].astype(f32) / 255.0, 3)
            else:
                losses[f"recon_{k}"] = D.symlog_mse(pred, chunk[k], 1)
        rew = D.TwoHot(self.reward.apply({"params": mp["reward"]}, hin))
        losses["reward"] = -rew.log_prob(chunk["reward"].astype(f32))
        cont = D.Bernoulli(self.cont.apply({"params": mp["cont"]}, hin)[..., 0])
        losses["cont"] = -cont.log_prob(1.0 - chunk["is_terminal"].astype(f32))
        return losses, rew

    def world_model_loss(self, mp, batch, rng, stats=None):
        """World-model (+ DALI) loss of a (B, H + T) batch; mp: model params.

        The last T = train.batch_length steps are the chunk every world-model loss is taken
        on; the H steps before it (history) only fill context windows. stats: the running
        moments of f_psi's targets (`TrainState.align_stats`) when targets are standardised.
        Returns (scalar loss, (post, sg(ctx), metrics, updated stats or None)).
        """
        sw, scales = self.switches, self.config.train.loss_scales
        chunk, post, prior, ctx, ctx_deep, aux = self.observe_chunk(mp, batch, rng)
        losses, rew = self.prediction_losses(mp, self.head_input(post, ctx_deep), chunk)
        recon = sum(v for k, v in losses.items() if k.startswith("recon_"))
        dyn, rep, kl = R.kl_losses(post, prior, self.config.model.free_nats)
        losses["dyn"], losses["rep"] = dyn, rep
        total = (scales.recon * recon + scales.reward * losses["reward"]
                 + scales.cont * losses["cont"] + scales.dyn * dyn + scales.rep * rep)
        new_stats, align_metrics = None, {}
        if self.inferred:
            cfg = self.config.context
            align, new_stats, align_metrics = self.context_losses(mp["context"], aux, ctx, stats)
            losses.update(align)
            total = total + sum(self.context_loss_weights()[k] * v for k, v in align.items())
            if sw.crossmodal:
                cross = lambda c, s: self.cross.apply({"params": mp["context"]["cross"]}, c, s)
                chi = A.crossmodal_loss(cross, ctx, R.feat(post), cfg.chi_fit_map)
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
        return total.mean(), (post, None if ctx is None else sg(ctx), metrics, new_stats)

    def context_loss_weights(self):
        """Weights of the `context_losses` terms in the world-model loss."""
        cfg = self.config.context
        return {"dali": cfg.loss_scale}

    def context_losses(self, cp, aux, ctx, stats):
        """g_phi's own terms: the alignment loss "dali" (B, T). cp: params["context"]; aux:
        `context_chunk`'s; ctx (B, T, Cc). -> (dict, updated target moments or None,
        metrics)."""
        align, new_stats, metrics = self._alignment(cp, aux, ctx, stats)
        return {"dali": align}, new_stats, metrics

    def _alignment(self, cp, aux, ctx, stats):
        """Dynamics-alignment loss (B, T) of the windows' contexts, the updated target
        moments, and `context/gain`: the loss with contexts shuffled across the batch (rolled
        by one sequence) minus the loss with the true ones, on every 4th window (how much
        the context tells f_psi; stop-gradient)."""
        cfg = self.config.context
        obs, is_first = aux["obs_vec"], aux["is_first"]
        act = aux["action"]
        trans = A.transition_indices(aux["idx"])
        norm, new_stats = None, None
        if self.standardize:
            mean, var = A.target_moments(sg(obs), is_first, cfg.residual)
            if stats is None:  # called without a train state: this batch's moments
                stats = dict(mean=mean, var=var, count=jnp.zeros((), f32))
            d = jnp.where(stats["count"] > 0, cfg.stats_decay, 0.0)
            new_stats = dict(mean=d * stats["mean"] + (1 - d) * mean,
                             var=d * stats["var"] + (1 - d) * var, count=stats["count"] + 1)
            norm = (new_stats["mean"], jnp.sqrt(new_stats["var"] + 1e-6))
        if cfg.per_step_alignment:  # the same loss, computed per step where it can
            loss = lambda c, tr: A.alignment_loss_per_step(
                cp.get("forward"), cp.get("inverse"), obs, act, tr, c, cfg.loss, cfg.residual,
                norm, cfg.inverse_weight)
        else:
            fwd = lambda x: self.forward_head.apply({"params": cp.get("forward")}, x)
            inv = lambda x: self.inverse_head.apply({"params": cp["inverse"]}, x)
            loss = lambda c, tr: A.alignment_loss(fwd, inv, obs, act, tr, c, cfg.loss,
                                                  cfg.residual, norm, cfg.inverse_weight)
        align = loss(ctx, trans)
        # The gain on every 4th window (a metric; a quarter of the cost).
        sub = lambda x: x[:, ::4]
        gain = sg(loss(jnp.roll(sub(ctx), 1, 0), tuple(map(sub, trans))).mean()
                  - sub(align).mean())
        return align, new_stats, {"context/gain": gain}

