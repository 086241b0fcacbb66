"""Zero-shot studies from one command: ``python -m dali_jax.study STUDY_FILE --dir DIR CMD``.

Modules, each importing only those above it:
- spec: study files (fields, defaults, validation);
- rundir: what a run directory says (checkpoints, evaluation results, metrics);
- plan: runs, their logdirs, commands, configs and estimated cost;
- jobs: one job (train / evaluate / reference) run as a locked, recorded child process;
- state: a run's status (its logdir and its jobs' records);
- local, slurm: the backends (child processes through concurrent.futures; submitit arrays);
- stages: the jobs of each stage and their launch; report: DIR/report/index.md;
- cli: the commands.
"""
