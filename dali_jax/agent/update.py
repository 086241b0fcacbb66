"""The pure update of the agent: one optimiser step of the world model (with g_phi, f_psi and
the chi heads), then of the actor and critic in imagination from every posterior state, under
a non-finite guard. A mixin of `Agent` (it reads the networks and optimisers `Agent` builds);
`Agent.train_step` is the jit of `update` with the state donated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

f32 = jnp.float32
tmap = jax.tree_util.tree_map


class Update:
    def _world_model_update(self, state, batch, rng):
        """One optimiser step of the world model (+ g_phi, f_psi, chi heads).
        -> (state with new params / model optimiser / align_stats, post, ctx_wm, metrics)."""
        p = state.params
        mp = self.model_params(p)
        (_, (post, ctx_wm, metrics, stats)), grads = jax.value_and_grad(
            self.world_model_loss, has_aux=True)(mp, batch, rng, state.align_stats)
        if self.release_compat and "context" in grads:
            grads["context"] = tmap(jnp.zeros_like, grads["context"])  # release defect 1
        metrics["grad_norm/model"] = optax.tree_utils.tree_norm(grads)
        upd, opt_model = self.opt["model"].update(grads, state.opt["model"], mp)
        new = state.replace(params=dict(p, **optax.apply_updates(mp, upd)),
                            opt=dict(state.opt, model=opt_model))
        if stats is not None:
            new = new.replace(align_stats=stats)
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
        key = jax.random.fold_in(rng, state.step)
        new, _, _, metrics = self._world_model_update(state, batch, key)
        return self._finite_or_keep(new.replace(step=state.step + 1), state, batch, metrics)

    def update(self, state, batch, rng):
        """One training update (world model, then actor and critic in imagination), pure:
        `train_step` is its jit with the state donated. -> (state, metrics)."""
        cfg = self.config.train
        k_wm, k_img = jax.random.split(jax.random.fold_in(rng, state.step))
        metrics = {}

        # World model (+ g_phi, f_psi, chi heads).
        wm, post, ctx_wm, m = self._world_model_update(state, batch, k_wm)
        metrics.update(m)
        p = dict(wm.params)
        opt_model = wm.opt["model"]
        full_batch, batch = batch, self.split_history(batch)[1]

        # Actor and critic in imagination from every posterior state (B * T starts): one
        # gradient of both losses (each reaches only its own network; see behavior_objective).
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        start = tmap(flat, post)
        ctx0 = None if ctx_wm is None else flat(ctx_wm)
        ac = {"actor": p["actor"], "critic": p["critic"]}
        (_, aux), g = jax.value_and_grad(
            lambda q: self.behavior_objective(dict(p, **q), state.slow_critic,
                                              state.retnorm, start, ctx0,
                                              flat(batch["is_terminal"]), k_img),
            has_aux=True)(ac)
        a_grads, c_grads = g["actor"], g["critic"]
        a_loss, c_loss = aux["loss/actor"], aux["loss/critic"]
        upd, opt_actor = self.opt["actor"].update(a_grads, state.opt["actor"], p["actor"])
        p["actor"] = optax.apply_updates(p["actor"], upd)
        upd, opt_critic = self.opt["critic"].update(c_grads, state.opt["critic"],
                                                    p["critic"])
        p["critic"] = optax.apply_updates(p["critic"], upd)
        frac = cfg.slow_critic_fraction
        slow = tmap(lambda s, c: (1 - frac) * s + frac * c, state.slow_critic, p["critic"])

        traj = aux["traj"]
        metrics.update({
            "loss/actor": a_loss, "loss/critic": c_loss,
            "grad_norm/actor": optax.tree_utils.tree_norm(a_grads),
            "grad_norm/critic": optax.tree_utils.tree_norm(c_grads),
            "behavior/entropy": aux["ent"].mean(), "behavior/return": aux["ret"].mean(),
            "behavior/imag_reward": traj["reward"][1:].mean(),
            "behavior/retnorm_scale": aux["scale"], "behavior/adv_std": aux["adv"].std(),
        })
        new = wm.replace(params=p, slow_critic=slow,
                         opt=dict(model=opt_model, actor=opt_actor, critic=opt_critic),
                         retnorm=aux["retnorm"], step=state.step + 1)
        return self._finite_or_keep(new, state, full_batch, metrics)
