"""The actor-critic side of the agent: imagination from posterior states and the actor and
critic objectives (DreamerV3). A mixin of `Agent` (it reads the networks `Agent` builds)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dali_jax.models import behavior as B
from dali_jax.models import distributions as D
from dali_jax.models import fastgrad as FG
from dali_jax.models import nets as N
from dali_jax.models import rssm as R

f32 = jnp.float32
sg = jax.lax.stop_gradient
tmap = jax.tree_util.tree_map


class ActorCritic:
    def policy_dist(self, actor_params, hin):
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
            d = self.policy_dist(actor_params, sg(hin))
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

        ctx_dyn = ctx if sw.dynamics else None
        traj = R.imagine(self.rssm, params["rssm"], policy, start,
                         self.config.train.imag_horizon, rng, ctx_dyn, outputs)
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

