"""The alignment recipes (`context.alignment`): the paper's loss computed by hand against the
agent's, the recipes' fields, and their errors."""
import jax
import numpy as np
import pytest

from dali_jax import config as config_lib
from dali_jax import overrides, presets
from dali_jax.agent import Agent, Spec
from experiments import ball_in_cup

B, T, K, DO, A = 2, 10, 4, 5, 2


def _agent(alignment):
    c = config_lib.get_config()
    c.method = "dali_d"
    c.model.size = "nano"
    c.model.encdec_release_quirk = False
    c.train.batch_size, c.train.batch_length, c.train.imag_horizon = B, T, 3
    c.context.window, c.context.hidden, c.context.head_units = K, 8, 8
    c.compute_dtype, c.xla_opt_level = "float32", 0
    config_lib.set_alignment(c, alignment)
    spec = Spec(obs={"obs": ((DO,), np.float32), "context": ((2,), np.float32)}, action_dim=A)
    return Agent(c, spec)


def _batch(L, seed=0):
    rng = np.random.default_rng(seed)
    first = np.zeros((B, L), bool)
    first[:, 0] = True
    first[1, 7] = True  # an episode starts inside the second sequence
    return dict(obs=rng.normal(size=(B, L, DO)).astype(np.float32) * 3 + 1,
                context=np.zeros((B, L, 2), np.float32),
                action=rng.uniform(-1, 1, (B, L, A)).astype(np.float32),
                reward=rng.uniform(0, 1, (B, L)).astype(np.float32), is_first=first,
                is_last=np.zeros((B, L), bool), is_terminal=np.zeros((B, L), bool))


def _mlp(p, x):
    """f_psi by hand: SiLU(x W + b) per hidden layer, then a linear output layer."""
    silu = lambda v: v / (1 + np.exp(-v))
    for i in range(len(p) - 1):
        x = silu(x @ np.asarray(p[f"h{i}"]["kernel"]) + np.asarray(p[f"h{i}"]["bias"]))
    return x @ np.asarray(p["out"]["kernel"]) + np.asarray(p["out"]["bias"])


def test_paper_recipe_trains_the_papers_loss():
    """alignment=paper: the agent's "dali" term equals, for every window of the chunk,
    mean over its transitions j -> j + 1 of mean_d (f_psi([o_j, a_j, c_t]) - o_{j+1})^2, raw
    next observation, weight 1, computed by hand from f_psi's parameters (a residual or
    standardised target, or an inverse term, changes it)."""
    agent = _agent("paper")
    assert agent.history == K
    L = K + T
    batch = _batch(L)
    state = agent.init(jax.random.PRNGKey(1))
    mp = agent.model_params(state.params)
    assert set(mp["context"]) == {"encoder", "cross", "forward"}  # no inverse head
    assert state.align_stats is None  # no running moments: targets are not standardised
    _, (_, ctx, metrics, _) = jax.jit(agent.world_model_loss)(mp, batch, jax.random.PRNGKey(2))
    ctx = np.asarray(ctx)  # (B, T, Cc): the contexts of the chunk's steps L - T .. L - 1
    f = mp["context"]["forward"]
    obs, act, first = batch["obs"], batch["action"], batch["is_first"]
    want = []
    for b in range(B):
        for i, t in enumerate(range(L - T, L)):
            start = max(s for s in range(t + 1) if first[b, s])
            errs = [np.mean((_mlp(f, np.concatenate([obs[b, j], act[b, j], ctx[b, i]]))
                             - obs[b, j + 1]) ** 2)
                    for j in range(max(start, t - K + 1), t)]
            want.append(np.mean(errs) if errs else 0.0)
    np.testing.assert_allclose(float(metrics["loss/dali"]), np.mean(want), rtol=1e-5)
    assert agent.config.context.loss_scale == 1.0


def test_recipes_fix_their_fields_and_name_them_in_errors():
    c = config_lib.get_config()
    assert c.context.alignment == "paper"  # the default, and so `--preset paper`'s
    assert {k: c.context[k] for k in ("loss", "residual", "standardize", "loss_scale")} == dict(
        loss="forward", residual=False, standardize=False, loss_scale=1.0)
    parse = lambda *a: overrides.parse(ball_in_cup.get_config, list(a), presets.NAMES)
    proj = parse("--config.context.alignment=project").context
    assert (proj.loss, proj.inverse_weight, proj.residual, proj.standardize) == (
        "both", 30.0, True, True)
    assert parse("--preset=first").context.alignment == "project"
    assert parse("--preset=cpu", "--config.context.alignment=inverse").context.loss == "inverse"
    with pytest.raises(ValueError, match=r"alignment='paper' fixes context.residual=False, got "
                                         r"True: set config.context.alignment=custom"):
        parse("--config.context.residual=true")
    with pytest.raises(ValueError, match=r"alignment='project' fixes context.loss='both'"):
        parse("--config.context.alignment=project", "--config.context.loss=inverse")
    with pytest.raises(overrides.UsageError, match=r"alignment must be one of paper, project, "
                                                r"inverse, custom; got 'papr'"):
        parse("--config.context.alignment=papr")
    custom = parse("--config.context.alignment=custom", "--config.context.loss=both",
                   "--config.context.inverse_weight=5").context
    assert (custom.loss, custom.inverse_weight, custom.residual) == ("both", 5.0, False)
    # the summary the reports print
    s = config_lib.alignment_summary(parse("--preset=first"))
    assert s == dict(recipe="project", loss="both", inverse_weight=30.0, residual=True,
                     standardize=True, loss_scale=1.0, window=32, gphi_width=32, head_units=32)
