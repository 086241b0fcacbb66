"""A study's aggregate report in DIR/report (written by ``python -m dali_jax.study ... report``):
``analysis.report`` on the evaluated runs, mean evaluation curves, and ``index.md`` showing
every figure and listing every planned run that is missing, failed or excluded, with the
reason. Its inputs are plain data: the study's fields, its runs (name, method, setting, seed,
logdir) and their statuses (``study.rundir.RunStatus``).

Files: index.md, summary.md, summary.csv (analysis/report.py), iqm_bars.png,
heatmap_<method>_<setting>.png, curves.png and curves.csv (mean periodic evaluation return over
seeds per method and setting; the band spans the seeds).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import statistics
from collections import defaultdict
from typing import Sequence


def base_method(study, label: str) -> str:
    """The method a study's label runs (a `variants` label's method, else itself)."""
    return study.variants.get(label, label)


DALI = ("dali_s", "dali_s_chi", "dali_d")
BASELINES = ("dreamer_dr", "crssm_s", "crssm_d")
_OURS = ("index.md", "summary.md", "summary.csv", "curves.csv")


def missing_reason(st, base: str) -> str | None:
    """Why a run is not in the aggregates (log paths relative to ``base``), or None when it
    is evaluated."""
    log = os.path.relpath(st.log, base)
    if st.evaluation == "yes":
        return None
    if st.evaluation == "failed":
        return f"evaluation failed: {st.error} (log: {log})"
    reasons = {
        "pending": "not started",
        "queued": "queued on SLURM, not started",
        "running": f"running ({st.env_steps}/{st.target_steps} env steps)",
        "interrupted": f"interrupted at {st.env_steps}/{st.target_steps} env steps "
                       f"(`run` resumes it)",
        "failed": f"training failed at {st.env_steps}/{st.target_steps} env steps: "
                  f"{st.error} (log: {log})",
    }
    if st.state in reasons:
        return reasons[st.state]
    if st.evaluation == "stale":
        return "evaluated at an older checkpoint or with other settings (`evaluate` again)"
    return "trained, not evaluated (`evaluate`)"


def balance(runs) -> tuple[list, list[tuple[str, str]]]:
    """Runs (with .method, .setting, .seed) kept so that each method has the same seeds in
    every setting it has (the pooled matrices need equal counts); -> (kept, [(name, reason)])."""
    by_method = defaultdict(lambda: defaultdict(set))
    for r in runs:
        by_method[r.method][r.setting].add(r.seed)
    kept, excluded = [], []
    for r in runs:
        seeds = set.intersection(*by_method[r.method].values())
        if r.seed in seeds:
            kept.append(r)
        else:
            excluded.append((f"{r.method}/{r.setting}/s{r.seed}",
                             f"evaluated, but seed {r.seed} of {r.method} is missing in another "
                             f"setting (pooling needs the same seeds in every setting)"))
    return kept, excluded


def _normalizer(study, root: str, path: str):
    """-> (Normalizer or None, note explaining why not)."""
    from dali_jax.analysis.normalize import Normalizer, load_reference
    if not os.path.isfile(path):
        return None, (f"no random-policy reference ({os.path.relpath(path, root)}): run "
                      f"`evaluate` to compute it; no normalised scores")
    expert = None
    if study.evaluation.expert_reference:
        expert = load_reference(study.evaluation.expert_reference, "expert", study.task)
    elif study.task != "ball_in_cup":
        return None, (f"{study.task} needs expert returns: set evaluation.expert_reference; "
                      f"no normalised scores")
    return Normalizer(study.task, load_reference(path, "random", study.task), expert), ""


def _clean(out: str) -> None:
    for name in os.listdir(out):
        if name.endswith(".png") or name in _OURS:
            os.remove(os.path.join(out, name))


def build(study, root: str, runs: Sequence, configs: dict, statuses: Sequence,
          reference: str) -> str:
    """Writes DIR/report from the runs, their configs and statuses and the random-policy
    reference file; returns the path of index.md."""
    from dali_jax.analysis import report as RP
    from dali_jax.analysis.normalize import load_run_result

    out = os.path.join(os.path.abspath(root), "report")
    os.makedirs(out, exist_ok=True)
    _clean(out)
    statuses = {st.name: st for st in statuses}
    missing = [(r.name, missing_reason(statuses[r.name], out)) for r in runs
               if missing_reason(statuses[r.name], out)]
    evaluated = [r for r in runs if statuses[r.name].evaluation == "yes"]
    kept, excluded = balance(evaluated)
    notes, rep = [], None
    try:
        norm, why = _normalizer(study, root, reference)
    except ValueError as e:  # an unreadable reference file
        norm, why = None, f"no normalised scores: {e}"
    if why:
        notes.append(why)
    elif not kept:
        notes.append("no evaluated runs: nothing to aggregate")
    else:
        try:
            # Grouped by the study's label (a variant is its own row).
            results = [dataclasses.replace(load_run_result(r.logdir), method=r.method)
                       for r in kept]
            rep = RP.build_report(results, norm, reps=study.report.reps,
                                 seed=study.report.seed, confidence=study.report.confidence)
        except (ValueError, KeyError) as e:  # e.g. a reference lacking a context
            notes.append(f"no aggregates: {e.args[0] if e.args else e}")
        else:
            RP.write_report(rep, out)
    _curves(runs, out)
    index = os.path.join(out, "index.md")
    with open(index, "w") as f:
        f.write(_index(study, out, runs, statuses, missing, excluded, rep, notes, configs))
    return index


# ----------------------------------------------------------------------------- curves
def _curves(runs: Sequence, out: str) -> list:
    """Mean periodic-evaluation curve per (setting, method) over seeds -> curves.csv/png."""
    from dali_jax.analysis.curves import learning_curve, read_metrics
    groups = defaultdict(list)
    for r in runs:
        try:
            c = learning_curve(read_metrics(r.logdir))
        except FileNotFoundError:
            continue
        if c.eval_steps:
            groups[(r.setting, r.method)].append(dict(zip(c.eval_steps, c.eval_returns)))
    rows = []
    for (setting, method), curves in sorted(groups.items()):
        for step in sorted(set().union(*curves)):
            vals = [c[step] for c in curves if step in c]
            rows.append((setting, method, step, sum(vals) / len(vals), min(vals), max(vals),
                         len(vals)))
    if not rows:
        return rows
    with open(os.path.join(out, "curves.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "method", "env_step", "mean_return", "min_return", "max_return",
                    "seeds"])
        w.writerows([r[:3] + tuple(f"{v:.3f}" for v in r[3:6]) + r[6:] for r in rows])
    _plot_curves(rows, os.path.join(out, "curves.png"))
    return rows


def _plot_curves(rows, path: str) -> None:
    from dali_jax.analysis.plots import pyplot, save
    settings = sorted({r[0] for r in rows})
    fig, axes = pyplot().subplots(1, len(settings), figsize=(5 * len(settings), 3.6), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        methods = sorted({r[1] for r in rows if r[0] == setting})
        for i, m in enumerate(methods):
            pts = [r for r in rows if r[0] == setting and r[1] == m]
            x = [p[2] for p in pts]
            ax.plot(x, [p[3] for p in pts], "o-", color=f"C{i}", label=m, ms=3)
            ax.fill_between(x, [p[4] for p in pts], [p[5] for p in pts], color=f"C{i}",
                            alpha=0.15)
        ax.set_title(f"trained on {setting}")
        ax.set_xlabel("env steps")
        ax.set_ylabel("evaluation return (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, path, dpi=110)


# ----------------------------------------------------------------------------- index.md
def _iv(iv) -> str:
    return f"{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}]"


def _poi(rep, regime: str, x: str, y: str):
    """P(x > y) with its CI from the report (stored for one order of each pair)."""
    table = rep.poi.get(regime, {})
    if (x, y) in table:
        iv, n = table[(x, y)]
        return _iv(iv), n
    if (y, x) in table:
        iv, n = table[(y, x)]
        return f"{1 - iv.estimate:.3f} [{1 - iv.high:.3f}, {1 - iv.low:.3f}]", n
    return None, 0


def _headline(rep, pct: str, study) -> list[str]:
    regimes = list(rep.aggregates)
    lines = [f"## IQM of the normalised score [{pct} CI]", "",
             "| method | " + " | ".join(regimes) + " |", "|---|" + "---|" * len(regimes)]
    for m in rep.matrices:
        cells = [_iv(rep.aggregates[g][m]["iqm"]) if m in rep.aggregates[g] else "-"
                 for g in regimes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    base = lambda label: base_method(study, label.split(" ")[0])
    pairs = [(x, y) for x in rep.matrices if base(x) in DALI
             for y in rep.matrices if base(y) in BASELINES]
    lines += ["", f"## Probability of improvement of the DALI variants [{pct} CI]", ""]
    if not pairs:
        lines.append("No DALI variant and baseline (dreamer_dr, crssm_s, crssm_d) both have "
                     "evaluated runs.")
        return lines
    lines += ["| X | Y | regime | P(X > Y) | contexts |", "|---|---|---|---|---|"]
    for x, y in pairs:
        for g in regimes:
            text, n = _poi(rep, g, x, y)
            if text:
                lines.append(f"| {x} | {y} | {g} | {text} | {n} |")
    return lines


ALIGNMENT_COLUMNS = ("recipe", "loss", "inverse_weight", "residual", "standardize",
                     "loss_scale", "window", "gphi_width", "head_units")


def alignment_table(study, runs, configs) -> list[str]:
    """Markdown table of each inferred-context method's resolved alignment settings."""
    from dali_jax.config import alignment_summary
    rows = {}
    for r in runs:
        if base_method(study, r.method) in DALI and r.method not in rows:
            rows[r.method] = alignment_summary(configs[r.name])
    if not rows:
        return []
    cells = lambda v: "-" if v is None else str(v)
    return (["## Alignment settings of the DALI methods", "",
             "| method | " + " | ".join(ALIGNMENT_COLUMNS) + " |",
             "|---|" + "---|" * len(ALIGNMENT_COLUMNS)]
            + [f"| {m} | " + " | ".join(cells(a[k]) for k in ALIGNMENT_COLUMNS) + " |"
               for m, a in rows.items()] + [""])


def probe_table(study, runs) -> list[str]:
    """Markdown table of the final agent's context probe (``RUN/probe/probe.json``, written by
    ``python -m dali_jax.probe``): held-out R^2 of a linear read-out of each factor from the
    inferred context, per step and per episode mean; the median over seeds and each seed."""
    rows = defaultdict(list)
    for r in runs:
        path = os.path.join(r.logdir, "probe", "probe.json")
        if base_method(study, r.method) in DALI and os.path.isfile(path):
            with open(path) as f:
                rows[r.method].append((r.seed, json.load(f)))
    if not rows:
        return []
    lines = ["## Context probe of the final agents (held-out R^2 of a linear read-out)", "",
             "| method | factor | per step, median | per step, each seed | episode mean, "
             "median |", "|---|---|---|---|---|"]
    for m, probes in rows.items():
        for fac in probes[0][1]["r2_step"]:
            step = [p["r2_step"][fac] for _, p in probes]
            ep = [p["r2_episode_mean"][fac] for _, p in probes]
            each = ", ".join(f"s{s} {p['r2_step'][fac]:.2f}" for s, p in probes)
            lines.append(f"| {m} | {fac} | {statistics.median(step):.2f} | {each} | "
                         f"{statistics.median(ep):.2f} |")
    return lines + [""]


def _index(study, out, runs, statuses, missing, excluded, rep, notes, configs) -> str:
    pct = f"{100 * study.report.confidence:g}%"
    overrides = ", ".join(f"`{k}={v!r}`" for k, v in study.overrides.items()) or "none"
    lines = [f"# Study {study.name}: {study.task} ({study.obs})", "",
             f"- methods: " + ", ".join(
                 m if m not in study.variants else f"{m} ({study.variants[m]})"
                 for m in study.methods),
             f"- settings: {', '.join(study.settings)}; seeds: "
             f"{', '.join(map(str, study.seeds))}",
             f"- preset `{study.preset}`, overrides {overrides}",
             *[f"- {m} only: " + ", ".join(f"`{k}={v!r}`" for k, v in o.items())
               for m, o in study.method_overrides.items()],
             f"- evaluation: {study.evaluation.episodes} episodes per context on "
             f"{study.evaluation.contexts} grid contexts ({study.evaluation.mode} actions)",
             f"- {len(runs)} planned runs: {len(runs) - len(missing) - len(excluded)} aggregated, "
             f"{len(missing)} missing or failed, {len(excluded)} excluded (listed below)", ""]
    lines += alignment_table(study, runs, configs)
    if rep is not None:
        lines += _headline(rep, pct, study)
        lines += ["", "Median, mean and optimality gap per regime: [summary.md](summary.md) and "
                      "[summary.csv](summary.csv).", ""]
    lines += probe_table(study, runs)
    lines += ["## Missing, failed or excluded runs", ""]
    if missing or excluded:
        lines += [f"- `{name}`: {why}" for name, why in missing + excluded]
    else:
        lines.append("None: every planned run is evaluated and aggregated.")
    if notes or (rep is not None and rep.notes):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes + (rep.notes if rep else [])]
    figures = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    lines += ["", "## Figures", ""]
    if not figures:
        lines.append("None yet.")
    for name in figures:
        lines += [f"### {name[:-4]}", "", f"![{name[:-4]}]({name})", ""]
    lines += ["## Runs", "", "| run | state | env steps | last eval | grid eval | mean grid "
              "return |", "|---|---|---|---|---|---|"]
    for r in runs:
        st = statuses[r.name]
        lines.append(f"| {r.name} | {st.state} | {st.env_steps}/{st.target_steps} | "
                     f"{'-' if st.last_eval is None else f'{st.last_eval:.1f}'} | "
                     f"{st.evaluation} | "
                     f"{'-' if st.grid_return is None else f'{st.grid_return:.1f}'} |")
    return "\n".join(lines) + "\n"
