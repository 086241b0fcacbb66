"""``python -m dali_jax.study STUDY_FILE --dir DIR {plan,run,status,evaluate,report,all}``.

- plan: the runs (one logdir each under DIR/runs, named method/setting/seed) and their cost;
- run: trains every run that is not finished, resuming interrupted ones; safe to repeat;
- status: done / running / queued / failed / interrupted / pending per run;
- evaluate: evaluates finished runs on the grid (random-policy reference cached in DIR);
- report: DIR/report/index.md and the aggregate tables and figures;
- all: run, evaluate, report (waiting for SLURM jobs).
Exit status: 0, 1 when a job failed, 2 on a bad study file or a run started with another
configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Sequence

from dali_jax.study import plan as P
from dali_jax.study import spec
from dali_jax.study import stages
from dali_jax.study import state as S

COMMANDS = ("plan", "run", "status", "evaluate", "report", "all")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dali_jax.study", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train, evaluate and report a zero-shot study from one study file.\n\n"
                    + __doc__.split("\n\n", 1)[1],
        epilog="Example: python -m dali_jax.study experiments/studies/ball_in_cup_cpu.py "
               "--dir runs/studies/bic_cpu all")
    p.add_argument("study", metavar="STUDY_FILE", help="study file (experiments/studies/*.py)")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--dir", required=True, help="study directory (runs, references, report)")
    p.add_argument("--backend", choices=spec.BACKENDS, default=None,
                   help="override the study file's backend.name")
    p.add_argument("--concurrency", type=int, default=None,
                   help="local backend: jobs at once (default: the study file; 0: one per GPU, "
                        "else one per 2 CPU cores)")
    p.add_argument("--wait", action="store_true",
                   help="slurm backend: wait for the submitted jobs (`all` always waits)")
    p.add_argument("--force", action="store_true",
                   help="evaluate: evaluate again runs already evaluated")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


class Context:
    """The loaded study, its runs and their configs, and the command-line options."""

    def __init__(self, args):
        self.args = args
        self.study = spec.load(args.study)
        if args.backend:
            self.study.backend.name = args.backend
        if args.concurrency is not None:
            if args.concurrency < 0:
                raise spec.StudyError(f"--concurrency must be >= 0; got {args.concurrency}")
            self.study.backend.local.concurrency = args.concurrency
        self.root = os.path.abspath(args.dir)
        self.runs = P.plan_runs(self.study, self.root)
        self.configs = P.run_configs(self.study, self.runs)
        self._base: dict = {}

    def conflict(self, run) -> str | None:
        """How ``run``'s started config differs from the plan (P.config_conflict), or None."""
        if not os.path.isfile(os.path.join(run.logdir, "config.json")):
            return None
        if run.name not in self._base:
            self._base[run.name] = P.base_config(self.study, run)
        return P.config_conflict(run, self.configs[run.name], self._base[run.name])

    def job_state(self):
        if self.study.backend.name != "slurm":
            return None
        from dali_jax.study import slurm
        return slurm.job_state

    def statuses(self) -> list[S.RunStatus]:
        return [S.run_status(r, int(self.configs[r.name].run.steps),
                             self.study.evaluation.episodes,
                             stages.eval_indices(self.study, r.setting), self.job_state())
                for r in self.runs]


# ----------------------------------------------------------------------------- commands
def cmd_plan(ctx: Context) -> int:
    s = ctx.study
    rates = measured_rates(ctx)
    print(f"study {s.name}: {s.task} ({s.obs}), preset {s.preset}, {len(ctx.runs)} runs under "
          f"{os.path.join(ctx.root, 'runs')}")
    rows = [("run", "state", "env steps", "updates", "eval env steps", "est. hours")]
    costs = []
    for st, r in zip(ctx.statuses(), ctx.runs):
        c = P.estimate(s, r, ctx.configs[r.name], rates)
        costs.append(c)
        rows.append((r.name, st.state, f"{c.env_steps:,}", f"{c.updates:,}",
                     f"{c.eval_steps:,}", "?" if c.total_s is None else f"{c.total_s / 3600:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip())
    print(f"total: {sum(c.env_steps for c in costs):,} env steps, "
          f"{sum(c.updates for c in costs):,} updates, "
          f"{sum(c.eval_steps for c in costs):,} evaluation env steps")
    known = [c for c in costs if c.total_s is not None]
    if len(known) < len(costs):
        print("estimated time: unknown for some runs (set cost.train_steps_per_s in the study "
              "file, or start some runs: their measured speed is used)")
    if known:
        slots = _slots(ctx)
        hours = sum(c.total_s for c in known) / 3600
        sources = sorted({c.source for c in known})
        print(f"estimated {hours:.1f} run-hours (rates: {', '.join(sources)}) -> about "
              f"{hours / min(slots, len(known)):.1f} h wall-clock with {slots} run(s) at a time "
              f"({s.backend.name} backend)")
    for r in ctx.runs:
        why = ctx.conflict(r)
        if why:
            print(f"warning: {r.name} was started with another configuration: {why}")
    return 0


def measured_rates(ctx: Context) -> dict:
    """Method -> median measured env steps/s over its runs in DIR (methods without any absent)."""
    per = {}
    for r in ctx.runs:
        rate = P.measured_rate(r.logdir)
        if rate:
            per.setdefault(r.method, []).append(rate)
    return {m: statistics.median(v) for m, v in per.items()}


def _slots(ctx: Context) -> int:
    b = ctx.study.backend
    if b.name == "slurm":
        return b.slurm.array_parallelism
    from dali_jax.study import local
    return b.local.concurrency or local.default_concurrency(local.visible_gpus())


def _check_conflicts(ctx: Context) -> bool:
    bad = [(r, ctx.conflict(r)) for r in ctx.runs]
    bad = [(r, why) for r, why in bad if why]
    for r, why in bad:
        print(f"error: {r.name} ({r.logdir}) was started with another configuration: {why}. "
              f"Nothing was launched: restore the study file, or use another --dir.",
              file=sys.stderr)
    return not bad


def _record_study(ctx: Context) -> None:
    os.makedirs(ctx.root, exist_ok=True)
    path = os.path.join(ctx.root, "study.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"study_file": ctx.args.study, "study": ctx.study.to_dict()}, f, indent=1,
                  default=str)
    os.replace(tmp, path)


def cmd_run(ctx: Context, wait: bool | None = None) -> int:
    if not _check_conflicts(ctx):
        return 2
    _record_study(ctx)
    wait = ctx.args.wait if wait is None else wait
    jobs = stages.train_jobs(ctx.study, ctx.runs, ctx.configs)
    if ctx.study.backend.name == "slurm":
        busy = {st.name for st in ctx.statuses() if st.state in ("queued", "running")}
        if busy:
            print(f"{len(busy)} run(s) already queued or running on SLURM: not submitted again")
        jobs = [j for j in jobs if j.name not in busy]
    print(f"{len(ctx.runs) - len(jobs)} of {len(ctx.runs)} runs finished or in progress; "
          f"launching {len(jobs)}")
    return _launch(ctx, jobs, "train", wait)


def _launch(ctx: Context, jobs, stage: str, wait: bool) -> int:
    """Launch `jobs` of one stage; print submitted jobs and failures. -> exit status."""
    failures, pending = stages.launch(ctx.study, ctx.root, jobs, stage, wait=wait,
                                      quiet=ctx.args.quiet)
    if pending:
        print(f"{len(pending)} job(s) submitted; follow them with the `status` command")
    for line in failures:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failures else 0


def cmd_status(ctx: Context) -> int:
    print(S.format_table(ctx.statuses(), ctx.root))
    return 0


def cmd_evaluate(ctx: Context, wait: bool | None = None) -> int:
    wait = ctx.args.wait if wait is None else wait
    jobs, skipped, unfinished = stages.evaluation_jobs(ctx.study, ctx.root, ctx.runs,
                                                       ctx.configs, force=ctx.args.force)
    ref = [j for j in jobs if j.kind == "reference"]
    print(f"evaluating {len(jobs) - len(ref)} run(s)"
          + (" and the random-policy reference" if ref else "")
          + f"; {len(skipped)} already evaluated at their final checkpoint; "
            f"{len(unfinished)} not finished training")
    return _launch(ctx, jobs, "evaluate", wait)


def cmd_report(ctx: Context) -> int:
    from dali_jax.study import report
    index = report.build(ctx.study, ctx.root, ctx.runs, ctx.configs, ctx.job_state())
    print(f"wrote {index}")
    return 0


def cmd_all(ctx: Context) -> int:
    code = cmd_run(ctx, wait=True)
    if code == 2:
        return code
    code = max(code, cmd_evaluate(ctx, wait=True))
    return max(code, cmd_report(ctx))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        ctx = Context(args)
        return {"plan": cmd_plan, "run": cmd_run, "status": cmd_status, "evaluate": cmd_evaluate,
                "report": cmd_report, "all": cmd_all}[args.command](ctx)
    except spec.StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the command again to resume", file=sys.stderr)
        return 130
