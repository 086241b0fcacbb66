"""Zero-shot studies from one command: ``python -m dali_jax.study STUDY_FILE --dir DIR CMD``.

Layers, each module importing only those before it: spec (study files), rundir (what a run
directory says), jobs (one locked child process), plan (runs, configs, jobs), local and slurm
(backends), cli. The report itself is ``dali_jax.analysis.study_report``.
"""
