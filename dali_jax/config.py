"""Default configuration, size presets and start-up validation.

Every option a user can set is a field of the ConfigDict returned by `get_config()`;
`validate(config)` raises a ValueError naming the field and the valid values.
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_flags import config_path

from dali_jax.methods import DROPPABLE, METHODS, RECIPES, config_switches, parse_drop

# deter / units / layers / cnn_depth (DreamerV3 sizes) plus tiny ones for tests and CPU runs.
SIZES = {
    "nano": dict(deter=32, units=32, layers=1, cnn_depth=4, stoch=4, classes=4),
    "tiny": dict(deter=64, units=64, layers=1, cnn_depth=8, stoch=8, classes=8),
    "mini": dict(deter=128, units=128, layers=2, cnn_depth=16, stoch=16, classes=16),
    "small": dict(deter=512, units=512, layers=2, cnn_depth=32, stoch=32, classes=32),
    "medium": dict(deter=1024, units=640, layers=3, cnn_depth=48, stoch=32, classes=32),
    "large": dict(deter=2048, units=768, layers=4, cnn_depth=64, stoch=32, classes=32),
    "xlarge": dict(deter=4096, units=1024, layers=5, cnn_depth=96, stoch=32, classes=32),
}

# g_phi hidden width / f_psi units per model size when context.hidden / head_units are 0.
CTX_SIZES = {"nano": (16, 16), "tiny": (64, 64), "mini": (128, 128), "small": (256, 128),
             "medium": (256, 128), "large": (256, 128), "xlarge": (256, 128)}

TASKS = ("ball_in_cup", "walker")
OBS_MODES = ("features", "pixels")
SETTINGS = ("default", "single_0", "single_1", "double_box", "specific")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "ball_in_cup"  # ball_in_cup | walker
    c.obs = "features"  # features | pixels
    c.method = "dali_d"  # one of methods.METHODS
    c.seed = 0
    c.logdir = ""  # empty: runs/<task>_<method>_<obs>_<setting>_s<seed>
    c.context_setting = "double_box"  # default | single_0 | single_1 | double_box | specific
    c.num_contexts = 100  # contexts sampled for the training set
    c.specific_context = ml_collections.ConfigDict({"factor_0": -1.0, "factor_1": -1.0})
    c.compute_dtype = "auto"  # auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16
    # XLA backend (LLVM) optimisation level of the agent's compiled functions: -1 = XLA's
    # default (2). 0 compiles about 30% faster and runs CPU steps about 2x slower: for tests
    # and debugging runs that are mostly compilation.
    c.xla_opt_level = -1  # -1 | 0 | 1 | 2 | 3

    m = c.model = ml_collections.ConfigDict()
    m.size = "small"  # nano | tiny | mini | small | medium | large | xlarge
    m.encdec_release_quirk = True  # encoder/decoder MLPs 5 x 1024 at every size (release)
    m.encdec_layers = 5  # used with the quirk
    m.encdec_units = 1024  # used with the quirk
    m.unimix = 0.01
    m.free_nats = 1.0
    m.action_clip = 1.0
    # Image encoder/decoder convolutions: native XLA convolutions, or their exact rewrite as
    # space-to-depth + one matmul (models/conv.py). auto: matmul on CPU, native on GPU/TPU.
    m.conv_impl = "auto"  # auto | native | matmul
    # The update's hand-written gradients (models/fastgrad.py: LayerNorm backward, deferred
    # kernel gradients of the filter, the critic's routed forward). False: plain autodiff
    # everywhere, for jax.jvp / jax.linearize / Hessians through the model (same values
    # and gradients, slower).
    m.custom_vjp = True

    x = c.context = ml_collections.ConfigDict()
    x.encoder = "transformer"  # transformer | attention | gru | mlp
    # g_phi width H and f_psi / inverse-head units; 0 ties them to model.size (CTX_SIZES:
    # the paper's 256 / 128 from `small` up, narrower below so g_phi does not dominate).
    x.hidden = 0
    x.dim = 8
    x.window = 64  # K
    x.readout = "flatten"  # flatten (release; ties g_phi to K) | mean (+ positional embeddings)
    # Steps sampled before each training chunk, used only to fill context windows, so that
    # training windows equal acting windows. -1: K for inferred-context methods, else 0;
    # 0: windows cut at the chunk start.
    x.history = -1
    # Dynamics alignment: the loss that trains g_phi. `alignment` names a recipe of the
    # fields below (ALIGNMENTS; docs/method.md): paper (the paper's f_psi([o_j, a_j, c]) ->
    # o_{j+1}, plain MSE, weight 1) | project (this project's: forward + 30 x inverse, the
    # forward target residual and standardised) | inverse (the inverse head alone) | custom
    # (the fields as set). With a named recipe the fields must keep the recipe's values.
    x.alignment = "paper"
    x.loss = "forward"  # forward (f_psi) | inverse (inv([o_j, o_{j+1}, c]) -> a_j) | both
    x.inverse_weight = 30.0  # loss=both: forward + inverse_weight * inverse
    x.residual = False  # forward target o_{j+1} - o_j instead of o_{j+1}
    x.standardize = False  # forward targets standardised per dim with running moments
    x.stats_decay = 0.99  # EMA decay of those moments (kept in the train state)
    x.loss_scale = 1.0
    # Compute the alignment loss from per-step parts (models/alignment.alignment_loss_per_step,
    # equal in values and gradients; benchmarks/RESULTS.md: the A/B) instead of running the
    # heads on every (window, transition) pair; False: the plain formula.
    x.per_step_alignment = True
    x.head_units = 0  # 0: tied to model.size (see hidden)
    x.head_layers = 2
    x.lambda_cross = 1.0
    x.chi_fit_map = True  # also fit the c -> s map of the chi term, on sg(c)
    x.chi_deep = False  # DALI-D gets the chi term too (the release's config default)
    x.shallow_into_dynamics = False  # release: c into img_step for shallow variants too
    x.release_compat = False  # reproduce the release's defects 1-3 (see methods.py)
    # Ablation: comma-separated recipe switches turned off (posterior, dynamics, heads), e.g.
    # dali_d with "dynamics" keeps c out of the prior (img_step); "" keeps the recipe.
    x.drop = ""

    t = c.train = ml_collections.ConfigDict()
    t.batch_size = 16
    t.batch_length = 64
    t.imag_horizon = 15
    t.horizon = 333  # gamma = 1 - 1/horizon
    t.return_lambda = 0.95
    t.actent = 3e-4
    t.slow_critic_fraction = 0.02
    t.slowreg = 1.0
    t.retnorm_decay = 0.99
    t.model_lr = 1e-4
    t.model_eps = 1e-8
    t.model_clip = 1000.0
    t.actor_lr = 3e-5
    t.actor_eps = 1e-5
    t.actor_clip = 100.0
    t.critic_lr = 3e-5
    t.critic_eps = 1e-5
    t.critic_clip = 100.0
    t.loss_scales = ml_collections.ConfigDict(dict(
        recon=1.0, reward=1.0, cont=1.0, dyn=0.5, rep=0.1))

    r = c.run = ml_collections.ConfigDict()
    r.steps = 200_000  # env steps
    r.num_envs = 4
    r.train_ratio = 512.0  # replayed steps per env step
    r.prefill = 1024  # random-policy env steps before training
    # Control steps each uniform random prefill action is held: 1 draws i.i.d. actions
    # (DreamerV3); 10 (0.2 s in Ball-in-Cup) swings the ball into the cup in about 1 episode
    # in 4 where i.i.d. actions never do (benchmarks/RESULTS.md, learning checks).
    r.prefill_hold = 1
    r.replay_capacity = 1_000_000
    r.log_every_s = 60.0
    r.save_every_s = 600.0
    r.eval_every = 10_000  # env steps; 0 disables periodic evaluation
    r.eval_episodes = 4
    r.eval_contexts = 3  # held-out contexts of the grid evaluated periodically
    r.episode_length = 1000
    r.parallel_envs = True  # subprocess envs
    r.devices = 0  # 0: all local devices for data parallelism
    # An update whose loss terms, gradient norms or batch inputs are non-finite is skipped
    # (the train state is kept as it was); this many consecutive skips stop the run with an
    # error naming the offending terms, the latest checkpoint left as it was.
    r.max_nonfinite = 100
    # A periodic checkpoint save that fails (disk full, unwritable directory) is logged as
    # an error and retried after run.save_every_s; this many consecutive failures are
    # tolerated, the next one stops the run with the error (0: the first one stops it).
    # A failed final save (end of run, SIGINT/SIGTERM) is always an error.
    r.max_save_failures = 3
    # jax.transfer_guard level of the acting/update hot path: allow | log | disallow.
    # "disallow" fails on any implicit host<->device transfer (a hidden per-step sync);
    # "log" names them (for tracing a slow accelerator run).
    r.transfer_guard = "allow"
    return c


# Alignment recipes: context.alignment -> the context fields it fixes.
ALIGNMENTS = {
    # The paper: f_psi([o_j, a_j, c]) -> o_{j+1}, MSE on the raw next observation (the next
    # embedding for pixels), weight 1, on the transitions inside the window.
    "paper": dict(loss="forward", inverse_weight=30.0, residual=False, standardize=False,
                  loss_scale=1.0),
    # This project's: forward + 30 x inverse; the forward target o_{j+1} - o_j, standardised
    # per dimension with running moments (benchmarks/RESULTS.md, alignment recipes).
    "project": dict(loss="both", inverse_weight=30.0, residual=True, standardize=True,
                    loss_scale=1.0),
    # The inverse head alone, inv([o_j, o_{j+1}, c]) -> a_j (the CPU study of
    # experiments/studies/ball_in_cup_cpu.py).
    "inverse": dict(loss="inverse", inverse_weight=30.0, residual=False, standardize=False,
                    loss_scale=1.0),
}
ALIGNMENT_NAMES = tuple(ALIGNMENTS) + ("custom",)


def set_alignment(config, name: str):
    """Sets config.context.alignment to `name` and the fields its recipe fixes. -> config."""
    _choice("context.alignment", name, ALIGNMENT_NAMES)
    config.context.alignment = name
    for field, value in ALIGNMENTS.get(name, {}).items():
        config.context[field] = value
    return config


def alignment_summary(config) -> dict:
    """The resolved alignment settings of a config: recipe, loss fields, K and the widths of
    g_phi (H) and f_psi / the inverse head (dict of plain values)."""
    x = config.context
    s = resolve_sizes(config)
    return dict(recipe=x.get("alignment", "custom"), loss=x.loss,
                inverse_weight=x.inverse_weight if x.loss == "both" else None,
                residual=x.residual, standardize=x.standardize, loss_scale=x.loss_scale,
                window=x.window, gphi_width=s["ctx_hidden"], head_units=s["ctx_head_units"])


def resolve_sizes(config) -> dict:
    """Concrete network sizes for config.model.size (+ the release's enc/dec quirk)."""
    s = dict(SIZES[config.model.size])
    if config.model.encdec_release_quirk:
        s["enc_layers"], s["enc_units"] = config.model.encdec_layers, config.model.encdec_units
    else:
        s["enc_layers"], s["enc_units"] = s["layers"], s["units"]
    ctx_hidden, ctx_head = CTX_SIZES[config.model.size]
    s["ctx_hidden"] = config.context.hidden or ctx_hidden
    s["ctx_head_units"] = config.context.head_units or ctx_head
    return s


def history_steps(config) -> int:
    """Steps of context history before each training chunk (config.context.history resolved:
    -1 -> K for the inferred-context methods, 0 for the others and for release_compat)."""
    h = config.context.history
    inferred = RECIPES[config.method].get("source") == "inferred"
    if not inferred or config.context.release_compat:
        return 0
    return config.context.window if h < 0 else int(h)


def _validate_drop(config):
    drop = config.context.get("drop", "")
    if not isinstance(drop, str):
        raise ValueError("config.context.drop must be a string: \"\" or comma-separated names "
                         f"among {', '.join(DROPPABLE)}; got {drop!r}")
    if not parse_drop(drop):
        return
    sw = config_switches(config)  # raises on unknown names
    if sw.source == "none":
        raise ValueError(f"config.context.drop={drop!r}: method {config.method!r} has no "
                         "context to drop")
    if sw.source == "inferred" and not (sw.posterior or sw.dynamics or sw.heads
                                           or sw.crossmodal):
        raise ValueError(f"config.context.drop={drop!r} leaves method {config.method!r} "
                         "without any use of the inferred context")


def _validate_alignment(config):
    name = config.context.get("alignment", "custom")
    _choice("context.alignment", name, ALIGNMENT_NAMES)
    for field, value in ALIGNMENTS.get(name, {}).items():
        if config.context[field] != value:
            raise ValueError(
                f"config.context.alignment={name!r} fixes context.{field}={value!r}, got "
                f"{config.context[field]!r}: set config.context.alignment=custom to choose "
                f"the alignment fields one by one")


def _choice(name, value, options):
    if value not in options:
        raise ValueError(f"config.{name} must be one of {', '.join(map(str, options))}; "
                         f"got {value!r}")


def _positive(name, value, integer=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"config.{name} must be {kind}; got {value!r}")


def validate(config) -> None:
    """Check every user-facing field; raises ValueError naming the field and valid values."""
    _choice("task", config.task, TASKS)
    _choice("obs", config.obs, OBS_MODES)
    _choice("method", config.method, METHODS)
    _choice("context_setting", config.context_setting, SETTINGS)
    _choice("compute_dtype", config.compute_dtype, ("auto", "float32", "bfloat16"))
    _choice("xla_opt_level", config.xla_opt_level, (-1, 0, 1, 2, 3))
    _choice("model.size", config.model.size, tuple(SIZES))
    _choice("model.conv_impl", config.model.conv_impl, ("auto", "native", "matmul"))
    _choice("context.encoder", config.context.encoder, ("transformer", "attention", "gru", "mlp"))
    _choice("context.readout", config.context.readout, ("flatten", "mean"))
    _choice("context.loss", config.context.loss, ("forward", "inverse", "both"))
    for name in ("context.hidden", "context.head_units"):
        v = config_path.get_value(name, config)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"config.{name} must be 0 (tied to model.size) or a positive "
                             f"integer; got {v!r}")
    if not (isinstance(config.context.history, int) and config.context.history >= -1):
        raise ValueError("config.context.history must be -1 (K for inferred-context methods) "
                         f"or an integer >= 0; got {config.context.history!r}")
    if not (isinstance(config.context.inverse_weight, (int, float))
            and config.context.inverse_weight > 0):
        raise ValueError("config.context.inverse_weight must be a number > 0; "
                         f"got {config.context.inverse_weight!r}")
    if not 0.0 <= config.context.stats_decay < 1.0:
        raise ValueError("config.context.stats_decay must be in [0, 1); "
                         f"got {config.context.stats_decay!r}")
    _validate_drop(config)
    for name in ("context.window", "context.dim", "context.head_layers",
                 "train.batch_size", "train.batch_length", "train.imag_horizon",
                 "run.num_envs", "num_contexts", "model.encdec_layers", "model.encdec_units",
                 "run.episode_length", "run.prefill_hold"):
        _positive(name, config_path.get_value(name, config), integer=True)
    for name in ("train.horizon", "train.model_lr", "train.actor_lr", "train.critic_lr",
                 "train.model_clip", "train.actor_clip", "train.critic_clip", "run.train_ratio"):
        _positive(name, config_path.get_value(name, config))
    if not 0.0 <= config.train.return_lambda <= 1.0:
        raise ValueError(f"config.train.return_lambda must be in [0, 1]; "
                         f"got {config.train.return_lambda!r}")
    if not 0.0 < config.train.slow_critic_fraction <= 1.0:
        raise ValueError("config.train.slow_critic_fraction must be in (0, 1]; "
                         f"got {config.train.slow_critic_fraction!r}")
    run = config.run
    _choice("run.transfer_guard", run.get("transfer_guard", "allow"), ("allow", "log", "disallow"))
    if not _is_int(run.get("max_nonfinite", 100)) or run.get("max_nonfinite", 100) < 1:
        raise ValueError("config.run.max_nonfinite must be a positive integer (consecutive "
                         f"skipped non-finite updates that stop the run); "
                         f"got {run.get('max_nonfinite')!r}")
    if not _is_int(run.get("max_save_failures", 3)) or run.get("max_save_failures", 3) < 0:
        raise ValueError("config.run.max_save_failures must be an integer >= 0 (consecutive "
                         "failed periodic checkpoint saves tolerated); "
                         f"got {run.get('max_save_failures')!r}")
    if config.run.steps < 0 or config.run.prefill < 0:
        raise ValueError("config.run.steps and config.run.prefill must be >= 0")
    if config.context.release_compat and config.context.loss != "forward":
        raise ValueError("config.context.release_compat reproduces the release, whose alignment "
                         "loss is forward (f_psi): set config.context.loss=forward "
                         f"(got {config.context.loss!r})")
    _validate_alignment(config)
    if config.context.release_compat and config.context.window != config.train.batch_length:
        raise ValueError("config.context.release_compat uses the full training chunk as the "
                         "window: config.context.window must equal config.train.batch_length "
                         f"({config.context.window} != {config.train.batch_length})")


def with_defaults(saved: dict, defaults: dict) -> dict:
    """A saved config (nested dicts, e.g. config.json) with the fields it lacks taken from
    ``defaults``, recursively: an option added after the run was written takes its default."""
    out = dict(saved)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = with_defaults(out[k], v)
    return out


def differences(a: dict, b: dict, names=("a", "b"), limit: int = 8) -> str:
    """The fields where nested dicts ``a`` and ``b`` differ, as one line ('' when equal),
    e.g. with names ("run", "study"): "model.units: run has 512, study has 256; ..."."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out
    a, b = flat(a), flat(b)
    diffs = [f"{k}: {names[0]} has {a.get(k, '<absent>')!r}, {names[1]} has "
             f"{b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:limit]) + (f"; ... ({len(diffs)} fields)" if len(diffs) > limit
                                       else "")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def set_field(config, dotted: str, value):
    """Sets the existing field 'a.b.c' of config (ml_collections' config_path: an error for
    a missing one); 'context.alignment' also sets the fields of its recipe
    (`set_alignment`). -> config."""
    if dotted == "context.alignment":
        return set_alignment(config, value)
    config_path.get_value(dotted, config)  # the field exists
    config_path.set_value(dotted, config, value)
    return config
