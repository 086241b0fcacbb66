"""Zero-shot studies from one command: ``python -m dali_jax.study STUDY_FILE --dir DIR CMD``.

Layers, each module importing only those before it: spec (study files), rundir (what a run
directory says), jobs (one locked child process; the local backend), plan (runs, configs,
jobs), slurm (the slurm backend), cli. The report itself is ``dali_jax.analysis.study_report``.
"""
