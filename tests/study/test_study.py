"""The study runner: planning and study-file validation; a smoke study whose runner and one of
whose runs are killed, then resumed; status, evaluate (skips evaluated runs) and report (lists
missing and failed runs); the slurm backend's sbatch array built without a cluster (fake sbatch),
its requeue callable, and one smoke study end to end through submitit's local executor."""
import functools
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from dali_jax.study import cli
from dali_jax.study import jobs as J
from dali_jax.study import plan as P
from dali_jax.study import rundir as RD
from dali_jax.study import spec
from dali_jax.study.slurm import JobCallable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 400

# A smoke study: one method, two seeds, gravity varied; checkpoints every second so that a
# killed trainer leaves one; evaluation of the 14 contexts single_0 scores, 1 short episode.
SMOKE = f"""
from dali_jax.study import spec


def get_config():
    c = spec.defaults()
    c.methods = ("dreamer_dr",)
    c.seeds = (0, 1)
    c.settings = ("single_0",)
    c.preset = "smoke"
    c.overrides["run.steps"] = {STEPS}
    c.overrides["run.save_every_s"] = 1.0
    c.evaluation.episodes = 1
    c.evaluation.contexts = "scored"
    c.evaluation.num_envs = 14
    c.evaluation.random_episodes = 1
    c.evaluation.random_seeds = 1
    c.report.reps = 200
    c.backend.local.concurrency = 2
"""


def write_study(path, *lines) -> str:
    """The smoke study plus ``lines`` (Python statements on ``c``) as a study file."""
    body = SMOKE + "".join(f"    {ln}\n" for ln in lines) + "    return c\n"
    path = str(path)
    with open(path, "w") as f:
        f.write(body)
    return path


def load(path, root):
    study = spec.load(path)
    runs = P.plan_runs(study, root)
    return study, runs, P.run_configs(study, runs)


def events(run, kind="train"):
    """(event, record) of the header lines in the run's train.log or eval.log."""
    log = os.path.join(run.logdir, f"{kind}.log")
    return [(e, r) for k, e, r in RD.log_events(log) if k == kind]


def ends(run, kind="train"):
    return [r for e, r in events(run, kind) if e == "end"]


def wait_for(cond, timeout, what, poll=0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ----------------------------------------------------------------------------- planning
def test_plan_names_runs_and_builds_their_configs(tmp_path, capsys):
    path = write_study(tmp_path / "plan.py", 'c.methods = ("dreamer_dr", "dali_d")',
                       "c.seeds = (0, 5)", 'c.settings = ("single_0", "double_box")',
                       'c.overrides["model.size"] = "tiny"',
                       'c.method_overrides["dali_d"] = {"context.alignment": "project"}')
    study, runs, configs = load(path, tmp_path / "d")
    assert study.name == "plan" and len(runs) == 8
    assert [r.name for r in runs[:4]] == ["dreamer_dr/single_0/s0", "dali_d/single_0/s0",
                                          "dreamer_dr/double_box/s0", "dali_d/double_box/s0"]
    assert {r.name for r in runs[4:]} == {f"{m}/{s}/s5" for m in ("dreamer_dr", "dali_d")
                                          for s in ("single_0", "double_box")}
    for r in runs:
        c = configs[r.name]
        assert r.logdir == str(tmp_path / "d" / "runs" / r.method / r.setting / f"s{r.seed}")
        assert (c.task, c.obs, c.method, c.context_setting, c.seed, c.logdir) == (
            "ball_in_cup", "features", r.method, r.setting, r.seed, r.logdir)
        # the preset (smoke: XLA -O0), then the overrides on top of it
        assert (c.xla_opt_level, c.run.steps, c.run.save_every_s, c.model.size) == (
            0, STEPS, 1.0, "tiny")
        cmd = P.train_job(study, r, c).argv
        assert cmd[:6] == (sys.executable, "-u", "-m", "dali_jax.launch", "--task",
                           "ball_in_cup")
        assert f"--config.seed={r.seed}" in cmd and "--config.model.size=tiny" in cmd
        # method_overrides reach that method's runs only
        assert c.context.loss == ("both" if r.method == "dali_d" else "forward")
        assert ("--config.context.alignment=project" in cmd) == (r.method == "dali_d")
    # (400 - 100 prefill) x ratio 16 / (4 x 16) updates; 14 scored contexts x 1 x 100 steps
    assert P.work(study, runs[0], configs[runs[0].name]) == (STEPS, 75, 1400)
    capsys.readouterr()
    assert cli.main([path, "plan", "--dir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"dali_d/double_box/s5 +pending +400 +75 +[1-9][0-9,]*", out[-2])
    total = [sum(x) for x in zip(*(P.work(study, r, configs[r.name]) for r in runs))]
    assert out[-1] == "total: 3,200 env steps, 600 updates, {:,} evaluation env steps".format(
        total[2])


def test_variants_run_one_method_under_two_labels(tmp_path):
    """A variant is its own run directory and report row, runs its base method with its own
    overrides, and the report lists each DALI variant's resolved alignment settings."""
    from dali_jax.analysis import study_report as SR
    path = write_study(tmp_path / "v.py", 'c.variants["dali_d_paper"] = "dali_d"',
                       'c.variants["dali_d_project"] = "dali_d"',
                       'c.methods = ("dreamer_dr", "dali_d_paper", "dali_d_project")',
                       'c.method_overrides["dali_d_project"] = {"context.alignment": "project"}')
    study, runs, configs = load(path, tmp_path / "d")
    assert [r.name for r in runs[:3]] == ["dreamer_dr/single_0/s0", "dali_d_paper/single_0/s0",
                                          "dali_d_project/single_0/s0"]
    by = {r.method: configs[r.name] for r in runs}
    assert by["dali_d_paper"].method == by["dali_d_project"].method == "dali_d"
    assert (by["dali_d_paper"].context.loss, by["dali_d_project"].context.loss) == (
        "forward", "both")
    assert runs[2].logdir.endswith(os.path.join("runs", "dali_d_project", "single_0", "s0"))
    assert "--config.method=dali_d" in P.train_job(study, runs[2], by["dali_d_project"]).argv
    table = SR.alignment_table(study, runs, configs)
    assert table[2].split(" | ")[:3] == ["| method", "recipe", "loss"]
    assert [row.split(" | ")[:3] for row in table[4:6]] == [
        ["| dali_d_paper", "paper", "forward"], ["| dali_d_project", "project", "both"]]


def test_a_study_needs_the_package_only(tmp_path):
    """The runs train through `python -m dali_jax.launch`, whose configs are the experiment
    files' own; `plan` works from a copy of the package with no experiments/ beside it."""
    from dali_jax import presets
    from experiments import ball_in_cup, walker_walk
    path = write_study(tmp_path / "s.py")
    study, runs, configs = load(path, tmp_path / "d")
    cmd = P.train_job(study, runs[0], configs[runs[0].name]).argv
    assert cmd[1:6] == ("-u", "-m", "dali_jax.launch", "--task", study.task)
    for module, task in ((ball_in_cup, "ball_in_cup"), (walker_walk, "walker")):
        for preset in (None, "cpu"):
            assert (module.get_config(preset).to_dict()
                    == presets.experiment_config(task, preset).to_dict())
    site = tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "dali_jax"), site / "dali_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "dali_jax.study", path, "--dir",
                        str(tmp_path / "d2"), "plan"], cwd=site, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu"),
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dreamer_dr/single_0/s0" in r.stdout


def test_report_probe_table_gives_the_median_over_seeds(tmp_path):
    """The report's probe table reads each DALI run's probe.json; cRSSM-D and runs without a
    probe are left out; medians by hand."""
    from dali_jax.analysis import study_report as SR
    path = write_study(tmp_path / "p.py", 'c.methods = ("crssm_d", "dali_d")',
                       "c.seeds = (0, 1, 2)")
    study, runs, _ = load(path, tmp_path / "d")
    for r, r2 in zip(runs, (0.9, 0.1, 0.5, 0.2, 0.9, 0.3)):  # crssm_d s0, dali_d s0, ...
        os.makedirs(os.path.join(r.logdir, "probe"))
        with open(os.path.join(r.logdir, "probe", "probe.json"), "w") as f:
            json.dump({"r2_step": {"gravity": r2}, "r2_episode_mean": {"gravity": r2 + 0.05}}, f)
    os.remove(os.path.join(runs[5].logdir, "probe", "probe.json"))  # dali_d s2: no probe
    assert [(r.method, r.seed) for r in runs] == [
        ("crssm_d", 0), ("dali_d", 0), ("crssm_d", 1), ("dali_d", 1), ("crssm_d", 2),
        ("dali_d", 2)]
    table = SR.probe_table(study, runs)
    assert len(table) == 6 and table[-1] == ""
    assert table[4] == "| dali_d | gravity | 0.15 | s0 0.10, s1 0.20 | 0.20 |"


@pytest.mark.parametrize("line, message", [
    ('c.variants["dali_d"] = "dali_d"', r"study\.variants\['dali_d'\] must be a new name"),
    ('c.variants["x"] = "dali_z"', r"study\.variants\['x'\] must name a method; got 'dali_z'"),
    ('c.methods = ("dreamer_dr", "dali_x")', r"study\.methods lists unknown method 'dali_x'; "
                                             r"valid methods: dreamer_dr, crssm_s, crssm_d"),
    ("c.seeds = ()", r"study\.seeds must not be empty"),
    ("c.seeds = (0, 0)", r"study\.seeds lists 0 more than once"),
    ('c.settings = ("single_2",)', r"study\.settings lists 'single_2', which is not a context "
                                   r"setting of ball_in_cup; valid settings: default .*single_1 "
                                   r"\(string_length varied\)"),
    ('c.backend.name = "pbs"', r"study\.backend\.name must be one of local, slurm; got 'pbs'"),
    ("c.backend.slurm.time_min = 0", r"study\.backend\.slurm\.time_min must be >= 1; got 0"),
    ('c.evaluation.episodes = "ten"', r"TypeError: .*'episodes'.* ten .* cannot be casted to "
                                      r"type <class 'int'>"),
    ('c.evaluation.contexts = "some"', r"study\.evaluation\.contexts must be one of all, scored"),
    ("c.seed = 3", r"AttributeError: Key \"seed\" does not exist and cannot be added since the "
                   r"config is locked; Did you mean \"seeds\" instead of \"seed\"\?$"),
    ('c.overrides["seed"] = 3', r"study\.overrides\['seed'\] is set by the study"),
    ('c.overrides["run.stepz"] = 3', r"study\.overrides: unknown field --config\.run\.stepz.*"
                                     r"Valid fields: .*steps"),
    ('c.method_overrides["dali_d"] = {"context.loss": "inverse"}',
     r"study\.method_overrides\['dali_d'\] names a method the study does not run; its "
     r"methods: dreamer_dr"),
    ('c.method_overrides["dreamer_dr"] = {"seed": 1}',
     r"study\.method_overrides\['dreamer_dr'\]\['seed'\] is set by the study"),
    ('c.method_overrides["dreamer_dr"] = {"context.los": "inverse"}',
     r"study\.overrides or study\.method_overrides\['dreamer_dr'\]: unknown field "
     r"--config\.context\.los"),
    ('c.method_overrides = {"dreamer_dr": 3}',
     r"study\.method_overrides\['dreamer_dr'\] must be a mapping of config path"),
    ('c.settings = ("default",)', r"study\.evaluation\.contexts is 'scored', but setting\(s\) "
                                  r"default score no grid context"),
    ('c.overrides["run.episode_length"] = 40; c.seeds = (0,); c.variants["short"] = '
     '"dreamer_dr"; c.methods = ("dreamer_dr", "short"); c.method_overrides["short"] = '
     '{"run.episode_length": 20}',
     r"study\.overrides and study\.method_overrides give the runs run\.episode_length "
     r"values \[20, 40\]; the random-policy reference needs one"),
])
def test_bad_study_files_are_rejected_naming_the_field(tmp_path, line, message):
    path = write_study(tmp_path / "bad.py", line)
    with pytest.raises(spec.StudyError, match=message):
        load(path, tmp_path / "d")
    assert cli.main([path, "plan", "--dir", str(tmp_path / "d")]) == 2


def test_run_refuses_runs_started_with_another_config(tmp_path, capsys):
    path = write_study(tmp_path / "s.py")
    root = tmp_path / "d"
    study, runs, configs = load(path, root)
    os.makedirs(runs[1].logdir)
    started = P.config_json(configs[runs[1].name])
    started["run"]["steps"] = 999
    with open(os.path.join(runs[1].logdir, "config.json"), "w") as f:
        json.dump(started, f)
    assert cli.main([path, "run", "--dir", str(root), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "dreamer_dr/single_0/s1" in err and "run.steps: run has 999, study has 400" in err
    assert not os.path.exists(runs[0].logdir)  # nothing launched


def test_a_field_added_after_a_run_started_is_no_conflict_while_at_its_default(tmp_path):
    """A run started before dali_jax gained an option (its config.json lacks the field) still
    matches a plan that keeps the option's default; a plan that overrides it conflicts."""
    root = tmp_path / "d"
    path = write_study(tmp_path / "s.py")
    study, runs, configs = load(path, root)
    os.makedirs(runs[0].logdir)
    started = P.config_json(configs[runs[0].name])
    del started["context"]["head_layers"]  # as if the run predates the option
    with open(os.path.join(runs[0].logdir, "config.json"), "w") as f:
        json.dump(started, f)
    assert P.config_conflict(study, runs[0], configs[runs[0].name]) is None
    path = write_study(tmp_path / "s2.py", 'c.overrides["context.head_layers"] = 3')
    study, runs, configs = load(path, root)
    why = P.config_conflict(study, runs[0], configs[runs[0].name])
    assert why == "context.head_layers: run has 2, study has 3"


def test_status_is_read_from_the_run_directory(tmp_path):
    """Each state from the files a run directory holds: its log headers, lock, checkpoints."""
    import fcntl
    logdir = str(tmp_path / "run")
    os.makedirs(os.path.join(logdir, "checkpoints"))
    status = lambda job_state=None: RD.run_status("r", logdir, 100, 1, (), job_state)
    log = lambda kind, event, **rec: open(os.path.join(logdir, f"{kind}.log"), "a").write(
        RD.header(kind, event, rec))
    assert status().state == "pending"
    log("train", "queued", time=1.0, job_id="7", cluster="slurm")
    assert status().state == "queued" and status(lambda q: "gone").state == "interrupted"
    log("train", "start", time=2.0, pid=1, step=0)
    fd = os.open(os.path.join(logdir, RD.LOCK), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by the training job
    assert (status().state, status().evaluation) == ("running", "-")
    log("eval", "start", time=3.0, pid=2, step=0)  # held by an evaluation job
    assert (status().state, status().evaluation) == ("interrupted", "running")
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    log("eval", "end", time=4.0, outcome="failed", error="OSError: disk full")
    assert (status().evaluation, status().error) == ("failed", "OSError: disk full")
    log("train", "end", time=5.0, outcome="failed", error="ValueError: boom")
    assert (status().state, status().error) == ("failed", "ValueError: boom")
    os.makedirs(os.path.join(logdir, "checkpoints", "ckpt_00000100"))
    open(os.path.join(logdir, "eval_summary.json"), "w").write('{"env_steps": 100}')
    assert (status().state, status().env_steps) == ("done", 100)
    log("eval", "start", time=6.0, pid=3, step=100)  # its launcher died: no end header
    log("train", "start", time=7.0, pid=4, step=100)  # a newer training job holds the lock
    fd = os.open(os.path.join(logdir, RD.LOCK), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    assert (status().state, status().evaluation) == ("running", "-")
    os.close(fd)


def test_a_failing_job_is_recorded_with_its_last_error_line(tmp_path):
    job = J.Job("train", "x", (sys.executable, "-c", "print('hello'); raise ValueError('boom')"),
                str(tmp_path / "train.log"), str(tmp_path / "run.lock"),
                functools.partial(RD.training_finished, str(tmp_path / "run"), 10))
    rec = J.execute(job)
    assert rec["outcome"] == "failed" and rec["returncode"] == 1
    assert rec["error"] == "ValueError: boom"
    assert [(k, e) for k, e, _ in RD.log_events(job.log)] == [("train", "start"), ("train", "end")]
    assert RD.last_event(job.log) == ("end", rec)
    assert not RD.lock_held(job.lock)


def test_local_backend_gives_each_slot_its_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    assert J.visible_gpus() == ["2", "5"]
    printer = ("import os, time; time.sleep(0.5); print('gpu', os.environ['CUDA_VISIBLE_DEVICES'],"
               " os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE', '-'))")

    def gpus_of(n, **kw):
        jobs = [J.Job("eval", f"j{i}", (sys.executable, "-c", printer),
                      str(tmp_path / f"{n}_{i}.log"), str(tmp_path / f"{n}_{i}.lock"),
                      functools.partial(RD.evaluated, str(tmp_path / "none"), 1, ()))
                for i in range(n)]
        recs = J.run_jobs(jobs, quiet=True, **kw)
        assert [r["outcome"] for r in recs] == ["failed"] * n  # no results written
        return sorted(ln for i in range(n) for ln in (tmp_path / f"{n}_{i}.log").read_text()
                      .splitlines() if ln.startswith("gpu "))
    # default: one job per GPU, both at once; 4 jobs at once on 2 GPUs share them
    assert gpus_of(2) == ["gpu 2 -", "gpu 5 -"]
    assert gpus_of(4, concurrency=4) == ["gpu 2 false"] * 2 + ["gpu 5 false"] * 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert J.visible_gpus() == []


LAUNCHER = """
import sys
from dali_jax.study import jobs as J
child = '''
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], "w").write("saved"), sys.exit(0)))
print("st" + "arted", flush=True)  # not a substring of the log's header (the source)
time.sleep(120)
'''
tmp = sys.argv[1]
jobs = [J.Job("eval", f"j{i}", (sys.executable, "-c", child, f"{tmp}/saved{i}"),
              f"{tmp}/j{i}.log", f"{tmp}/j{i}.lock", lambda: False)
        for i in range(3)]
try:
    J.run_jobs(jobs, concurrency=2, quiet=True)
except KeyboardInterrupt:
    print("stopped", flush=True)
"""


def test_sigterm_stops_the_local_launcher_gracefully(tmp_path):
    """SIGTERM to the launcher: its running children get SIGTERM (and save), the job not
    started yet never starts, and the launcher ends with KeyboardInterrupt."""
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    started = lambda i: (tmp_path / f"j{i}.log").exists() and "started" in (
        tmp_path / f"j{i}.log").read_text()
    try:
        wait_for(lambda: started(0) and started(1), 60, "two jobs to start")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "stopped" in out
    assert (tmp_path / "saved0").read_text() == (tmp_path / "saved1").read_text() == "saved"
    assert not (tmp_path / "j2.log").exists()  # the third job was not started


# ----------------------------------------------------------------------------- resumability
@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A smoke study whose runner and one trainer are killed mid-run, then run again."""
    tmp = tmp_path_factory.mktemp("study")
    path, root = write_study(tmp / "smoke.py"), str(tmp / "d")
    study, runs, configs = load(path, root)
    with open(tmp / "runner.log", "wb") as log:
        runner = subprocess.Popen([sys.executable, "-m", "dali_jax.study", path, "run", "--dir",
                                   root, "--quiet"], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    stopped = {}  # run name -> trainer pid, held with SIGSTOP so neither can finish early
    try:
        def stop_trainers():  # each trainer stopped as soon as it is past its first checkpoint
            for r in runs:
                if r.name in stopped:
                    continue
                event, rec = RD.last_event(os.path.join(r.logdir, "train.log"))
                if event != "start":
                    continue
                pid = rec["pid"]
                if RD.latest_checkpoint_step(r.logdir):
                    os.kill(pid, signal.SIGSTOP)
                    stopped[r.name] = pid
            return len(stopped) == len(runs)
        wait_for(stop_trainers, 240, "two trainers past their first checkpoint", poll=0.02)
        os.kill(stopped[runs[0].name], signal.SIGKILL)  # a run dies without saving
        wait_for(lambda: ends(runs[0]), 30, "the runner to record the killed run")
        os.kill(runner.pid, signal.SIGKILL)  # the runner dies: its trainer gets SIGTERM
        runner.wait()
    finally:
        if runner.poll() is None:
            runner.kill()
        for pid in stopped.values():  # B handles its pending SIGTERM: saves and exits
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    wait_for(lambda: not any(RD.lock_held(os.path.join(r.logdir, RD.LOCK)) for r in runs), 120,
             "the orphaned trainer to save and exit")
    before = {r.name: RD.latest_checkpoint_step(r.logdir) for r in runs}
    first = {r.name: events(r) for r in runs}
    assert cli.main([path, "run", "--dir", root, "--quiet"]) == 0
    return dict(path=path, root=root, runs=runs, before=before, first=first)


def test_killed_runner_and_run_resume_and_finish_exactly_once(killed_and_resumed):
    k = killed_and_resumed
    a, b = k["runs"]
    # the first pass: run A killed outright (recorded as failed), the runner killed while B ran
    assert k["first"][a.name][-1][0] == "end" and k["first"][a.name][-1][1]["outcome"] == "failed"
    assert k["first"][a.name][-1][1]["error"].startswith("killed by SIGKILL")
    assert [e for e, _ in k["first"][b.name]] == ["start"]  # its launcher died
    for r in (a, b):
        assert 0 < k["before"][r.name] < STEPS
        assert [x["outcome"] for x in ends(r)].count("done") == 1
        ((start, resumed), (end, last)) = events(r)[-2:]
        assert start == "start" and resumed["step"] == k["before"][r.name]
        assert end == "end" and last["outcome"] == "done" and last["step"] == STEPS
        with open(os.path.join(r.logdir, "train.log")) as f:
            log = f.read().rsplit("=== train start ", 1)[1]
        assert f"at {k['before'][r.name]} env steps" in log  # "resumed from ... at N env steps"
        assert RD.training_finished(r.logdir, STEPS)
        steps = [json.loads(ln)["step"] for ln in open(os.path.join(r.logdir, "metrics.jsonl"))]
        assert max(steps) == STEPS
    # idempotent: a third call launches nothing
    n = {r.name: len(events(r)) for r in (a, b)}
    assert cli.main([k["path"], "run", "--dir", k["root"], "--quiet"]) == 0
    assert {r.name: len(events(r)) for r in (a, b)} == n


def test_status_and_evaluate_skip_evaluated_runs(killed_and_resumed, capsys):
    k = killed_and_resumed
    path, root = k["path"], k["root"]
    capsys.readouterr()
    assert cli.main([path, "status", "--dir", root]) == 0
    out = capsys.readouterr().out
    for r in k["runs"]:
        assert re.search(rf"{r.name}\s+done\s+{STEPS}/{STEPS}\s", out)
    assert "2 runs: 2 done; 0 evaluated" in out
    assert cli.main([path, "evaluate", "--dir", root, "--quiet"]) == 0
    ref = os.path.join(root, "references", "random_ball_in_cup_L100.json")
    with open(ref) as f:
        assert len(json.load(f)["entries"]) == 14
    mtimes = {}
    for r in k["runs"]:
        res = RD.read_eval_results(r.logdir)
        assert res["checkpoint_step"] == STEPS and res["episodes"] == 1
        assert len(res["contexts"]) == 14 and all(c["regime"] for c in res["contexts"])
        mtimes[r.name] = os.path.getmtime(os.path.join(r.logdir, "eval", "returns.json"))
    capsys.readouterr()
    assert cli.main([path, "evaluate", "--dir", root, "--quiet"]) == 0
    assert "evaluating 0 run(s); 2 already evaluated" in capsys.readouterr().out
    for r in k["runs"]:
        assert os.path.getmtime(os.path.join(r.logdir, "eval", "returns.json")) == mtimes[r.name]
        assert [e for e, _ in events(r, "eval")] == ["start", "end"]  # one attempt
    assert cli.main([path, "status", "--dir", root]) == 0
    assert "2 runs: 2 done; 2 evaluated" in capsys.readouterr().out


def test_report_lists_missing_and_failed_runs(killed_and_resumed, tmp_path, capsys):
    k = killed_and_resumed
    root = k["root"]
    if not all(RD.read_eval_results(r.logdir) for r in k["runs"]):
        assert cli.main([k["path"], "evaluate", "--dir", root, "--quiet"]) == 0
    # the same study with two more seeds: s7 fails at start, s8 never starts
    path = write_study(tmp_path / "smoke.py", "c.seeds = (0, 1, 7, 8)")
    study, runs, configs = load(path, root)
    failing = J.Job("train", runs[2].name, (sys.executable, "-c", "raise ValueError('boom')"),
                    os.path.join(runs[2].logdir, "train.log"),
                    os.path.join(runs[2].logdir, RD.LOCK),
                    functools.partial(RD.training_finished, runs[2].logdir, STEPS))
    assert J.execute(failing)["outcome"] == "failed"
    assert cli.main([path, "status", "--dir", root]) == 0
    out = capsys.readouterr().out
    assert re.search(r"dreamer_dr/single_0/s7\s+failed\s+0/400 .* ValueError: boom "
                     r"\(runs/dreamer_dr/single_0/s7/train\.log\)", out)
    assert re.search(r"dreamer_dr/single_0/s8\s+pending\s+0/400", out)
    assert cli.main([path, "report", "--dir", root]) == 0
    out_dir = os.path.join(root, "report")
    index = open(os.path.join(out_dir, "index.md")).read()
    assert "4 planned runs: 2 aggregated, 2 missing or failed" in index
    assert ("- `dreamer_dr/single_0/s7`: training failed at 0/400 env steps: ValueError: boom "
            "(log: ../runs/dreamer_dr/single_0/s7/train.log)") in index
    assert "- `dreamer_dr/single_0/s8`: not started" in index
    pngs = sorted(n for n in os.listdir(out_dir) if n.endswith(".png"))
    assert {"iqm_bars.png", "curves.png", "heatmap_dreamer_dr_single_0.png"} <= set(pngs)
    for name in pngs:  # every figure is shown
        assert f"]({name})" in index
    assert "| dreamer_dr | " in index and "IQM of the normalised score" in index
    rows = open(os.path.join(out_dir, "summary.csv")).read().splitlines()
    assert any(r.startswith("extrapolation,iqm,dreamer_dr,,") and r.endswith(",2,10")
               for r in rows)


def test_report_from_a_copy_of_the_results_without_checkpoints(killed_and_resumed, tmp_path):
    """Run directories copied without checkpoints/ (the files committed under results/):
    `status` counts them done and evaluated, and `report` aggregates them."""
    k = killed_and_resumed
    if not all(RD.read_eval_results(r.logdir) for r in k["runs"]):
        assert cli.main([k["path"], "evaluate", "--dir", k["root"], "--quiet"]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(k["root"], "runs"), copy / "runs",
                    ignore=shutil.ignore_patterns("checkpoints", "*.lock", "*.log"))
    shutil.copytree(os.path.join(k["root"], "references"), copy / "references")
    for r in k["runs"]:
        logdir = str(copy / os.path.relpath(r.logdir, k["root"]))
        assert not os.path.exists(os.path.join(logdir, "checkpoints"))
        assert RD.final_step(logdir) == STEPS and RD.training_finished(logdir, STEPS)
    assert cli.main([k["path"], "report", "--dir", str(copy)]) == 0
    index = open(copy / "report" / "index.md").read()
    assert "2 planned runs: 2 aggregated, 0 missing or failed" in index


# ----------------------------------------------------------------------------- slurm
def test_slurm_backend_submits_one_array_with_the_study_resources(tmp_path, monkeypatch,
                                                                  capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    capture = tmp_path / "sbatch.txt"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncat "$1" >> {capture}\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = write_study(tmp_path / "sl.py", "c.seeds = (0, 1, 2)", 'c.backend.name = "slurm"',
                       'c.backend.slurm.partition = "gpu"', "c.backend.slurm.time_min = 90",
                       "c.backend.slurm.cpus_per_task = 4", "c.backend.slurm.mem_gb = 16",
                       "c.backend.slurm.array_parallelism = 2",
                       'c.backend.slurm.extra["qos"] = "high"',
                       'c.backend.slurm.setup = ("source .venv/bin/activate",)')
    root = tmp_path / "d"
    study, runs, configs = load(path, root)
    assert cli.main([path, "run", "--dir", str(root), "--quiet"]) == 0
    script = capture.read_text()
    for flag in ("--array=0-2%2", "--partition=gpu", "--time=90", "--gpus-per-node=1",
                 "--cpus-per-task=4", "--mem=16GB", "--qos=high", "--signal=USR2@90",
                 "--job-name=sl-train"):
        assert f"#SBATCH {flag}\n" in script
    assert "source .venv/bin/activate\n" in script
    assert f"-m submitit.core._submit {root / 'submitit'}/%j" in script
    # one pickled callable per array task, holding the command of its run
    for i, run in enumerate(runs):
        with open(root / "submitit" / f"4242_{i}" / f"4242_{i}_submitted.pkl", "rb") as f:
            job = pickle.load(f).function.job
        assert isinstance(pickle.loads(pickle.dumps(JobCallable(job))), JobCallable)
        assert job == P.train_job(study, run, configs[run.name])
        assert (job.done.func, job.done.args) == (RD.training_finished, (run.logdir, STEPS))
        event, rec = RD.last_event(job.log)
        assert event == "queued" and rec["job_id"] == f"4242_{i}"
    # queued runs are shown as such and not submitted twice
    capsys.readouterr()
    assert cli.main([path, "status", "--dir", str(root)]) == 0
    assert "3 runs: 3 queued" in capsys.readouterr().out
    assert cli.main([path, "run", "--dir", str(root), "--quiet"]) == 0
    assert script == capture.read_text()
    # sacct's answer (read by submitit): a job cancelled before it started is submitted again
    calls = tmp_path / "sacct_calls"
    (bin_dir / "sacct").write_text(
        f"#!/bin/sh\necho \"$*\" >> {calls}\n"
        "printf 'JobID|State|NodeList\\n4242_0|PENDING|None\\n"
        "4242_1|CANCELLED by 0|None\\n4242_2|RUNNING|n1\\n'\n")
    (bin_dir / "sacct").chmod(0o755)
    assert cli.main([path, "status", "--dir", str(root)]) == 0
    assert "3 runs: 2 queued, 1 interrupted" in capsys.readouterr().out
    assert len(calls.read_text().splitlines()) == 1  # one sacct call for the array's 3 jobs
    assert cli.main([path, "run", "--dir", str(root), "--quiet"]) == 0
    assert "launching 1" in capsys.readouterr().out
    assert capture.read_text().count("#SBATCH --job-name=sl-train") == 2  # one more job
    assert RD.last_event(runs[1].logdir + "/train.log")[0] == "queued"


def test_a_queued_header_comes_before_the_start_of_a_job_that_starts_at_once(tmp_path,
                                                                             monkeypatch):
    from types import SimpleNamespace

    from dali_jax.study import slurm
    run = tmp_path / "run"
    job = J.Job("eval", "x", (sys.executable, "-c", "print('ran')"), str(run / "eval.log"),
                str(run / "run.lock"), functools.partial(RD.evaluated, str(run), 1, ()))
    threads = []

    class StartsAtOnce:  # an executor whose jobs start the moment they are submitted
        def submit_array(self, callables):
            threads.extend(threading.Thread(target=J.execute, args=(c.job,)) for c in callables)
            for t in threads:
                t.start()
            time.sleep(1.5)  # time enough for a job that is not held back to write its start
            return [SimpleNamespace(job_id=str(i)) for i in range(len(callables))]

    monkeypatch.setattr(slurm, "executor", lambda *args: StartsAtOnce())
    slurm.submit(spec.defaults(), [job], str(tmp_path / "submitit"))
    for t in threads:
        t.join(60)
    assert [e for _, e, _ in RD.log_events(job.log)] == ["queued", "start", "end"]


def test_a_failed_slurm_job_reports_the_error_in_its_log(tmp_path):
    """Not submitit's message, whose last lines are paths of its own log files."""
    from dali_jax.study import slurm
    study = spec.defaults()
    study.backend.slurm.cluster, study.backend.slurm.gpus_per_node = "local", 0
    run = tmp_path / "run"
    job = J.Job("eval", "x", (sys.executable, "-c", "raise ValueError('boom')"),
                str(run / "eval.log"), str(run / "run.lock"),
                functools.partial(RD.evaluated, str(run), 1, ()))
    sjobs = slurm.submit(study, [job], str(tmp_path / "submitit"))
    assert slurm.wait(sjobs, [job], "evaluate", quiet=True) == ["ValueError: boom"]


CHILD = """
import os, signal, sys, time
def term(*_):
    open(sys.argv[1], "w").write("saved")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
os.kill(os.getpid(), signal.SIGUSR2)  # ignored: the launcher's time-out signal
print("re" + "ady:", os.getpid(), flush=True)  # not a substring of this source (the log's header)
time.sleep(120)
"""


def test_requeue_checkpoint_stops_the_child_and_resubmits_the_same_job(tmp_path):
    saved = tmp_path / "saved"
    job = J.Job("train", "x", (sys.executable, "-c", CHILD, str(saved)), str(tmp_path / "log"),
                str(tmp_path / "lock"),
                functools.partial(RD.training_finished, str(tmp_path / "run"), 10))
    callable_ = JobCallable(job)
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(
        RuntimeError, callable_)))
    thread.start()
    wait_for(lambda: "ready:" in open(job.log).read() if os.path.exists(job.log) else False, 30,
             "the child to start")
    wait_for(lambda: callable_._proc is not None, 30, "the launcher to record the child")
    delayed = callable_.checkpoint()  # what submitit calls on USR2 before requeueing
    thread.join(30)
    assert saved.read_text() == "saved"  # SIGTERM reached the child, which saved and exited
    assert "interrupted" in str(errors[0].value)
    assert isinstance(delayed.function, JobCallable) and delayed.function.job == job
    assert delayed.function._proc is None
    assert RD.last_event(job.log)[1]["outcome"] == "interrupted"


def test_smoke_study_end_to_end_through_submitit_local_executor(tmp_path):
    path = write_study(tmp_path / "sub.py", 'c.backend.name = "slurm"',
                       'c.backend.slurm.cluster = "local"', "c.backend.slurm.gpus_per_node = 0",
                       "c.overrides['run.steps'] = 300")
    root = tmp_path / "d"
    assert cli.main([path, "all", "--dir", str(root), "--quiet"]) == 0
    study, runs, _ = load(path, root)
    for r in runs:
        assert RD.training_finished(r.logdir, 300)
        assert [e for e, _ in events(r)] == ["queued", "start", "end"]
        assert [x["outcome"] for x in ends(r)] == [x["outcome"] for x in ends(r, "eval")] == [
            "done"]
        assert RD.read_eval_results(r.logdir)["checkpoint_step"] == 300
    assert len(os.listdir(root / "submitit")) >= 5  # 2 train + 2 eval + 1 reference jobs
    index = (root / "report" / "index.md").read_text()
    assert "2 planned runs: 2 aggregated, 0 missing or failed" in index
    assert "None: every planned run is evaluated and aggregated." in index
