"""The six methods of the study as recipes over the context options of the model.

Each recipe sets `config.context.*` switches:
- source: "none" | "ground_truth" (normalised true context from the env) | "inferred" (g_phi);
- encoder_input: the context is an extra input of the world-model encoder (MLP branch);
- decoder_target: the decoder also reconstructs the context;
- posterior: the context is appended to [h_t, embed_t] before the posterior (shallow);
- dynamics: the context enters the RSSM img_step input next to z and a (deep);
- heads: the context is an input of decoder, reward, continue, actor and critic (deep);
- crossmodal: the chi term (lambda_cross) is added.

| method      | source        | what the model sees                                          |
|-------------|---------------|--------------------------------------------------------------|
| dreamer_dr  | none          | nothing of the context (DreamerV3 + domain randomisation)    |
| crssm_s     | ground_truth  | encoder input + decoder target (Prasanna et al. "concat")    |
| crssm_d     | ground_truth  | img_step input + every head, actor and critic ("cRSSM")      |
| dali_s      | inferred      | posterior input (shallow)                                    |
| dali_s_chi  | inferred      | dali_s + cross-modal term                                    |
| dali_d      | inferred      | posterior + img_step + every head, actor and critic (deep)   |

Ground-truth context reaches only the cRSSM methods (unless `context.release_compat`, which
reproduces the public release's leak of the true context into the shallow DALI encoder).
"""
from __future__ import annotations

import dataclasses

METHODS = ("dreamer_dr", "crssm_s", "crssm_d", "dali_s", "dali_s_chi", "dali_d")

RECIPES = {
    "dreamer_dr": dict(source="none"),
    "crssm_s": dict(source="ground_truth", encoder_input=True, decoder_target=True),
    "crssm_d": dict(source="ground_truth", dynamics=True, heads=True),
    "dali_s": dict(source="inferred", posterior=True),
    "dali_s_chi": dict(source="inferred", posterior=True, crossmodal=True),
    "dali_d": dict(source="inferred", posterior=True, dynamics=True, heads=True),
}


DROPPABLE = ("posterior", "dynamics", "heads")


@dataclasses.dataclass(frozen=True)
class Switches:
    """Where the context goes (see the module docstring); `gt_into_encoder`: the release's
    leak of the true context into the shallow DALI encoders (release_compat only)."""
    source: str = "none"
    encoder_input: bool = False
    decoder_target: bool = False
    posterior: bool = False
    dynamics: bool = False
    heads: bool = False
    crossmodal: bool = False
    gt_into_encoder: bool = False


def recipe(method: str, shallow_into_dynamics: bool = False, release_compat: bool = False,
           chi_deep: bool = False, drop: tuple = ()):
    """Context switches of `method` (`Switches`).

    shallow_into_dynamics: the release also feeds c to img_step for shallow variants.
    chi_deep: DALI-D gets the cross-modal chi term too (the release's config default).
    release_compat: the release's wiring (its DALI-D has no posterior input; its shallow
    DALI encoders get the true context; c also enters img_step for every DALI variant).
    drop: switches among DROPPABLE turned off afterwards, for ablations (dali_d with
    drop=("dynamics",) keeps c out of the prior; drop=("heads",) out of the heads, actor
    and critic).
    """
    if method not in RECIPES:
        raise ValueError(f"config.method must be one of {', '.join(METHODS)}; got {method!r}")
    out = dict(source="none", encoder_input=False, decoder_target=False, posterior=False,
               dynamics=False, heads=False, crossmodal=False)
    out.update(RECIPES[method])
    if out["source"] == "inferred":
        if chi_deep and method == "dali_d":
            out["crossmodal"] = True
        if shallow_into_dynamics:
            out["dynamics"] = True
        if release_compat:
            out["dynamics"] = True
            if method == "dali_d":
                out["posterior"] = False
            else:
                out["gt_into_encoder"] = True
    for name in drop:
        if name not in DROPPABLE:
            raise ValueError(f"config.context.drop: {name!r} is not one of "
                             f"{', '.join(DROPPABLE)}")
        out[name] = False
    return Switches(**out)


def parse_drop(value: str) -> tuple:
    """`context.drop` ("" or comma-separated switch names) -> tuple of names."""
    return tuple(n.strip() for n in str(value).split(",") if n.strip())


def config_switches(config):
    """The context switches of an experiment config (method recipe + context options)."""
    ctx = config.context
    return recipe(config.method, ctx.shallow_into_dynamics, ctx.release_compat, ctx.chi_deep,
                  parse_drop(ctx.get("drop", "")))
