"""Evaluation under visual shift: one trained agent on every shift x severity, then the paper's table across seeds.

  python evaluate.py runs/pusher__dinov2-partial__1__1712345678        # -> RUN/shift_eval.{json,csv,md}
  python evaluate.py RUN --shifts color,table --severities hard --episodes 10 --capture-video
  python evaluate.py RUN --shifts none                                  # in distribution only (and random)
  python evaluate.py aggregate runs/*/shift_eval.json --out table.md --plot plot.png

Every return is measured by pvm_dreamer.evaluate, the function train() evaluates with (the policy's mean action;
episode i reset with pd.EVAL_SEED + i), so the agent on each shifted env, the agent in distribution (ID), the
uniform-random policy and the evaluations logged during training see the same starts, and so do all agents of
a sweep: the evaluation seed is fixed, not the training seed.

The paper's robustness number is the drop in return, normalised by how far the agent got above random:
  drop % = (ID - shifted) / (ID - random) * 100     (0: no loss, 100: as bad as random; see drop_percent)
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

import envs  # first: sets the headless-rendering variables before mujoco loads
import pvm_dreamer as pd
import runtime
import shifts
from runtime import UsageError

CSV_COLUMNS = ("env", "pvm", "mode", "seed", "step", "policy", "shift", "severity", "mean", "std", "episodes",
               "returns", "final_dist_mean", "blind_dist_mean")
SEVERITY_ORDER = shifts.SEVERITIES + tuple(shifts.WEATHERS)  # x-axis / column order


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------
def drop_percent(id_return: float, shifted_return: float, random_return: float) -> float | None:
    """Drop in return under a shift as a % of the agent's gain over random: (ID - shifted) / (ID - random) * 100.
    0 = unaffected, 100 = no better than random, < 0 = better than ID. None when ID <= random: the agent has no
    gain to lose, so the ratio is undefined (printed "n/a")."""
    if id_return <= random_return:
        return None
    return (id_return - shifted_return) / (id_return - random_return) * 100.0


def mean_se(values) -> tuple[float, float | None]:
    """Mean and standard error over seeds, SE = std(ddof=1) / sqrt(n); no SE from a single seed."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None)


# ---------------------------------------------------------------------------------------------------------
# One run: checkpoint -> agent -> returns on ID, every shift x severity, and the random policy
# ---------------------------------------------------------------------------------------------------------
def load_agent(path: Path | str, device: str) -> tuple[pd.Dreamer, pd.Args, int, Path]:
    """Rebuild the agent from the flags saved in a checkpoint file, or in a run directory's newest intact one,
    and load its weights (replay and optimiser unused). Returns the agent, its args, step and checkpoint path."""
    ckpt, state = runtime.find_checkpoint(Path(path))
    known = {f.name for f in fields(pd.Args)}  # tolerate flags added or removed since the run was trained
    args = pd.Args(**{k: v for k, v in state["args"].items() if k in known})
    args.device = device
    env = pd.make_run_env(args)
    action_dim = env.action_space.shape[0]
    env.close()
    agent = pd.Dreamer(pd.make_encoder(args), action_dim, args)
    agent.load_state_dict(state["agent"])
    agent.to(runtime.resolve_device(device)).eval()
    return agent, args, int(state["step"]), ckpt


def parse_conditions(env: str, shift_arg: str, severity_arg: str) -> list[tuple[str, str]]:
    """--shifts / --severities -> [(shift, severity), ...], validated before anything runs."""
    valid = shifts.shift_names(env)
    names = valid if shift_arg == "all" else [s for s in shift_arg.split(",") if s and s != "none"]
    for s in names:
        if s not in valid:
            raise UsageError(f"unknown shift '{s}' for {env}; choose from: all, {', '.join(valid) or '(none)'}")
    sevs = [s for s in severity_arg.split(",") if s]
    for shift in names:
        for sev in sevs:
            if sev not in shifts.severities(shift)[1:]:
                raise UsageError(f"unknown severity '{sev}' for shift {shift}; choose from: "
                                    f"{', '.join(shifts.severities(shift)[1:])}")
    return [(shift, sev) for shift in names for sev in sevs]


def run_condition(agent, args: pd.Args, shift: str, severity: str, episodes: int, video: str,
                  zero_action: bool = False, num_envs: int = 1) -> dict:
    """pd.evaluate_episodes on fresh envs of this condition (num_envs > 1: that many, in their own processes,
    running episodes in parallel; the numbers do not change): {returns, and final_dist / blind_dist where the
    task has them}."""
    make = functools.partial(shifts.make_shifted_env, args.env, shift, severity, image_size=args.image_size,
                             seed=pd.EVAL_SEED, action_repeat=args.action_repeat)
    try:
        env = make() if num_envs == 1 else envs.ParallelEnvs(factories=[make] * num_envs)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    try:
        return pd.evaluate_episodes(agent, env, episodes, video, zero_action=zero_action)
    finally:
        env.close()  # MetaDrive allows one env per process


def evaluate_run(run: str | Path, episodes: int = 10, shift_arg: str = "all", severity_arg: str = "easy,medium,hard",
                 capture_video: bool = False, video_shift: str = "", device: str = "cpu",
                 num_envs: int = 1) -> list[dict]:
    """Evaluate the run's (newest) checkpoint on ID, every shift x severity and the random policy; write
    RUN/shift_eval.json, .csv and .md; return the rows. num_envs: envs per condition, run in parallel."""
    agent, args, step, ckpt = load_agent(Path(run), device)
    run_dir = runtime.run_dir_of(ckpt)
    if not shifts.shift_names(args.env):
        print(f"{args.env} has no visual shifts: evaluating in distribution only")
        shift_arg = ""
    conditions = [("none", "none")] + parse_conditions(args.env, shift_arg, severity_arg)
    video_shift = video_shift or ":".join(conditions[-1])  # default: the last (hardest) shift evaluated
    if capture_video and tuple(video_shift.split(":")) not in conditions:
        raise UsageError(f"--video-shift {video_shift} is not among the evaluated conditions; pass one of: "
                            + ", ".join(":".join(c) for c in conditions[1:]))
    meta = dict(env=args.env, pvm=args.pvm, mode="scratch" if args.pvm == "none" else args.mode, seed=args.seed,
                step=step)
    rows = []
    # The zero-action policy (reacher, pusher): with the random one, the floor a seeing agent must clear.
    baselines = [("random", "none", "none")] + ([("zero", "none", "none")] if args.env in envs.MUJOCO_TASKS else [])
    for policy, shift, sev in baselines + [("agent", *c) for c in conditions]:
        film = capture_video and policy == "agent" and (shift == "none" or f"{shift}:{sev}" == video_shift)
        video = str(run_dir / "videos" / f"shift_eval_{shift}_{sev}.mp4") if film else ""
        out = run_condition(agent if policy == "agent" else None, args, shift, sev, episodes, video,
                            zero_action=policy == "zero", num_envs=min(num_envs, episodes))
        rets = out["returns"]
        row = dict(meta, policy=policy, shift=shift, severity=sev, mean=float(rets.mean()),
                   std=float(rets.std()), episodes=len(rets), returns=rets.tolist())
        line = f"{policy:6s} {shift:12s} {sev:8s} return {rets.mean():9.2f} +- {rets.std():.2f}"
        if "final_dist" in out:
            row.update(final_dist_mean=float(out["final_dist"].mean()), final_dists=out["final_dist"].tolist(),
                       blind_dist_mean=float(out["blind_dist"].mean()), blind_dists=out["blind_dist"].tolist())
            line += f"   final distance {out['final_dist'].mean():.3f} m (blind bound {out['blind_dist'].mean():.3f})"
        rows.append(row)
        print(line)
    write_results(run_dir, rows, ckpt)
    return rows


def write_results(run_dir: Path, rows: list[dict], ckpt: Path):
    (run_dir / "shift_eval.json").write_text(json.dumps(dict(checkpoint=str(ckpt), eval_seed=pd.EVAL_SEED, rows=rows),
                                                        indent=1))
    with open(run_dir / "shift_eval.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "returns": " ".join(f"{x:.4g}" for x in r["returns"])} for r in rows)
    md = markdown_table(aggregate(rows)) + distance_table(rows)
    (run_dir / "shift_eval.md").write_text(md)
    print(md)


def distance_table(rows: list[dict]) -> str:
    """Seeing vs guessing, for one run on reacher / pusher: the final object-goal distance (mean +- SE over the
    episodes, on the same starts) of the agent in distribution, the zero-action and the random policy, beside the
    blind bound (envs.goal_distances). An agent that looks is clearly below the blind bound; one that learned a
    target-blind habit sits at it. Empty for tasks without distances."""
    have = {r["policy"]: r for r in rows if "final_dists" in r and r["shift"] == "none"}
    if "agent" not in have:
        return ""
    def fmt_se(values):
        m, se = mean_se(values)
        return f"{m:.3f} ± {se:.3f}" if se is not None else f"{m:.3f}"

    agent = have["agent"]
    lines = ["", f"Final distance to the goal, m ({agent['episodes']} episodes, same starts; mean ± SE):", "",
             "| agent | blind bound | zero action | random | agent − blind (SE) |", "|---|---|---|---|---|"]
    diff = np.asarray(agent["final_dists"]) - np.asarray(agent["blind_dists"])  # paired: the same starts
    m, se = mean_se(diff)
    margin = f"{m:+.3f} ({m / se:+.1f} SE)" if se else f"{m:+.3f}"
    lines.append(f"| {fmt_se(agent['final_dists'])} | {fmt_se(agent['blind_dists'])} | "
                 f"{fmt_se(have['zero']['final_dists']) if 'zero' in have else '-'} | "
                 f"{fmt_se(have['random']['final_dists']) if 'random' in have else '-'} | {margin} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Across runs: mean +- SE over seeds, per (env, encoder)
# ---------------------------------------------------------------------------------------------------------
def aggregate(rows: list[dict]) -> list[dict]:
    """Rows of shift_eval.json files (any mix of envs, encoders, seeds) -> one dict per (env, encoder, shift,
    severity): mean and SE over seeds of the return and of the drop %. Drops are computed per seed (against that
    seed's ID and random returns) and then averaged. shift "random" is the random policy, "none" is ID, and "mean"
    averages each seed over all its shifts at one severity (the plot's curve)."""
    runs = {}  # (env, encoder, seed) -> {(shift, severity): return}
    for r in rows:
        if r["policy"] == "zero":  # a distance baseline (distance_table), not part of the drop metric
            continue
        key = (r["env"], pd.encoder_label(r["pvm"], r["mode"]), r["seed"])
        cond = ("random", "none") if r["policy"] == "random" else (r["shift"], r["severity"])
        if cond in runs.setdefault(key, {}):
            raise UsageError(f"two results for {key[1]} seed {key[2]} on {key[0]} ({cond[0]}/{cond[1]}): "
                                "pass each run's shift_eval.json once")
        runs[key][cond] = r["mean"]
    for cells in runs.values():
        shifted = [c for c in cells if c[0] not in ("random", "none")]
        for sev in {c[1] for c in shifted}:
            cells[("mean", sev)] = float(np.mean([cells[c] for c in shifted if c[1] == sev]))
    out = []
    for env, enc in sorted({k[:2] for k in runs}):
        seeds = {k[2]: runs[k] for k in runs if k[:2] == (env, enc)}
        conds = sorted({c for cells in seeds.values() for c in cells}, key=condition_order)
        for shift, sev in conds:
            per_seed = [(cells.get(("none", "none")), cells.get(("random", "none")), cells[(shift, sev)])
                        for cells in seeds.values() if (shift, sev) in cells]
            ret, ret_se = mean_se([p[2] for p in per_seed])
            drops = [] if shift in ("random", "none") else [
                d for i, rnd, x in per_seed if i is not None and rnd is not None
                for d in [drop_percent(i, x, rnd)] if d is not None]
            drop, drop_se = mean_se(drops) if drops else (None, None)
            out.append(dict(env=env, encoder=enc, shift=shift, severity=sev, n=len(per_seed), mean=ret, se=ret_se,
                            drop=drop, drop_se=drop_se, drop_n=len(drops)))
    return out


def condition_order(cond: tuple[str, str]):
    shift_rank = {"random": -2, "none": -1, "mean": len(shifts.SHIFTS)}
    shift_rank.update({s: i for i, s in enumerate(shifts.SHIFTS)})
    return shift_rank.get(cond[0], 99), SEVERITY_ORDER.index(cond[1]) if cond[1] in SEVERITY_ORDER else 99


def fmt(mean: float | None, se: float | None, digits: int = 1) -> str:
    if mean is None:
        return "n/a"
    mean = 0.0 if round(mean, digits) == 0 else mean  # no "-0.0"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def markdown_table(agg: list[dict]) -> str:
    """The paper-style tables, per env: a summary (random, ID, mean over shifts per severity) and every shift."""
    lines = []
    for env in sorted({a["env"] for a in agg}):
        rows = [a for a in agg if a["env"] == env]
        encoders = list(dict.fromkeys(a["encoder"] for a in rows))
        get = {(a["encoder"], a["shift"], a["severity"]): a for a in rows}
        sevs = [s for s in SEVERITY_ORDER if any(a["shift"] == "mean" and a["severity"] == s for a in rows)]
        head = ["encoder", "seeds", "random", "ID", *sevs]
        lines += [f"### {env}", "", "Return (drop %) averaged over all shifts at each severity; mean ± SE over seeds.",
                  "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for enc in encoders:
            rnd, idr = get.get((enc, "random", "none")), get.get((enc, "none", "none"))
            cells = [enc, str(idr["n"] if idr else 0), fmt(rnd and rnd["mean"], rnd and rnd["se"]),
                     fmt(idr and idr["mean"], idr and idr["se"]), *(cell(get.get((enc, "mean", s))) for s in sevs)]
            lines.append("| " + " | ".join(cells) + " |")
        shifted = [a for a in rows if a["shift"] not in ("random", "none", "mean")]
        if shifted:
            lines += ["", "| encoder | shift | severity | return | drop % |", "|---|---|---|---|---|"]
        for a in shifted:
            lines.append(f"| {a['encoder']} | {a['shift']} | {a['severity']} | {fmt(a['mean'], a['se'])} | "
                         f"{fmt(a['drop'], a['drop_se'])} |")
        undefined = [a for a in rows if a["shift"] not in ("random", "none") and a["drop_n"] < a["n"]]
        if undefined:
            encs = sorted({a["encoder"] for a in undefined})
            lines.append(f"\nn/a or fewer seeds in a drop: ID return <= random for some seeds of {', '.join(encs)}, "
                         "where the drop is undefined; those seeds are left out of the drop.")
        lines.append("")
    return "\n".join(lines)


def cell(a: dict | None) -> str:
    return "" if a is None else f"{fmt(a['mean'], a['se'])} ({fmt(a['drop'], a['drop_se'], 0)})"


def plot(agg: list[dict], path: str):
    """Return vs severity (none = ID; each point the mean over shifts), one line per encoder, one panel per env."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env_names = sorted({a["env"] for a in agg})
    fig, axes = plt.subplots(1, len(env_names), figsize=(4.5 * len(env_names), 3.5), squeeze=False)
    for ax, env in zip(axes[0], env_names):
        rows = [a for a in agg if a["env"] == env]
        for enc in dict.fromkeys(a["encoder"] for a in rows):
            pts = [a for a in rows if a["encoder"] == enc and (a["shift"] == "mean" or a["shift"] == "none")]
            pts.sort(key=lambda a: SEVERITY_ORDER.index(a["severity"]))
            ax.errorbar([a["severity"] for a in pts], [a["mean"] for a in pts],
                        yerr=[a["se"] or 0.0 for a in pts], marker="o", capsize=3, label=enc)
        rnd = [a["mean"] for a in rows if a["shift"] == "random"]
        if rnd:
            ax.axhline(float(np.mean(rnd)), color="grey", ls="--", lw=1, label="random")
        ax.set(title=env, xlabel="severity (none = in distribution)", ylabel="return (mean over shifts)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        try:
            rows += json.loads(Path(p).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{p} is not a readable shift_eval.json ({type(e).__name__}): pass the files "
                                "that `python evaluate.py RUN` writes")
    return rows


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    with runtime.one_line_errors():
        if argv[:1] == ["aggregate"]:
            p = argparse.ArgumentParser(prog="evaluate.py aggregate", description="the paper's table across seeds")
            p.add_argument("results", nargs="+", help="shift_eval.json files (e.g. runs/*/shift_eval.json)")
            p.add_argument("--out", default="", help="also write the Markdown table to this file")
            p.add_argument("--plot", default="", help="write a PNG of return vs severity, one line per encoder")
            a = p.parse_args(argv[1:])
            agg = aggregate(read_rows(a.results))
            md = markdown_table(agg)
            print(md)
            if a.out:
                Path(a.out).write_text(md)
            if a.plot:
                plot(agg, a.plot)
            return agg
        p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                    epilog="python evaluate.py aggregate RESULTS.json... [--out table.md] [--plot p.png]")
        p.add_argument("run", help="a run directory or a checkpoint file")
        p.add_argument("--episodes", type=int, default=10, help="episodes per condition")
        p.add_argument("--shifts", default="all", help="all, none (in distribution only), or a comma list: "
                       + ", ".join(shifts.SHIFTS))
        p.add_argument("--severities", default="easy,medium,hard", help="comma list (weather also takes its names)")
        p.add_argument("--capture-video", action="store_true", help="first episode of ID and --video-shift as mp4")
        p.add_argument("--video-shift", default="", help="SHIFT:SEVERITY to film (default: the last one evaluated)")
        p.add_argument("--device", default="cpu", help="torch device: cpu | cuda | auto")
        p.add_argument("--envs", type=int, default=1, help="envs per condition, each in its own process, running "
                       "episodes in parallel (same numbers; pays off when an episode costs more than a process start)")
        a = p.parse_args(argv)
        if a.episodes < 1:
            raise UsageError(f"--episodes {a.episodes}: pass at least 1")
        if a.envs < 1:
            raise UsageError(f"--envs {a.envs}: pass at least 1 (1: the envs run in this process)")
        return evaluate_run(a.run, a.episodes, a.shifts, a.severities, a.capture_video, a.video_shift, a.device,
                            a.envs)


if __name__ == "__main__":
    main()
