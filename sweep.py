"""sweep.py: a grid of pvm-dreamer runs (pvm x mode x env x seed) as Ray tasks; re-launching resumes it.

  python sweep.py --pvm none,dinov2,clip --mode frozen,partial,full --env pusher --seeds 1,2,3 --logdir sweeps/s1 \\
      --eval-shifts -- --total-steps 200000        # flags after `--` go to every pvm_dreamer.py run
  python sweep.py ... --address auto               # on a running Ray cluster instead of a local one

Each run is a subprocess `pvm_dreamer.py ... --logdir LOGDIR --run-name ENV__ENCODER__sSEED` inside a Ray task
that asks for --cpus-per-run / --gpus-per-run. A run is finished when its directory holds `sweep_done.json`
(written after the run exits cleanly); a launch skips finished runs, resumes the others from their checkpoint
(`--resume LOGDIR/NAME`), and starts the rest. With --eval-shifts each finished run is then evaluated under
every visual shift (`evaluate.py RUN_DIR`, once: it writes RUN_DIR/shift_eval.json) and the sweep ends with
`evaluate.py aggregate`, the paper's table over seeds. Ray is needed only here (requirements-sweep.txt).
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))  # a Ray worker imports this module from elsewhere
import envs  # noqa: E402
import pvm_dreamer as pd  # noqa: E402
import runtime  # noqa: E402

DONE = "sweep_done.json"


def grid(o, extra: list[str]) -> list[dict]:
    """One job per (env, encoder, seed); the CNN has no fine-tuning mode, so `none` appears once per env/seed."""
    jobs, seen = [], set()
    for env, pvm, mode, seed in itertools.product(o.env.split(","), o.pvm.split(","), o.mode.split(","),
                                                  o.seeds.split(",")):
        name = f"{env}__{pd.encoder_label(pvm, mode)}__s{seed}"  # deterministic: a re-launch finds the same directory
        if name in seen:
            continue
        seen.add(name)
        flags = ["--env", env, "--pvm", pvm, "--seed", seed] + ([] if pvm == "none" else ["--mode", mode])
        jobs.append(dict(name=name, run_dir=str(o.logdir / name), logdir=str(o.logdir), flags=flags + extra,
                         python=o.python, eval_shifts=o.eval_shifts, eval_episodes=o.eval_episodes))
    return jobs


def find_checkpoint(run: Path) -> Path | None:
    """The run's newest checkpoint file (the agent itself skips a corrupt one when it resumes the run dir)."""
    paths = runtime.checkpoint_paths(run)
    return paths[-1] if paths else None


def finished(job: dict) -> bool:
    run = Path(job["run_dir"])
    evaluated = not job["eval_shifts"] or not (REPO / "evaluate.py").exists() or (run / "shift_eval.json").exists()
    return (run / DONE).exists() and evaluated


def run_job(job: dict) -> dict:
    """Runs on a Ray worker: train (fresh or resumed) unless done, then evaluate under shifts if asked."""
    run, log_path = Path(job["run_dir"]), Path(job["logdir"]) / "logs" / f"{job['name']}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        def call(cmd: list[str]) -> int:
            log.write(f"\n[sweep {time.strftime('%F %T')}] {' '.join(cmd)}\n")
            log.flush()
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode

        agent = [job["python"], str(REPO / "pvm_dreamer.py"), *job["flags"]]
        if not (run / DONE).exists():
            if find_checkpoint(run):
                cmd = agent + ["--resume", str(run)]
            else:  # nothing to resume (it stopped before its first checkpoint): keep what it wrote aside
                if run.exists():
                    (run.parent / ".aborted").mkdir(exist_ok=True)
                    shutil.move(str(run), str(run.parent / ".aborted" / f"{run.name}.{int(time.time())}"))
                cmd = agent + ["--logdir", job["logdir"], "--run-name", job["name"]]
            if rc := call(cmd):
                return dict(name=job["name"], ok=False, why=f"pvm_dreamer.py exited {rc}", log=str(log_path))
            (run / DONE).write_text(json.dumps(dict(cmd=cmd, finished=time.time()), indent=1))
        evaluate = REPO / "evaluate.py"
        if job["eval_shifts"] and evaluate.exists() and not (run / "shift_eval.json").exists():
            if rc := call([job["python"], str(evaluate), str(run), "--episodes", str(job["eval_episodes"])]):
                return dict(name=job["name"], ok=False, why=f"evaluate.py exited {rc}", log=str(log_path))
    return dict(name=job["name"], ok=True)


def progress(jobs_left: dict, done: int, failed: int, total: int, started_after: float, logdir: Path) -> str:
    """A run counts as running once its task has opened its log; queued ones wait for a free worker."""
    running = sum((logdir / "logs" / f"{n}.log").exists() and (logdir / "logs" / f"{n}.log").stat().st_mtime
                  >= started_after for n in jobs_left.values())
    return (f"[sweep {time.strftime('%T')}] finished {done}/{total}, running {running}, "
            f"queued {len(jobs_left) - running}, failed {failed}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="flags after `--` are passed to every pvm_dreamer.py run")
    p.add_argument("--pvm", default="none,dinov2,clip", help="comma list of " + " | ".join(pd.PVMS)
                   + " (default: the paper's three encoders)")
    p.add_argument("--mode", default=",".join(pd.MODES), help="comma list of " + " | ".join(pd.MODES) + " (PVMs only)")
    p.add_argument("--env", default="pusher", help="comma list of environments (see envs.py)")
    p.add_argument("--seeds", default="1,2,3", help="comma list of seeds")
    p.add_argument("--logdir", type=Path, default=Path("sweeps"), help="one run directory per grid point in here")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs each Ray task reserves")
    p.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs each Ray task reserves (0.5: two per GPU)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (`auto` or HOST:PORT); default: start "
                   "a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--eval-shifts", action="store_true", help="after each run: evaluate.py RUN_DIR (shift table)")
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes per shift condition for evaluate.py")
    p.add_argument("--python", default=sys.executable, help="interpreter of the runs (the same path on every node)")
    o = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    for key, allowed in (("pvm", set(pd.PVMS)), ("mode", set(pd.MODES)), ("env", set(envs.ENV_NAMES))):
        bad = set(getattr(o, key).split(",")) - allowed
        if bad:
            runtime.fail(f"--{key} {','.join(sorted(bad))} unknown; choose from {','.join(sorted(allowed))}")
    o.logdir = o.logdir.resolve()  # workers may run elsewhere: absolute paths (on a shared filesystem)
    try:
        import ray
    except ImportError:
        runtime.fail("sweep.py needs Ray: pip install -r requirements-sweep.txt")

    jobs = grid(o, extra)
    todo = [j for j in jobs if not finished(j)]
    print(f"[sweep] {len(jobs)} runs in {o.logdir}: {len(jobs) - len(todo)} already finished, {len(todo)} to run")
    if todo:
        ray.init(address=o.address, num_cpus=None if o.address else o.num_cpus, include_dashboard=False,
                 log_to_driver=False)
        task = ray.remote(num_cpus=o.cpus_per_run, num_gpus=o.gpus_per_run)(run_job)
        start = time.time()
        left = {task.remote(j): j["name"] for j in todo}
        done, failures, last = len(jobs) - len(todo), [], ""
        while left:
            ready, _ = ray.wait(list(left), timeout=5.0)
            for ref in ready:
                left.pop(ref)
                result = ray.get(ref)
                done += result["ok"]
                if not result["ok"]:
                    failures.append(result)
                    print(f"[sweep] FAILED {result['name']}: {result['why']} (log: {result['log']})")
            line = progress(left, done, len(failures), len(jobs), start, o.logdir)
            if line.split("] ")[1] != last:  # print when something changed
                print(line, flush=True)
                last = line.split("] ")[1]
        ray.shutdown()
    else:
        failures = []
    results = sorted(glob.glob(str(o.logdir / "*" / "shift_eval.json")))
    if results and (REPO / "evaluate.py").exists():
        subprocess.run([o.python, str(REPO / "evaluate.py"), "aggregate", *results, "--out",
                        str(o.logdir / "shift_table.md"), "--plot", str(o.logdir / "shift_plot.png")], cwd=REPO)
    if failures:
        print(f"[sweep] {len(failures)} runs failed; re-launch the same command to retry them (finished runs are kept)")
        sys.exit(1)
    return jobs


if __name__ == "__main__":
    main()
