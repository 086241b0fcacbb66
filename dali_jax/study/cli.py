"""``python -m dali_jax.study STUDY_FILE --dir DIR {plan,run,status,evaluate,report,all}``.

- plan: the runs (one logdir each under DIR/runs, named method/setting/seed) and their work;
- run: trains every run that is not finished, resuming interrupted ones; safe to repeat;
- status: done / running / queued / failed / interrupted / pending per run;
- evaluate: evaluates finished runs on the grid (random-policy reference cached in DIR);
- report: DIR/report/index.md and the aggregate tables and figures;
- all: run, evaluate, report (waiting for SLURM jobs).
Exit status: 0, 1 when a job failed, 2 on a bad study file or a run started with another
configuration, 130 after Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import sys

from dali_jax.study import jobs as J
from dali_jax.study import plan as P
from dali_jax.study import rundir as RD
from dali_jax.study import slurm
from dali_jax.study import spec

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
    p.add_argument("--backend", choices=spec.BACKENDS, help="override backend.name")
    p.add_argument("--concurrency", type=int, help="local backend: jobs at once (default: the "
                   "study file's; 0: one per GPU, else one per 2 CPU cores)")
    p.add_argument("--wait", action="store_true",
                   help="slurm backend: wait for the submitted jobs (`all` always waits)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


class Study:
    """The loaded study, its runs and their configs, and the command-line options."""

    def __init__(self, args):
        self.args, self.study = args, spec.load(args.study)
        if args.backend:
            self.study.backend.name = args.backend
        if args.concurrency is not None:
            self.study.backend.local.concurrency = args.concurrency
        spec.validate(self.study)
        self.root = os.path.abspath(args.dir)
        self.runs = P.plan_runs(self.study, self.root)
        self.configs = P.run_configs(self.study, self.runs)

    def statuses(self) -> list[RD.RunStatus]:
        job_state = slurm.job_states()
        return [RD.run_status(r.name, r.logdir, int(self.configs[r.name].run.steps),
                              self.study.evaluation.episodes,
                              P.eval_indices(self.study, r.setting), job_state)
                for r in self.runs]

    def conflicts(self) -> list[tuple]:
        return [(r, why) for r in self.runs
                if (why := P.config_conflict(self.study, r, self.configs[r.name]))]

    def launch(self, jobs, stage: str) -> int:
        """Runs ``jobs`` on the backend; prints failures; -> exit status."""
        if not jobs:
            return 0
        if self.study.backend.name == "local":
            recs = J.run_jobs(jobs, self.study.backend.local.concurrency, desc=stage,
                              quiet=self.args.quiet)
            errors = [r.get("error") if r["outcome"] == "failed" else None for r in recs]
        else:
            folder = os.path.join(self.root, "submitit")
            sjobs = slurm.submit(self.study, jobs, folder)
            print(f"submitted {len(jobs)} job(s) to {self.study.backend.slurm.cluster} (files "
                  f"in {folder})")
            if not self.args.wait:
                print("follow them with `status`")
                return 0
            errors = slurm.wait(sjobs, jobs, desc=stage, quiet=self.args.quiet)
        for job, error in zip(jobs, errors):
            if error:
                print(f"FAILED {job.kind} {job.name}: {error} (log: {job.log})", file=sys.stderr)
        return 1 if any(errors) else 0


def cmd_plan(s: Study) -> int:
    st, work = s.study, [P.work(s.study, r, s.configs[r.name]) for r in s.runs]
    print(f"study {st.name}: {st.task} ({st.obs}), preset {st.preset}, {len(s.runs)} runs "
          f"under {os.path.join(s.root, 'runs')}")
    print(RD.table([("run", "state", "env steps", "updates", "eval env steps")] + [
        (r.name, status.state, *(f"{x:,}" for x in w))
        for r, status, w in zip(s.runs, s.statuses(), work)]))
    print("total: {:,} env steps, {:,} updates, {:,} evaluation env steps".format(
        *map(sum, zip(*work))))
    for r, why in s.conflicts():
        print(f"warning: {r.name} was started with another configuration: {why}")
    return 0


def cmd_run(s: Study) -> int:
    bad = s.conflicts()
    for r, why in bad:
        print(f"error: {r.name} ({r.logdir}) was started with another configuration: {why}. "
              f"Nothing was launched: restore the study file, or use another --dir.",
              file=sys.stderr)
    if bad:
        return 2
    jobs = [P.train_job(s.study, r, s.configs[r.name]) for r in s.runs]
    jobs = [j for j in jobs if not j.done()]
    if s.study.backend.name == "slurm":
        busy = {st.name for st in s.statuses() if st.state in ("queued", "running")}
        if busy:
            print(f"{len(busy)} run(s) already queued or running on SLURM: not submitted again")
        jobs = [j for j in jobs if j.name not in busy]
    print(f"{len(s.runs) - len(jobs)} of {len(s.runs)} runs finished or in progress; "
          f"launching {len(jobs)}")
    return s.launch(jobs, "train")


def cmd_status(s: Study) -> int:
    print(RD.format_table(s.statuses(), s.root))
    return 0


def cmd_evaluate(s: Study) -> int:
    jobs, skipped, unfinished = P.evaluation_jobs(s.study, s.root, s.runs, s.configs)
    ref = any(j.kind == "reference" for j in jobs)
    print(f"evaluating {len(jobs) - ref} run(s)" + (" and the random-policy reference" * ref)
          + f"; {len(skipped)} already evaluated at their final checkpoint; "
            f"{len(unfinished)} not finished training")
    return s.launch(jobs, "evaluate")


def cmd_report(s: Study) -> int:
    from dali_jax.analysis import study_report
    index = study_report.build(s.study, s.root, s.runs, s.configs, s.statuses(),
                               P.reference_path(s.study, s.root, s.configs))
    print(f"wrote {index}")
    return 0


def cmd_all(s: Study) -> int:
    s.args.wait = True  # evaluation needs the trained runs
    code = cmd_run(s)
    if code == 2:
        return code
    return max(code, cmd_evaluate(s), cmd_report(s))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return globals()[f"cmd_{args.command}"](Study(args))
    except spec.StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the command again to resume", file=sys.stderr)
        return 130
