"""Zero-shot studies from one command: ``python -m dali_jax.study STUDY_FILE --dir DIR CMD``.

Modules, each importing only those above it:
- spec: study files (fields, defaults, validation);
- rundir: what a run directory says (progress, results, job logs, lock, status);
- jobs: one job (train / evaluate / reference) run as a locked child process;
- plan: runs, their configs, cost and jobs;
- local, slurm: the backends (child processes through concurrent.futures; submitit arrays);
- cli: the commands (the report itself is ``dali_jax.analysis.study_report``).
"""
