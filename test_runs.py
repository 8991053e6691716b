"""Tests of runs and the scripts on top of the method: the command line, logs, checkpoints, resume, kills and
signals (runtime.py), one evaluation path, evaluate.py, probe.py, bench.py and sweep.py. Offline, CPU."""
import functools
import json
import math
import os
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
import pvm_dreamer as pd
import runtime
import shifts
from test_pvm_dreamer import REPO, TINY, main_in_process, read_rows, tiny_args


# ---------------------------------------------------------------------------------------------------------
# End to end: the command line, logs, checkpoints, resume
# ---------------------------------------------------------------------------------------------------------
E2E = ["--env", "reacher", "--size", "tiny", "--image-size", "32", "--pvm-image-size", "32", "--pvm-id", "tiny",
       "--pvm-random-init", "--total-steps", "200", "--learning-starts", "100", "--train-ratio", "64",
       "--batch-size", "4", "--batch-length", "16", "--eval-every", "100", "--eval-episodes", "2",
       "--checkpoint-every", "100", "--log-every", "50"]


def run_cli(args, tmp_path, check=True):
    proc = subprocess.run([sys.executable, str(REPO / "pvm_dreamer.py"), "--logdir", str(tmp_path), *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc



@pytest.mark.parametrize("pvm,mode", [("none", "full"), ("dinov2", "frozen"), ("dinov2", "partial"),
                                      ("dinov2", "full"), ("clip", "frozen"), ("clip", "partial"), ("clip", "full")])
def test_end_to_end_run_writes_logs_and_a_loadable_checkpoint(pvm, mode, tmp_path):
    video = ["--capture-video"] if pvm == "none" else []
    proc = run_cli([*E2E, "--pvm", pvm, "--mode", mode, "--run-name", "r", "--finetune-blocks", "2", *video], tmp_path)
    run_dir = tmp_path / "r"
    assert "trainable" in proc.stdout
    if video:  # one video per evaluation (step 0, 100, 200), each a readable clip of 32x32 frames
        import imageio.v3 as iio

        clips = sorted(run_dir.glob("videos/*.mp4"))
        assert len(clips) == 3
        assert iio.imread(clips[-1]).shape[1:] == (32, 32, 3)
    rows = read_rows(run_dir)
    assert any("wm/loss" in r for r in rows) and any("eval/return_mean" in r for r in rows)
    assert any("eval/random_return_mean" in r for r in rows)
    assert list(run_dir.glob("events.out.tfevents.*"))
    args = runtime.parse_cli(pd.Args, [*E2E, "--pvm", pvm, "--mode", mode, "--finetune-blocks", "2"])
    state = pd.load_checkpoint(run_dir, args)  # the command's own flags load it
    assert state["step"] == 200 and state["updates"] > 0
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    agent.load_state_dict(state["agent"])  # every tensor matches the freshly built model


def test_resume_continues_at_the_saved_step(tmp_path):
    run_cli([*E2E, "--run-name", "r"], tmp_path)
    run_dir = tmp_path / "r"
    first = pd.load_checkpoint(run_dir, runtime.parse_cli(pd.Args, E2E))
    rows_before = read_rows(run_dir)
    proc = run_cli([*E2E, "--total-steps", "300", "--resume", str(run_dir)], tmp_path)
    state = pd.load_checkpoint(run_dir, runtime.parse_cli(pd.Args, [*E2E, "--total-steps", "300"]))
    assert first["step"] == 200 and state["step"] == 300 and state["updates"] > first["updates"]
    rows = read_rows(run_dir)
    steps = [r["step"] for r in rows if "charts/episodic_return" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and steps[-1] == 300
    assert rows[:len(rows_before)] == rows_before  # the first run's rows are kept, none duplicated
    # A checkpoint from another configuration is refused with the flags to use.
    proc = run_cli([*E2E, "--pvm", "clip", "--resume", str(run_dir)], tmp_path, check=False)
    assert proc.returncode == 2 and "--pvm none" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,needle", [
    (["--env", "atari"], "atari"),
    (["--image-size", "50"], "image-size 50"),
    (["--pvm", "dinov2", "--finetune-blocks", "9"], "finetune-blocks 9"),
    (["--device", "cuda:0"], "cuda"),
    (["--pvm", "foo"], "'--pvm'"),  # tyro's own errors, folded into one line
    (["--checkpoint-evry", "5"], "perhaps you meant --checkpoint-every"),
])
def test_bad_input_gives_one_line_error(flags, needle, tmp_path):
    if "cuda" in needle and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_cli([*E2E, *flags], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


def project_imports() -> dict[str, set[str]]:
    """module -> the project's modules it imports anywhere in its source (top level or inside a function)."""
    import ast

    mods = {p.stem for p in REPO.glob("*.py") if not p.stem.startswith("test_")}
    graph = {}
    for m in mods:
        tree = ast.parse((REPO / f"{m}.py").read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[m] = names & mods - {m}
    return graph


def test_imports_run_one_way():
    """shifts -> envs; pvm_dreamer -> envs, runtime; runtime imports nothing of the project; the scripts sit on
    top and nothing imports them back (probe -> evaluate is script on script, still one way)."""
    g = project_imports()
    assert g["runtime"] == set() and g["envs"] == set() and g["shifts"] == {"envs"}
    assert g["pvm_dreamer"] == {"envs", "runtime"}
    scripts = {"evaluate", "probe", "bench", "sweep", "gallery"}
    assert not any(g[m] & scripts for m in ("pvm_dreamer", "runtime", "envs", "shifts"))
    seen, done = set(), set()

    def visit(m, path):  # depth-first search for a cycle
        assert m not in seen - done, f"import cycle: {' -> '.join(path + [m])}"
        if m not in done:
            seen.add(m)
            for n in g[m]:
                visit(n, path + [m])
            done.add(m)
    for m in g:
        visit(m, [])


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, str(REPO / "pvm_dreamer.py"), "--help"], capture_output=True,
                         text=True, timeout=120).stdout
    for name in pd.Args.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out, name
    env_help = " ".join(out.split("--env STR")[1].split("--seed")[0].split())
    assert all(name in env_help for name in envs.ENV_NAMES), env_help  # every task is named where it is chosen


# ---------------------------------------------------------------------------------------------------------
# Evaluation under shift (evaluate.py): drop %, aggregation over seeds, checkpoint -> table end to end
# ---------------------------------------------------------------------------------------------------------
import evaluate as ev  # noqa: E402


def test_drop_percent():
    assert ev.drop_percent(100.0, 75.0, 0.0) == 25.0
    assert ev.drop_percent(-10.0, -40.0, -40.0) == 100.0  # as bad as random
    assert ev.drop_percent(10.0, 12.0, 2.0) == -25.0  # better than in distribution
    assert ev.drop_percent(5.0, 0.0, 5.0) is None and ev.drop_percent(1.0, 0.0, 3.0) is None  # ID <= random


def shift_rows(pvm, mode, seed, id_ret, rnd, shifted: dict, env="pusher"):
    base = dict(env=env, pvm=pvm, mode=mode, seed=seed, step=100, std=0.0, episodes=1)
    rows = [dict(base, policy="random", shift="none", severity="none", mean=rnd, returns=[rnd]),
            dict(base, policy="agent", shift="none", severity="none", mean=id_ret, returns=[id_ret])]
    return rows + [dict(base, policy="agent", shift=s, severity=v, mean=x, returns=[x]) for (s, v), x in shifted.items()]


def test_aggregate_mean_and_standard_error_over_seeds():
    rows = (shift_rows("dinov2", "partial", 1, 10.0, 0.0, {("color", "hard"): 5.0, ("table", "hard"): 10.0})
            + shift_rows("dinov2", "partial", 2, 20.0, 0.0, {("color", "hard"): 10.0, ("table", "hard"): 0.0})
            + shift_rows("none", "scratch", 1, 1.0, 2.0, {("color", "hard"): 0.0, ("table", "hard"): 1.0}))
    agg = {(a["encoder"], a["shift"], a["severity"]): a for a in ev.aggregate(rows)}
    a = agg[("dinov2-partial", "none", "none")]
    assert a["n"] == 2 and a["mean"] == 15.0 and a["se"] == pytest.approx(np.std([10, 20], ddof=1) / np.sqrt(2))
    a = agg[("dinov2-partial", "color", "hard")]  # drops 50 % and 50 %
    assert a["mean"] == 7.5 and a["drop"] == 50.0 and a["drop_se"] == 0.0
    a = agg[("dinov2-partial", "table", "hard")]  # drops 0 % and 100 %
    assert a["drop"] == 50.0 and a["drop_se"] == pytest.approx(50.0)
    a = agg[("dinov2-partial", "mean", "hard")]  # per seed mean over shifts: 7.5 (drop 25 %), 5 (drop 75 %)
    assert a["mean"] == 6.25 and a["drop"] == 50.0
    cnn = agg[("cnn", "color", "hard")]  # one seed, ID below random: no SE, drop undefined
    assert cnn["se"] is None and cnn["drop"] is None and agg[("cnn", "random", "none")]["mean"] == 2.0
    md = ev.markdown_table(ev.aggregate(rows))
    assert "| dinov2-partial | 2 | 0.0 ± 0.0 | 15.0 ± 5.0 | 6.2 ± 1.2 (50 ± 25) |" in md
    assert "| cnn | color | hard | 0.0 | n/a |" in md and "ID return <= random" in md
    with pytest.raises(pd.UsageError, match="once"):  # the same run passed twice
        ev.aggregate(rows + rows[:2])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("shift_eval")
    pd.main(["--env", "reacher", "--size", "tiny", "--image-size", "32", "--total-steps", "120", "--learning-starts",
             "60", "--batch-size", "2", "--batch-length", "8", "--eval-episodes", "1", "--logdir", str(logdir),
             "--run-name", "r"])
    return logdir / "r"


def test_evaluate_command_writes_the_table(tiny_run, tmp_path):
    import csv

    ev.main([str(tiny_run), "--episodes", "1", "--shifts", "color,table", "--severities", "hard", "--capture-video",
             "--video-shift", "table:hard"])
    rows = json.loads((tiny_run / "shift_eval.json").read_text())["rows"]
    conds = [(r["policy"], r["shift"], r["severity"]) for r in rows]
    assert conds == [("random", "none", "none"), ("zero", "none", "none"), ("agent", "none", "none"),
                     ("agent", "color", "hard"), ("agent", "table", "hard")]
    assert all(r["step"] == 120 and r["seed"] == 1 and r["pvm"] == "none" and len(r["returns"]) == 1 for r in rows)
    # reacher: every row has the final fingertip-target distance and the blind bound of the same start
    assert all(len(r["final_dists"]) == 1 and 0 <= r["final_dists"][0] < 0.45 for r in rows)
    assert len({r["blind_dists"][0] for r in rows[:3]}) == 1  # the same start for random, zero and the agent
    with open(tiny_run / "shift_eval.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == ev.CSV_COLUMNS and len(table) == 5 and table[0]["policy"] == "random"
    assert float(table[0]["final_dist_mean"]) == rows[0]["final_dist_mean"]
    md = (tiny_run / "shift_eval.md").read_text()
    assert "| cnn | color | hard |" in md and "| cnn | table | hard |" in md
    assert "| agent | blind bound | zero action | random |" in md  # the seeing-vs-guessing line
    logged = [r for r in read_rows(tiny_run) if "eval/final_dist_mean" in r]  # ... also logged while training
    assert logged and all(0 <= r["eval/final_dist_mean"] < 0.45 and r["eval/blind_dist_mean"] > 0 for r in logged)
    assert sorted(p.name for p in tiny_run.glob("videos/shift_eval_*.mp4")) == ["shift_eval_none_none.mp4",
                                                                              "shift_eval_table_hard.mp4"]
    # Two seeds' results (the second a relabelled copy) -> aggregate table and plot from the command line.
    other = json.loads((tiny_run / "shift_eval.json").read_text())
    for r in other["rows"]:
        r["seed"], r["mean"] = 2, r["mean"] + 1.0
    (tmp_path / "s2.json").write_text(json.dumps(other))
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "aggregate", str(tiny_run / "shift_eval.json"),
                           str(tmp_path / "s2.json"), "--out", str(tmp_path / "t.md"), "--plot",
                           str(tmp_path / "p.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| cnn | 2 |" in (tmp_path / "t.md").read_text() and " ± 0.5" in proc.stdout
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_py_in_parallel_envs_gives_the_same_table(tiny_run):
    """evaluate.py --envs 2 runs each condition's episodes on two shifted envs in their own processes: the same
    returns as one env in this process, for the agent, the random policy and a shift."""
    rows = {}
    for m in (1, 2):
        ev.main([str(tiny_run), "--episodes", "3", "--shifts", "color", "--severities", "hard", "--envs", str(m)])
        rows[m] = json.loads((tiny_run / "shift_eval.json").read_text())["rows"]
    assert [(r["policy"], r["shift"]) for r in rows[1]] == [(r["policy"], r["shift"]) for r in rows[2]]
    for a, b in zip(rows[1], rows[2]):
        np.testing.assert_allclose(a["returns"], b["returns"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("flags,needle", [(["--shifts", "fog"], "camera"), (["--severities", "extreme"], "medium"),
                                          (["--episodes", "0"], "at least 1"), (["--envs", "0"], "at least 1")])
def test_evaluate_bad_input_is_one_line(tiny_run, flags, needle):
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), str(tiny_run), *flags], capture_output=True,
                          text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


def test_checkpoint_lookup_takes_the_newest_intact_one(tmp_path):
    for step in (100, 200):
        runtime.save_checkpoint(tmp_path, dict(format=runtime.CHECKPOINT_FORMAT, step=step), keep=3)
    newest = tmp_path / "checkpoints" / "ckpt_000000200.pt"
    assert runtime.newest_intact(tmp_path)[0] == newest
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated: skipped for the one before
    ckpt, state = runtime.newest_intact(tmp_path)
    assert ckpt == tmp_path / "checkpoints" / "ckpt_000000100.pt" and state["step"] == 100
    assert newest.exists()  # reported, not renamed, without fix_corrupt
    assert runtime.newest_intact(tmp_path / "missing") is None
    with pytest.raises(pd.UsageError, match="no such run directory"):
        ev.load_agent(tmp_path / "missing", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pd.UsageError, match="no checkpoint in"):
        ev.load_agent(tmp_path / "empty", "cpu")


def test_a_checkpoint_from_before_finetune_norm_resumes_only_with_it(tmp_path):
    """Partial runs saved before --finetune-norm existed trained the final norm (their optimiser holds it):
    resuming one without the flag is refused in one line that names it; a CNN run's flags are unaffected."""
    partial = {k: v for k, v in vars(pd.Args(mode="partial", pvm="dinov2", **TINY)).items() if k != "finetune_norm"}
    runtime.save_checkpoint(tmp_path, dict(step=5, args=partial), keep=1)
    with pytest.raises(pd.UsageError, match="rerun with --finetune-norm$"):
        pd.load_checkpoint(tmp_path, pd.Args(mode="partial", pvm="dinov2", **TINY))
    assert pd.load_checkpoint(tmp_path, pd.Args(mode="partial", pvm="dinov2", finetune_norm=True, **TINY))["step"] == 5
    cnn = {k: v for k, v in vars(pd.Args(**TINY)).items() if k != "finetune_norm"}
    runtime.save_checkpoint(tmp_path, dict(step=6, args=cnn), keep=1)
    assert pd.load_checkpoint(tmp_path, pd.Args(**TINY))["step"] == 6


def test_one_evaluation_path_training_and_evaluate_py_agree(tmp_path, capsys):
    """The evaluation logged at the end of training and evaluate.py's in-distribution row score the same
    checkpoint on the same starts with the same function: the same returns, to the last digit (evaluate.py
    --shifts none: in distribution only)."""
    pd.main(["--env", "pointmass", "--size", "tiny", "--image-size", "32", "--total-steps", "60", "--learning-starts",
             "30", "--batch-size", "2", "--batch-length", "8", "--eval-episodes", "2", "--logdir", str(tmp_path),
             "--run-name", "r"])
    logged = [r for r in read_rows(tmp_path / "r") if "eval/return_mean" in r]
    random_logged = next(r for r in read_rows(tmp_path / "r") if "eval/random_return_mean" in r)
    ev.main([str(tmp_path / "r"), "--episodes", "2", "--shifts", "none"])
    rows = json.loads((tmp_path / "r" / "shift_eval.json").read_text())["rows"]
    assert [(r["policy"], r["shift"]) for r in rows] == [("random", "none"), ("agent", "none")]
    assert logged[-1]["step"] == 60 and rows[1]["mean"] == logged[-1]["eval/return_mean"]
    assert rows[0]["mean"] == random_logged["eval/random_return_mean"]
    table = [line for line in (tmp_path / "r" / "shift_eval.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 3 and len({line.count("|") for line in table}) == 1, table  # a well-formed table


# ---------------------------------------------------------------------------------------------------------
# Segmentation probe (probe.py): Jaccard, the attention-mass threshold, ground truth, end to end
# ---------------------------------------------------------------------------------------------------------
import probe  # noqa: E402


def test_jaccard_on_constructed_masks():
    a = np.zeros((4, 4), bool)
    a[:2] = True  # top half
    assert probe.jaccard(a, a) == 1.0
    assert probe.jaccard(a, ~a) == 0.0
    b = np.zeros((4, 4), bool)
    b[1:3] = True  # shares one row of two with a: 4 / 12
    assert probe.jaccard(a, b) == pytest.approx(1 / 3)
    assert probe.jaccard(a, np.ones((4, 4), bool)) == 0.5
    assert probe.jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_top_mass_mask_keeps_the_smallest_set_holding_the_mass():
    att = np.array([[0.1, 0.5], [0.3, 0.1]])
    assert probe.top_mass_mask(att, 0.6).tolist() == [[False, True], [True, False]]  # 0.5 < 0.6 <= 0.8
    assert probe.top_mass_mask(att, 0.5).tolist() == [[False, True], [False, False]]  # 0.5 alone holds it
    assert probe.top_mass_mask(att, 1.0).all()
    batch = np.stack([att * 7.0, att[::-1]])  # scale-free, and each map of a batch on its own
    out = probe.top_mass_mask(batch, 0.6)
    assert out.shape == (2, 2, 2) and (out[0] == probe.top_mass_mask(att, 0.6)).all() and (out[1] == out[0][::-1]).all()


def test_ground_truth_mask_covers_the_task_objects_and_follows_the_arm():
    frames, masks = probe.collect("pusher", "none", "none", n=4, image_size=64, seed=0)
    assert frames.shape == (4, 64, 64, 3) and masks.shape == (4, 64, 64)
    assert all(0.02 < m.mean() < 0.5 for m in masks)  # objects in view, table and background not in the mask
    red = (frames[..., 0] > 180) & (frames[..., 1] < 60) & (frames[..., 2] < 60)  # the red goal's pixels
    assert red.any() and masks[red].mean() > 0.9
    assert (masks[0] != masks[-1]).sum() > 20  # random actions moved the arm over 15 steps
    env = shifts.make_shifted_env("pusher", seed=0, image_size=64)
    env.reset(seed=0)
    geoms = probe.task_geoms(env.unwrapped.model, "pusher")
    before = probe.mujoco_segmentation(env, geoms)
    for _ in range(5):
        env.step(np.ones(7, np.float32))
    after = probe.mujoco_segmentation(env, geoms)
    env.close()
    assert before.any() and (before != after).sum() > 20


@pytest.mark.parametrize("pvm", ["dinov2", "clip"])
def test_probe_end_to_end_on_random_tiny_pvm(pvm, tmp_path, capsys):
    out = tmp_path / "probe.png"
    torch.manual_seed(0)  # the random tiny ViT
    summary = probe.main(["--pvm", pvm, "--pvm-id", "tiny", "--pvm-random-init", "--env", "pusher", "--image-size",
                          "32", "--pvm-image-size", "32", "--frames", "3", "--shift", "color", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in printed and "Jaccard" in printed
    assert set(summary["results"]) == {"ID", "color:hard"} and summary["random_weights"]
    for r in summary["results"].values():
        assert 0.0 <= r["mean"] <= 1.0 and 0.0 < r["chance"] < 1.0 and len(r["per_frame"]) == 3 and len(r["per_head"]) == 2
        assert 0.0 < r["attn_fraction"] < 1.0  # a mask, neither empty nor every patch
    assert out.read_bytes()[:4] == b"\x89PNG" and json.loads(out.with_suffix(".json").read_text())["env"] == "pusher"


@pytest.mark.parametrize("flags,needle", [(["--env", "metadrive-topdown"], "unsupported"),
                                          (["--shift", "fog"], "camera"), ([], "--pvm dinov2|clip")])
def test_probe_bad_input_is_one_line(flags, needle, capsys):
    pvm = [] if not flags else ["--pvm", "dinov2", "--pvm-id", "tiny", "--pvm-random-init", "--pvm-image-size", "32"]
    with pytest.raises(SystemExit) as e:
        probe.main([*pvm, "--image-size", "32", "--frames", "1", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_part_drawn_on_constructed_frames():
    """1 when the reconstruction is the frame, 0 when it is the frame with the part hidden, in between for a faint
    part; the control scores another episode's reconstruction (rolled by one) against this one's part."""
    rng = np.random.default_rng(0)
    blanks = rng.integers(0, 60, (3, 2, 8, 8, 3)).astype(np.uint8)
    frames, masks = blanks.copy(), np.zeros((3, 2, 8, 8), bool)
    for e in range(3):  # the part: a 2x2 red square, in a different place in each episode
        masks[e, :, 2 * e:2 * e + 2, 2 * e:2 * e + 2] = True
    frames[masks] = (200, 20, 20)
    exact = probe.part_drawn(frames, frames, masks, blanks)
    assert exact["score"] == 1.0 and exact["part_pixels"] == 4.0
    assert exact["control"] == pytest.approx(0.0, abs=0.02)  # the next episode's frame: blank here, up to noise
    assert probe.part_drawn(blanks, frames, masks, blanks)["score"] == 0.0
    faint = (0.5 * frames.astype(float) + 0.5 * blanks).round().astype(np.uint8)
    assert probe.part_drawn(faint, frames, masks, blanks)["score"] == pytest.approx(0.75, abs=0.01)  # error halved
    with pytest.raises(probe.UsageError, match="--episodes"):
        probe.part_drawn(frames[:1], frames[:1], masks[:1], blanks[:1])


def test_collect_episodes_marks_the_reacher_target_and_hides_it():
    frames, actions, masks, blanks = probe.collect_episodes("reacher", 2, 32, 2)
    assert frames.shape == blanks.shape == (2, 26, 32, 32, 3) and masks.shape == (2, 26, 32, 32)
    assert actions.shape == (2, 26, 2) and not actions[:, 0].any() and actions[:, 1:].any()
    assert 20 < masks.sum((-2, -1)).mean() < 60  # the 50 mm target is ~7 px across at 32x32
    changed = np.abs(frames.astype(int) - blanks).sum(-1) > 30
    assert changed[masks].mean() > 0.95 and changed[~masks].mean() < 0.02  # hiding it changes its pixels alone
    assert (masks[0, 0] != masks[1, 0]).any()  # the episodes' targets differ
    with pytest.raises(probe.UsageError, match="--env reacher"):
        probe.collect_episodes("pointmass", 2, 32, 1)


def test_reconstruction_probe_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "rec.png"
    summary = probe.main(["--checkpoint", str(tiny_run), "--reconstruction", "--episodes", "2", "--out", str(out)])
    assert "goal drawn" in capsys.readouterr().out
    assert summary["env"] == "reacher" and summary["part"] == "goal" and summary["step"] == 120
    assert summary["score"] < 1.0 and summary["control"] < 1.0  # an untrained 120-step model
    assert out.read_bytes()[:4] == b"\x89PNG" and json.loads(out.with_suffix(".json").read_text())["score"] == summary["score"]
    for flags, needle in [([], "--checkpoint RUN_DIR"), (["--checkpoint", str(tiny_run), "--shift", "color"],
                                                         "drop --shift"),
                          (["--checkpoint", str(tiny_run), "--episodes", "1"], "--episodes >= 2")]:
        with pytest.raises(SystemExit) as e:
            probe.main(["--reconstruction", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], err


# --- runs that survive: crash-safe checkpoints, resume, pre-emption, NaN stop, one-line errors for bad input ---
SURVIVE = ["--env", "pointmass", "--size", "tiny", "--image-size", "32", "--batch-size", "2", "--batch-length", "8",
           "--learning-starts", "20", "--train-ratio", "4", "--eval-episodes", "1", "--eval-every", "50",
           "--log-every", "10", "--checkpoint-every", "15", "--keep-checkpoints", "2"]
PVM_TINY = ["--pvm-id", "tiny", "--pvm-random-init", "--pvm-image-size", "32"]



def ckpt_steps(run_dir):
    return [int(p.stem.split("_")[1]) for p in runtime.checkpoint_paths(run_dir)]


# Runs pvm_dreamer.py with os.replace slowed down for checkpoint renames: the process then sits between writing
# ckpt.tmp and renaming it for SECONDS, so a test can kill it there.
SLOW_SAVE = """import os, runpy, sys, time
seconds, replace, sys.argv = float(sys.argv[1]), os.replace, sys.argv[2:]  # argv: pvm_dreamer.py FLAGS...
def slow_replace(src, dst, *a, **kw):
    if os.path.basename(src) == "ckpt.tmp":
        time.sleep(seconds)
    return replace(src, dst, *a, **kw)
os.replace = slow_replace
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def spawn(run_dir, *flags, slow_save: float = 0.0):
    log = open(run_dir.parent / f"{run_dir.name}.{time.time_ns()}.log", "w")
    slow = ["-c", SLOW_SAVE, str(slow_save)] if slow_save else []
    cmd = [sys.executable, *slow, str(REPO / "pvm_dreamer.py"), *SURVIVE, "--logdir", str(run_dir.parent), *flags]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir.parent)


def wait_for(cond, proc, timeout=300.0):  # generous: start-up alone takes minutes on a busy 2-core machine
    end = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before the point to kill it"
        assert time.time() < end, "timed out waiting for the run"
        time.sleep(0.02)


def test_kill_9_at_random_points_then_resume(tmp_path):
    """SIGKILL at 6 random points (one during start-up, two inside a checkpoint write, between the write and
    the rename), resuming each time: the run ends at its last step, the checkpoint chain is short and intact,
    and the episode rows tile the timeline with no row missing or repeated, in metrics.jsonl and TensorBoard."""
    import random

    rng, run_dir, total = random.Random(0), tmp_path / "r", 200
    resumed_from = [0]
    for i in range(6):
        slow = i in (2, 4)
        newest = max(ckpt_steps(run_dir), default=-1)
        t0 = time.time()
        proc = spawn(run_dir, "--total-steps", str(total), *(["--resume", str(run_dir)] if i else ["--run-name", "r"]),
                     slow_save=1.0 if slow else 0.0)
        if i:
            resumed_from.append(newest)
        tmp = run_dir / "checkpoints" / "ckpt.tmp"
        if i == 1:  # during start-up (imports, model build): nothing may change
            time.sleep(rng.uniform(0.2, 1.5))
        elif slow:  # inside save_checkpoint, after the tmp file is written and before its rename
            wait_for(lambda: tmp.exists() and tmp.stat().st_mtime > t0 and max(ckpt_steps(run_dir)) >= 0, proc)
            time.sleep(rng.uniform(0.1, 0.8))
        else:  # anywhere in the loop, once this process has written a checkpoint of its own
            wait_for(lambda: max(ckpt_steps(run_dir), default=-1) > newest, proc)
            time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        proc.wait()
        if slow:
            assert tmp.exists() and max(ckpt_steps(run_dir)) == newest  # the killed write left only ckpt.tmp
    resumed_from.append(max(ckpt_steps(run_dir)))
    print("resumed from steps", resumed_from)
    proc = spawn(run_dir, "--total-steps", str(total), "--resume", str(run_dir))
    assert proc.wait(timeout=120) == 0

    steps = ckpt_steps(run_dir)
    assert steps[-1] == total and len(steps) <= 2 and steps == sorted(set(steps))
    assert not list(run_dir.glob("checkpoints/*.corrupt"))  # a kill never leaves a bad checkpoint
    assert len(set(resumed_from)) >= 3  # the kills landed at different steps
    rows = read_rows(run_dir)
    episodes = [(r["step"], r["charts/episodic_length"]) for r in rows if "charts/episodic_return" in r]
    ends = [s for s, _ in episodes]
    assert ends == sorted(set(ends)) and total - 25 < ends[-1] <= total  # pointmass episodes: 25 steps
    # Each episode starts where the previous one ended, or at the checkpoint a resumed run started from.
    for (prev, _), (end, length) in zip([(0, 0), *episodes], episodes):
        start = end - length
        assert start == prev or (start in resumed_from and start > prev), (prev, end, length, resumed_from)
    evals = [r["step"] for r in rows if "eval/return_mean" in r]
    assert evals == sorted(set(evals)) and evals[-1] == total
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir))
    tb.Reload()
    assert [e.step for e in tb.Scalars("charts/episodic_return")] == ends


def test_corrupt_newest_checkpoint_is_reported_kept_and_skipped(tmp_path, capsys):
    run_dir = tmp_path / "r"
    code, _, _ = main_in_process([*SURVIVE, "--logdir", str(tmp_path), "--run-name", "r", "--total-steps", "45",
                                  "--keep-checkpoints", "3"], capsys)
    assert code == 0 and ckpt_steps(run_dir) == [15, 30, 45]
    newest, middle = runtime.checkpoint_paths(run_dir)[-1], runtime.checkpoint_paths(run_dir)[-2]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor: torch.load alone would not notice
    middle.write_bytes(bytes(data))
    with pytest.raises(runtime.CorruptCheckpoint, match="sha256"):
        runtime.read_checkpoint(middle)
    code, _, err = main_in_process([*SURVIVE, "--logdir", str(tmp_path), "--total-steps", "60", "--resume",
                                    str(run_dir)], capsys)
    assert code == 0, err
    reports = [line for line in err.splitlines() if "is corrupt" in line]
    assert len(reports) == 2 and all(line.endswith("using ckpt_000000015.pt") for line in reports), reports
    assert "truncated" in reports[0] and "sha256" in reports[1]
    assert sorted(p.name for p in run_dir.glob("checkpoints/*.corrupt")) == [middle.name + ".corrupt",
                                                                               newest.name + ".corrupt"]
    assert ckpt_steps(run_dir)[-1] == 60
    rows = [r["step"] for r in read_rows(run_dir) if "charts/episodic_return" in r]
    assert rows == sorted(set(rows)) and 15 < rows[-1] <= 60
    # Naming the corrupt file itself is an error, not a silent fallback.
    code, _, err = main_in_process([*SURVIVE, "--logdir", str(tmp_path), "--resume",
                                    str(run_dir / "checkpoints" / (newest.name + ".corrupt"))], capsys)
    assert code == 2 and err.startswith("error:") and "corrupt" in err and len(err.strip().splitlines()) == 1


def test_sigterm_saves_at_the_current_step_and_exits_0_and_a_second_signal_aborts(tmp_path):
    import signal

    run_dir = tmp_path / "r"
    proc = spawn(run_dir, "--run-name", "r", "--total-steps", "100000", "--checkpoint-every", "100000")
    wait_for(lambda: ckpt_steps(run_dir) == [0], proc)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    log = next(tmp_path.glob("r.*.log")).read_text()
    stopped = int(log.split("stopped by SIGTERM at step ")[1].split(",")[0])
    assert stopped > 0 and ckpt_steps(run_dir) == [0, stopped]  # mid-episode, off the --checkpoint-every grid
    assert runtime.find_checkpoint(run_dir)[1]["step"] == stopped
    # A second signal while the checkpoint is being written aborts at once, leaving the older checkpoints.
    proc = spawn(run_dir, "--total-steps", "100000", "--resume", str(run_dir),
                 slow_save=120.0)
    tmp = run_dir / "checkpoints" / "ckpt.tmp"
    time.sleep(3.0)
    wait_for(lambda: "step/s" in max(tmp_path.glob("r.*.log"), key=os.path.getmtime).read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    wait_for(tmp.exists, proc)
    t = time.time()
    proc.send_signal(signal.SIGINT)
    # The default action, from the kernel: killed by SIGINT (a shell reports 130).
    assert proc.wait(timeout=100) == -signal.SIGINT and time.time() - t < 60  # the save alone would take 120 s
    assert ckpt_steps(run_dir) == [0, stopped]


def test_non_finite_loss_stops_without_saving(tmp_path, capsys, monkeypatch):
    real, calls = pd.train_step, []

    def poisoned(agent, opt, batch):  # the 30th update returns a NaN reconstruction loss
        metrics = real(agent, opt, batch)
        calls.append(1)
        return {**metrics, "wm/loss_rec": float("nan")} if len(calls) == 30 else metrics

    monkeypatch.setattr(pd, "train_step", poisoned)
    run_dir = tmp_path / "r"
    code, _, err = main_in_process([*SURVIVE, "--logdir", str(tmp_path), "--run-name", "r", "--total-steps", "500"],
                                   capsys)
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(line) == 1 and "wm/loss_rec is nan" in line[0] and "(update 30)" in line[0], err
    stopped = int(line[0].split(" at step ")[1].split()[0])
    kept = int(line[0].split("checkpoint of step ")[1].split()[0])
    assert ckpt_steps(run_dir)[-1] == kept < stopped  # nothing new was saved
    assert runtime.read_checkpoint(runtime.checkpoint_paths(run_dir)[-1])["updates"] < 30
    assert all(np.isfinite(v) for r in read_rows(run_dir) for k, v in r.items())  # no NaN reached the logs


def test_train_ratio_sets_the_number_of_updates(tmp_path, capsys):
    """--train-ratio R: R replayed steps per env step, i.e. one update of B*T steps every B*T/R env steps once
    learning has started. SURVIVE: B*T = 16, R = 4, learning from step 20: steps 20..100 owe 81/4 updates."""
    code, _, err = main_in_process([*SURVIVE, "--logdir", str(tmp_path), "--run-name", "r", "--total-steps", "100"],
                                   capsys)
    assert code == 0, err
    state = runtime.read_checkpoint(runtime.checkpoint_paths(tmp_path / "r")[-1])
    assert state["step"] == 100 and state["updates"] == 81 // 4 and state["updates_due"] == pytest.approx(0.25)


def test_evaluation_leaves_the_training_run_unchanged(tmp_path, capsys):
    """Evaluation runs on its own env with its own seeded streams: a run that evaluates every 20 steps trains on
    exactly the data (episode starts, actions, frames) and reaches exactly the weights of a run that never
    evaluates. (It once reset the training env with the evaluation seeds, so training starts depended on
    --eval-every.)"""
    states = {}
    for name, flags in (("eval", ["--eval-every", "20", "--eval-episodes", "2"]), ("none", ["--eval-episodes", "0"])):
        code, _, err = main_in_process([*SURVIVE, "--logdir", str(tmp_path), "--run-name", name, "--total-steps",
                                        "100", *flags], capsys)
        assert code == 0, err
        states[name] = runtime.read_checkpoint(runtime.checkpoint_paths(tmp_path / name)[-1])
    evals = [r for r in read_rows(tmp_path / "eval") if "eval/return_mean" in r]
    assert len(evals) >= 4 and not any("eval/return_mean" in r for r in read_rows(tmp_path / "none"))
    a, b = ({k: v[0] for k, v in states[n]["replay"]["data"].items()} for n in ("eval", "none"))  # one env: stream 0
    first_frames = a["image"][a["is_first"]]
    assert len(first_frames) >= 4 and np.array_equal(first_frames, b["image"][b["is_first"]])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, states["none"]["agent"][k]) for k, v in states["eval"]["agent"].items())


def test_evaluation_is_deterministic_and_restores_torch_rng():
    torch.manual_seed(0)
    args = tiny_args(env="pointmass")
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    env = pd.make_run_env(args)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = pd.evaluate(agent, env, 2)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    torch.manual_seed(2)
    assert np.array_equal(pd.evaluate(agent, env, 2), first)  # whatever the caller's seed
    assert np.array_equal(pd.evaluate(None, env, 2), pd.evaluate(None, env, 2))
    env.close()


def test_evaluation_gives_the_same_numbers_on_one_env_or_several_in_parallel():
    """Each evaluation episode has its own reset seed and its own latent-sample and random-action streams, so
    running 4 episodes on 3 envs in parallel (episode 3 runs on env 0 while envs 1 and 2 are parked) gives what
    one env gives running them one after another, for the agent, random and zero actions; the goal distances
    too. Only the batch size of the agent's matmuls differs, hence the tolerance. And episode i does not depend
    on how many episodes were asked for."""
    torch.manual_seed(0)
    args = tiny_args(env="reacher")
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    make = functools.partial(envs.make_env, "reacher", args.image_size, 0, args.action_repeat)
    one, three = make(), envs.ParallelEnvs(factories=[make] * 3)
    try:
        for policy, zero in ((agent, False), (None, False), (None, True)):
            a = pd.evaluate_episodes(policy, one, 4, zero_action=zero)
            b = pd.evaluate_episodes(policy, three, 4, zero_action=zero)
            assert set(a) == set(b) == {"returns", "final_dist", "blind_dist"}
            for key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6)
            assert len(set(np.round(a["returns"], 6))) == 4  # four different starts, not one start four times
        head = pd.evaluate_episodes(agent, one, 2)["returns"]
        np.testing.assert_array_equal(head, pd.evaluate_episodes(agent, one, 4)["returns"][:2])
    finally:
        one.close()
        three.close()


def test_evaluating_on_the_training_env_puts_its_generators_back(tmp_path):
    """Where evaluation must share the training env (MetaDrive: one engine per process), eval_row restores the
    env's generators: the next training reset and random action are those of a run without evaluation."""
    torch.manual_seed(0)
    args = tiny_args(env="pointmass", eval_episodes=2)
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    env = pd.make_run_env(args)
    env.reset(seed=5)
    saved = envs.rng_state(env)
    expected = env.reset()[0], env.action_space.sample()
    envs.set_rng_state(env, saved)
    row = pd.eval_row(agent, envs.ParallelEnvs(env), env, args, tmp_path, 0)  # the training envs: this one env
    assert np.isfinite(row["eval/return_mean"])
    got = env.reset()[0], env.action_space.sample()
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    env.close()


class ActionLog(gym.Wrapper):
    def __init__(self, env):
        super().__init__(env)
        self.actions = []

    def step(self, action):
        self.actions.append(np.array(action))
        return self.env.step(action)


def test_evaluation_acts_with_the_policy_mean():
    """The evaluated policy is the actor's mean action: making the actor's spread 10x wider leaves every
    evaluation action and return unchanged (sampled actions would scatter)."""
    torch.manual_seed(0)
    args = tiny_args(env="pointmass")
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    runs = []
    for std_bias in (-20.0, 20.0):  # actor_dist: std = minstd 0.1 .. maxstd 1.0
        with torch.no_grad():
            agent.actor[-1].bias[2:] = std_bias
        env = ActionLog(pd.make_run_env(args))
        runs.append((pd.evaluate(agent, env, 2), np.stack(env.actions)))
        env.close()
    assert np.array_equal(runs[0][0], runs[1][0])
    np.testing.assert_allclose(runs[0][1], runs[1][1], atol=1e-6)
    assert np.abs(runs[0][1]).max() < 0.5  # the untrained actor's mean is near 0: nothing clipped away


def test_same_seed_same_losses(tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        code, _, err = main_in_process([*SURVIVE, "--logdir", str(tmp_path), "--run-name", name, "--total-steps", "80",
                                        "--device", "cpu"], capsys)
        assert code == 0, err
        runs.append([{k: v for k, v in r.items() if k != "charts/sps"} for r in read_rows(tmp_path / name)])
    assert sum("wm/loss" in r for r in runs[0]) >= 3 and runs[0] == runs[1]


def test_resume_at_an_episode_end_reproduces_the_uninterrupted_run(tmp_path, capsys):
    """Stopping at step 50 (a pointmass episode ends there) and resuming must change nothing: this checks
    that the checkpoint holds every piece of state (networks, optimisers, return normaliser, replay and its
    RNG, the global and env RNGs, the fraction of an update owed, the losses not yet logged)."""
    flags = [*SURVIVE, "--logdir", str(tmp_path), "--checkpoint-every", "50", "--keep-checkpoints", "5"]
    assert main_in_process([*flags, "--run-name", "a", "--total-steps", "100"], capsys)[0] == 0
    assert main_in_process([*flags, "--run-name", "b", "--total-steps", "50"], capsys)[0] == 0
    code, _, err = main_in_process([*flags, "--resume", str(tmp_path / "b"), "--total-steps", "100"], capsys)
    assert code == 0, err
    rows = [[{k: v for k, v in r.items() if k != "charts/sps"} for r in read_rows(tmp_path / n)] for n in "ab"]
    assert rows[0] == rows[1] and sum("wm/loss" in r and r["step"] > 50 for r in rows[0]) >= 2
    a, b = (runtime.read_checkpoint(tmp_path / n / "checkpoints" / "ckpt_000000100.pt") for n in "ab")
    assert a["updates"] == b["updates"] > 0
    for k in a["agent"]:
        assert torch.equal(a["agent"][k], b["agent"][k]), k


def test_four_envs_resume_every_stream_and_log_each_episode(tmp_path, capsys):
    """--num-envs 4: four pointmass envs in their own processes, stepped together. Stopping at step 100 (where
    all four episodes end) and resuming reproduces the uninterrupted run: the checkpoint holds every env's
    generators and every replay stream. Each ended episode is a row of its own, with its env index, at its own
    step (env i's step of a vector step is step0 + i + 1); the four streams hold one env's frames each."""
    flags = [*SURVIVE, "--num-envs", "4", "--logdir", str(tmp_path), "--checkpoint-every", "100",
             "--keep-checkpoints", "5"]
    assert main_in_process([*flags, "--run-name", "a", "--total-steps", "200"], capsys)[0] == 0
    assert main_in_process([*flags, "--run-name", "b", "--total-steps", "100"], capsys)[0] == 0
    code, _, err = main_in_process([*flags, "--resume", str(tmp_path / "b"), "--total-steps", "200"], capsys)
    assert code == 0, err
    rows = [[{k: v for k, v in r.items() if k != "charts/sps"} for r in read_rows(tmp_path / n)] for n in "ab"]
    assert rows[0] == rows[1]
    ends = [(r["step"], r["charts/env_index"]) for r in rows[0] if "charts/env_index" in r]
    assert ends == [(97, 0), (98, 1), (99, 2), (100, 3), (197, 0), (198, 1), (199, 2), (200, 3)]
    a, b = (runtime.read_checkpoint(tmp_path / n / "checkpoints" / "ckpt_000000200.pt") for n in "ab")
    assert a["updates"] == b["updates"] > 0 and len(a["rng"]["env"]) == 4
    for k in a["agent"]:
        assert torch.equal(a["agent"][k], b["agent"][k]), k
    streams = a["replay"]["data"]["image"]
    assert len(streams) == 4 and all(len(x) == 2 * (1 + 25) for x in streams)  # per env: 2 x (reset + 25 steps)
    for key, per_stream in a["replay"]["data"].items():
        for x, y in zip(per_stream, b["replay"]["data"][key]):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(streams[0][1], streams[1][1])  # different envs, different starts


def test_a_run_that_is_being_written_cannot_be_resumed_twice(tmp_path, capsys):
    """While one process trains into RUN (here: this test holds RUN/.lock the way a live run does), --resume
    of RUN stops with one line and writes nothing; once the holder lets go, the resume works."""
    import fcntl

    run_dir = tmp_path / "r"
    assert main_in_process([*SURVIVE, "--logdir", str(tmp_path), "--run-name", "r", "--total-steps", "30"], capsys)[0] == 0
    fd = os.open(run_dir / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails if the finished run had not let go of its lock
    before = tree(run_dir)
    code, _, err = main_in_process([*SURVIVE, "--logdir", str(tmp_path), "--resume", str(run_dir), "--total-steps", "60"],
                                   capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "another process is training in" in err, err
    assert tree(run_dir) == before
    os.close(fd)  # the other process ends
    code, _, err = main_in_process([*SURVIVE, "--logdir", str(tmp_path), "--resume", str(run_dir), "--total-steps", "60"],
                                   capsys)
    assert code == 0, err
    assert max(ckpt_steps(run_dir)) == 60

def test_tyro_error_boxes_fold_into_one_line():
    want = "invalid choice 'foo' for argument '--pvm'. Expected one of ('none', 'dinov2', 'clip')."
    unicode_box = ("╭─ Invalid choice ───────────────╮\n│ invalid choice 'foo' for argument '--pvm'. Expected one of ('none', │\n"
                   "│ 'dinov2', 'clip').   │\n│ ──────────── │\n│ For full helptext, run x --help │\n╰──────────╯\n")
    ascii_box = (" Invalid choice    \n ---------------- \n  invalid choice 'foo' for argument '--pvm'. Expected one of ('none', \n"
                 "  'dinov2', 'clip').  \n  ---------------\n  For full helptext, run\n  x --help  \n")
    assert runtime.one_line(unicode_box) == runtime.one_line(ascii_box) == want
    unknown = ("╭─ Unrecognized options ─╮\n│ Unrecognized options: --chekpoint-every │\n│ ──── │\n│ Perhaps you meant: │\n"
               "│     --checkpoint-every INT │\n│         agent steps between checkpoints │\n╰────╯\n")
    assert runtime.one_line(unknown) == "Unrecognized options: --chekpoint-every; perhaps you meant --checkpoint-every"


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A logdir holding a finished run `old` and a directory with a format-1 checkpoint.pt."""
    log = tmp_path_factory.mktemp("logdir")
    pd.main([*SURVIVE, "--logdir", str(log), "--run-name", "old", "--total-steps", "30"])
    (log / "legacy").mkdir()
    torch.save(dict(format=1, step=5), log / "legacy" / "checkpoint.pt")
    return log


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("flags,needle,env", [
    (["--env", "atari"], "atari", {}),
    (["--pvm", "foo"], "'--pvm'", {}),
    (["--mode", "half"], "'half'", {}),
    (["--size", "huge"], "'huge'", {}),
    (["--seed", "x"], "--seed", {}),
    (["--keep-checkpoints", "0"], "--keep-checkpoints 0", {}),
    (["--finetune-blocks", "-1"], "--finetune-blocks -1", {}),
    (["--pvm", "dinov2", *PVM_TINY, "--finetune-blocks", "9"], "--finetune-blocks 9", {}),
    (["--image-size", "50"], "--image-size 50", {}),
    (["--image-size", "8"], "--image-size 8", {}),
    (["--pvm", "clip", *PVM_TINY, "--pvm-image-size", "36"], "patch size", {}),
    (["--pvm", "dinov2", "--pvm-id", "facebook/no-such-model"], "not cached", {"HF_HUB_OFFLINE": "1"}),
    (["--resume", "{log}/old", "--pvm", "clip", *PVM_TINY], "--pvm none", {}),
    (["--resume", "{log}/legacy"], "format-1", {}),
    (["--resume", "{log}/nowhere"], "no such run directory", {}),
    (["--run-name", "old"], "--resume {log}/old", {}),
    (["--env", "metadrive"], "MetaDrive", {}),
    (["--env", "reacher"], "MUJOCO_GL=nonsense", {"MUJOCO_GL": "nonsense"}),
    (["--device", "cuda"], "--device cpu", {}),
    (["--pvm", "dinov2", *PVM_TINY, "--pvm-image-size", "0"], "--pvm-image-size 0", {}),  # was a late traceback
    (["--logdir", "/proc/nope"], "/proc/nope", {}),
    (["--logdir", "{log}/old/metrics.jsonl"], "is a file", {}),
    (["--run-name", "x" * 300], "File name too long", {}),  # found by the fuzz test
    (["--wm-lr", "nan"], "--wm-lr nan must be a finite number", {}),
    (["--seed", "-1"], "--seed -1", {}),
    (["--lam", "2"], "--lam 2.0 must be in 0..1", {}),
    (["--replay-size", str(10**12)], "lower --replay-size", {}),
    (["--device", "meta"], "--device meta", {}),
])
def test_bad_input_is_one_line_exit_2_and_leaves_runs_untouched(flags, needle, env, old_run, tmp_path, capsys,
                                                                 monkeypatch):
    if "--device" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for k, v in {"HF_HOME": str(tmp_path), **env}.items():
        monkeypatch.setenv(k, v)
    before = tree(old_run)
    code, _, err = main_in_process([*SURVIVE, "--logdir", str(old_run), *(f.format(log=old_run) for f in flags)],
                                   capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle.format(log=old_run) in lines[0], lines[0]
    assert tree(old_run) == before



def test_bench_quick_prints_one_row_per_configuration():
    proc = subprocess.run([sys.executable, str(REPO / "bench.py"), "--quick", "--only", "cnn,dinov2-frozen,clip-full"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    for col in ("env-steps/s", "updates/s", "s/update", "CPU s/update", "x CNN", "peak RSS GB"):
        assert col in head, head
    rows = [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    # cnn, dinov2-frozen with and without the feature cache, clip-full (no cache in full mode)
    assert [(r["encoder"], r["feature cache"]) for r in rows] == [
        ("cnn", "-"), ("dinov2-frozen", "on"), ("dinov2-frozen", "off"), ("clip-full", "-")]
    for r in rows:
        assert float(r["s/update"]) > 0 and float(r["CPU s/update"]) > 0 and float(r["peak RSS GB"]) > 0.05
        assert float(r["updates/s"]) == pytest.approx(1 / float(r["s/update"]), rel=0.02)
    assert rows[0]["x CNN"] == "1.0"
    # --num-envs: a row per N; env-steps/s against the CNN's at the same N; the env workers' memory for N > 1;
    # --spawn: the rows run in spawned processes, as they must on CUDA; --count-ops: ops of an update and an env step.
    proc = subprocess.run([sys.executable, str(REPO / "bench.py"), "--quick", "--only", "cnn", "--num-envs", "1,3",
                           "--spawn", "--count-ops"],  # rows in spawned processes: the path CUDA takes
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    assert [(r["encoder"], r["envs"], r["÷ CNN's"]) for r in rows] == [("cnn", "1", "1.00"), ("cnn", "3", "1.00")]
    assert all(float(r["encoder ms/frame"]) > 0 for r in rows) and rows[0]["env workers GB"] == "-"
    assert float(rows[1]["env workers GB"]) > 0.05
    assert int(rows[0]["aten ops/update"]) == int(rows[1]["aten ops/update"]) > 1000  # N does not change an update
    # the kernels among them: fewer than the calls (views, allocations and nested calls launch none), and many
    assert 300 < int(rows[0]["compute ops/update"]) == int(rows[1]["compute ops/update"]) < int(rows[0]["aten ops/update"])
    # acting: one encoder and policy call for all N frames, so 3 envs launch about a third as many ops per env step
    assert 10 < int(rows[1]["compute ops/env step"]) < 0.5 * int(rows[0]["compute ops/env step"])
    # value reads: on a CPU fused Adam's kernel reads its step counts, so an update makes some
    assert int(rows[0]["value reads/update"]) == int(rows[1]["value reads/update"]) > 0
    bad = subprocess.run([sys.executable, str(REPO / "bench.py"), "--only", "vgg"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "vgg" in bad.stderr


def test_memory_accounting_counts_what_the_backward_pass_keeps():
    """bench.py --memory counts the tensors saved for backward on fake tensors (shapes only). It must give the
    bytes, part by part, that the same count gives on real CPU tensors; with --grad-checkpoint a fully fine-tuned
    ViT must keep exactly its blocks' inputs and the uint8 frames, and far less than without; nested, only its
    groups' inputs, while a group's recompute also holds its g blocks' inputs (a nested chain)."""
    import bench

    base = dict(size="tiny", image_size=32, batch_size=2, batch_length=4, pvm="dinov2", pvm_id="tiny",
                pvm_random_init=True, pvm_image_size=32, replay_size=100)
    for kw in (dict(pvm="none"), dict(mode="partial", finetune_blocks=1),
               dict(mode="full", grad_checkpoint="on", precision="bf16")):
        args = pd.Args(**{**base, **kw})
        fake, real = bench.held_for_backward(args), bench.held_for_backward(args, fake=False)
        assert fake["wm"]["decoder"] > 0 and fake["ac"]["rollout"] > 0 and fake.keys() == real.keys(), fake
        if args.precision == "fp32":
            assert fake == real, (kw, fake, real)
        else:  # bf16: torch's fake LayerNorm keeps its per-row mean/rstd in bf16, the CPU kernel in fp32 (1/C of
            # the norm's input: up to ~6% of a part at these tiny widths, <1% at the paper's)
            for k in ("wm", "ac"):
                assert fake[k].keys() == real[k].keys(), (fake[k], real[k])
                for part, b in real[k].items():
                    assert 0.9 * b <= fake[k][part] <= b, (part, fake[k][part], b)
    full = {ck: bench.held_for_backward(pd.Args(**base, mode="full", grad_checkpoint="on" if ck else "off"))
            for ck in (False, True)}
    enc = pd.make_encoder(pd.Args(**base, mode="full"))
    n, (tokens, width) = 2 * 4, enc.prefix_shape()
    kept = len(enc.blocks) * n * tokens * width * 4 + n * 32 * 32 * 3  # fp32 block inputs + uint8 frames
    assert full[True]["wm"]["encoder"] == kept, (full[True]["wm"]["encoder"], kept)
    assert full[False]["wm"]["encoder"] > 3 * kept and 0 < full[True]["recompute"] < full[False]["wm"]["encoder"]
    assert bench.peak_estimate(full[True]) < bench.peak_estimate(full[False])
    nested = bench.held_for_backward(pd.Args(**base, mode="full", grad_checkpoint="nested"))
    block_input, g = n * tokens * width * 4, math.ceil(math.sqrt(len(enc.blocks)))  # 6 blocks: 2 groups of 3
    assert nested["wm"]["encoder"] == -(-len(enc.blocks) // g) * block_input + n * 32 * 32 * 3
    assert nested["recompute"] == full[True]["recompute"] + g * block_input, (nested["recompute"], full[True])
    for ck in (False, True):  # the other parts do not depend on the encoder's checkpointing
        assert {k: v for k, v in full[ck]["wm"].items() if k != "encoder"} == \
            {k: v for k, v in full[not ck]["wm"].items() if k != "encoder"} and full[ck]["ac"] == full[not ck]["ac"]
    # the CLI: fp32 / bf16 x --grad-checkpoint off / on (/ nested where a ViT trains)
    proc = subprocess.run([sys.executable, str(REPO / "bench.py"), "--memory", "--quick", "--only", "cnn,dinov2-full"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    assert [(r["encoder"], r["precision"], r["grad ckpt"]) for r in rows] == [
        (e, p, c) for e in ("cnn", "dinov2-full") for p in ("fp32", "bf16")
        for c in ("off", "on") + ("nested",) * (e != "cnn")]
    peak = {(r["encoder"], r["precision"], r["grad ckpt"]): float(r["est. peak GiB"].strip("*")) for r in rows}
    assert peak["dinov2-full", "fp32", "on"] < peak["dinov2-full", "fp32", "off"]
    assert peak["dinov2-full", "bf16", "off"] < peak["dinov2-full", "fp32", "off"]
    assert all(int(r["largest B for 12 GiB"]) > 2 * 8 for r in rows)  # tiny models: far more than B = 2 fits


SWEEP_RUN = ["--size", "tiny", "--image-size", "32", "--pvm-image-size", "32", "--pvm-id", "tiny", "--pvm-random-init",
             "--total-steps", "50", "--learning-starts", "40", "--train-ratio", "8", "--batch-size", "2",
             "--batch-length", "4", "--eval-episodes", "0", "--checkpoint-every", "25"]  # one 50-step episode


def test_sweep_runs_a_grid_on_ray_and_a_relaunch_does_no_work_twice(tmp_path):
    pytest.importorskip("ray", reason="Ray is optional (pip install -r requirements-sweep.txt); sweep.py needs it")
    import sweep

    cmd = [sys.executable, str(REPO / "sweep.py"), "--pvm", "none,dinov2", "--mode", "frozen", "--env", "pointmass",
           "--seeds", "1,2", "--logdir", str(tmp_path), "--num-cpus", "2", "--", *SWEEP_RUN]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    names = sorted(f"pointmass__{e}__s{s}" for e in ("cnn", "dinov2-frozen") for s in (1, 2))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and "__" in p.name) == names
    assert "finished 4/4, running 0, queued 0, failed 0" in proc.stdout
    for name in names:
        run = tmp_path / name
        assert (run / sweep.DONE).exists()
        pvm, mode = ("none", "partial") if "cnn" in name else ("dinov2", "frozen")  # the CNN run keeps the default
        args = runtime.parse_cli(pd.Args, [*SWEEP_RUN, "--env", "pointmass", "--pvm", pvm, "--mode", mode, "--seed",
                                           name[-1]])
        assert pd.load_checkpoint(sweep.find_checkpoint(run), args)["step"] == 50  # the final checkpoint
    snapshot = lambda: {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}  # noqa: E731
    # Re-launch after "a crash" of one run (its done-marker gone): only that one runs, resumed from its checkpoint.
    (tmp_path / names[0] / sweep.DONE).unlink()
    before = snapshot()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "3 already finished, 1 to run" in proc.stdout
    changed = {p.relative_to(tmp_path).parts[0] for p, t in snapshot().items() if before.get(p) != t}
    assert changed <= {names[0], "logs"}  # no other run directory was touched
    log = (tmp_path / "logs" / f"{names[0]}.log").read_text()
    assert log.count("[sweep ") == 2 and f"--resume {tmp_path / names[0]}" in log
    for other in names[1:]:
        assert (tmp_path / "logs" / f"{other}.log").read_text().count("[sweep ") == 1
    # A third launch has nothing to do and starts no Ray instance.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "4 already finished, 0 to run" in proc.stdout


# --- safe from the first second: signals at every moment, flags that never end in a traceback ---------------
def test_stop_is_honoured_between_updates_and_the_resumed_run_pays_what_it_owed(tmp_path, capsys, monkeypatch):
    """SIGTERM while one env step owes many updates stops after the current update (not after all of them);
    the checkpoint records the updates still owed, and the resumed run runs them first: the update count ends
    where the uninterrupted run's does."""
    import signal

    real, calls = pd.train_step, []

    def signalling(agent, opt, batch):
        calls.append(1)
        if len(calls) == 10:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, i.e. inside this update
        return real(agent, opt, batch)

    flags = [*SURVIVE, "--logdir", str(tmp_path), "--train-ratio", "400", "--total-steps", "30"]  # 25 per step
    monkeypatch.setattr(pd, "train_step", signalling)
    code, out, err = main_in_process([*flags, "--run-name", "r"], capsys)
    assert code == 0 and "stopped by SIGTERM at step 20" in out, out + err
    state = runtime.find_checkpoint(tmp_path / "r")[1]
    assert state["step"] == 20 and state["updates"] == 10 and state["updates_due"] == pytest.approx(15)
    monkeypatch.setattr(pd, "train_step", real)
    assert main_in_process([*flags, "--resume", str(tmp_path / "r")], capsys)[0] == 0
    assert main_in_process([*flags, "--run-name", "u"], capsys)[0] == 0
    done, uninterrupted = (runtime.find_checkpoint(tmp_path / n)[1] for n in ("r", "u"))
    assert done["updates"] == uninterrupted["updates"] == 11 * 25


def test_no_update_ever_is_said_up_front(tmp_path, capsys):
    """--total-steps 60 with the default --batch-length 64 could never train: one warning line says so."""
    code, out, err = main_in_process([*SURVIVE, "--batch-length", "64", "--logdir", str(tmp_path), "--run-name", "a",
                                      "--total-steps", "60"], capsys)
    warnings = [line for line in err.splitlines() if "trains NOTHING" in line]
    assert code == 0 and len(warnings) == 1 and "--total-steps 60" in warnings[0], err
    assert "updates" in out and "0 updates" in out
    code, _, err = main_in_process([*SURVIVE, "--logdir", str(tmp_path), "--run-name", "b", "--total-steps", "60"],
                                   capsys)
    assert code == 0 and "trains NOTHING" not in err


def test_resume_accepts_schedule_changes_and_refuses_experiment_changes(tmp_path, capsys):
    flags = [*SURVIVE, "--logdir", str(tmp_path)]
    assert main_in_process([*flags, "--run-name", "r", "--total-steps", "30"], capsys)[0] == 0
    before = tree(tmp_path / "r")
    for changed, named in ((["--wm-lr", "3e-4"], "--wm-lr 0.0001"), (["--seed", "2"], "--seed 1"),
                           (["--no-checkpoint-replay", "--batch-size", "4"], "--batch-size 2"),
                           (["--pvm-random-init"], "--no-pvm-random-init")):
        code, _, err = main_in_process([*flags, "--resume", str(tmp_path / "r"), *changed], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "trained with other settings" in lines[0], err
        assert lines[0].endswith("rerun with " + named), lines[0]  # exactly the differing flag, as typed
        assert tree(tmp_path / "r") == before
    code, _, err = main_in_process([*flags, "--resume", str(tmp_path / "r"), "--total-steps", "60", "--eval-every",
                                    "20", "--log-every", "5", "--checkpoint-every", "30", "--device", "cpu"], capsys)
    assert code == 0, err
    assert max(ckpt_steps(tmp_path / "r")) == 60


# pvm_dreamer.py run with one of its functions wrapped: argv = PATCH FLAGS..., PATCH one of the bodies below.
PATCHED = """import os, sys, time
sys.path.insert(0, os.environ["REPO"])
import envs, torch
import pvm_dreamer as pd
patch, sys.argv[1:] = sys.argv[1], sys.argv[2:]
if patch == "slow-build":  # model construction that takes seconds (the env is built after the PVM)
    real_env = envs.make_env
    def make_env(*a, **kw):
        print("BUILDING", flush=True)
        time.sleep(4.0)
        return real_env(*a, **kw)
    envs.make_env = make_env
if patch == "long-update":  # an update inside one C call of seconds, where no Python-level handler can run
    real_step = pd.train_step
    def train_step(*a):
        print("UPDATE", flush=True)
        torch.set_num_threads(1)
        x = torch.ones(8000, 8000)
        x @ x
        print("UPDATE DONE", flush=True)
        return real_step(*a)
    pd.train_step = train_step
pd.main(sys.argv[1:])
"""


def spawn_patched(run_dir, patch, *flags):
    log = run_dir.parent / f"{run_dir.name}.{patch}.log"
    proc = subprocess.Popen([sys.executable, "-c", PATCHED, patch, *SURVIVE, "--logdir", str(run_dir.parent), *flags],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=run_dir.parent,
                            env={**os.environ, "REPO": str(REPO)})
    return proc, log


def test_sigterm_while_the_models_are_built_saves_step_0_and_stops_cleanly(tmp_path):
    import signal

    run_dir = tmp_path / "r"
    proc, log = spawn_patched(run_dir, "slow-build", "--run-name", "r", "--total-steps", "100")
    wait_for(lambda: "BUILDING" in log.read_text(), proc)
    assert not run_dir.exists()  # nothing is written before the models and envs are built
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
    assert "stopped by SIGTERM at step 0" in log.read_text() and ckpt_steps(run_dir) == [0]
    code = subprocess.run([sys.executable, str(REPO / "pvm_dreamer.py"), *SURVIVE, "--logdir", str(tmp_path),
                           "--total-steps", "100", "--resume", str(run_dir)], capture_output=True, timeout=300).returncode
    assert code == 0 and max(ckpt_steps(run_dir)) == 100
    baselines = [r for r in read_rows(run_dir) if "eval/random_return_mean" in r]
    assert len(baselines) == 1 and baselines[0]["step"] == 0 and "eval/return_mean" in baselines[0]


def test_sigterm_during_the_step_0_evaluation_stops_at_once_and_the_resume_evaluates_once(tmp_path):
    """The step-0 checkpoint comes before the step-0 evaluation, which the progress bar shows and a stop ends
    (it once ran before the checkpoint and the signal handler: a kill there left a run that could neither be
    resumed nor started again)."""
    import signal

    run_dir = tmp_path / "r"
    proc = spawn(run_dir, "--run-name", "r", "--total-steps", "60", "--eval-episodes", "2000")  # minutes of evaluation
    log = lambda: next(tmp_path.glob("r.*.log")).read_text()  # noqa: E731
    wait_for(lambda: "evaluating the random policy: episode 3/2000" in log(), proc)
    assert ckpt_steps(run_dir) == [0]
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0 and time.time() - t < 20, log()[-2000:]
    assert "stopped by SIGTERM at step 0" in log() and ckpt_steps(run_dir) == [0]
    assert not (run_dir / "metrics.jsonl").exists() or not read_rows(run_dir)  # the cut evaluation is not logged
    proc = spawn(run_dir, "--total-steps", "60", "--eval-episodes", "2", "--resume", str(run_dir))
    assert proc.wait(timeout=300) == 0
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows if "eval/random_return_mean" in r] == [0]
    assert "eval/return_mean" in rows[0]
    assert_no_metric_logged_twice(rows)


def test_a_second_signal_ends_the_process_even_inside_a_long_torch_call(tmp_path):
    """A Python handler runs only between bytecodes; after the first signal the default action is back, so
    the second one ends the process from the kernel at once, not when the update returns."""
    import signal

    run_dir = tmp_path / "r"
    proc, log = spawn_patched(run_dir, "long-update", "--run-name", "r", "--total-steps", "1000")
    wait_for(lambda: "UPDATE" in log.read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == -signal.SIGTERM and time.time() - t < 2.0
    assert "UPDATE DONE" not in log.read_text()  # it died inside the update
    assert runtime.find_checkpoint(run_dir)[1]["step"] == ckpt_steps(run_dir)[-1] == 15  # the older one is intact


def assert_no_metric_logged_twice(rows):
    """Steps never go back, and no metric appears twice at one step (an episode that ends at the last step and
    the final evaluation may share a step, in two rows with different metrics)."""
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps), steps
    seen = set()
    for r in rows:
        for k in r:
            assert k == "step" or (r["step"], k) not in seen, f"{k} logged twice at step {r['step']}: {steps}"
            seen.add((r["step"], k))


def test_kills_and_sigterms_at_random_moments_of_a_runs_whole_life(tmp_path):
    """kill -9 or SIGTERM at random moments from process start (imports, model construction, the step-0
    checkpoint and evaluation, prefill, training, evaluations, the final save) to the end; after each, --resume
    (if a checkpoint exists) or a fresh start under the same --run-name continues. The finished run is whole:
    its last checkpoint is at the last step, its episode rows tile the timeline, no step is logged twice, the
    step-0 baselines once. Seeded; PVM_DREAMER_KILL_CASES=N runs N runs (default 3) of up to 5 interruptions."""
    import random
    import signal

    total, flags = 100, ["--total-steps", "100", "--eval-every", "40", "--eval-episodes", "3"]
    for name in ("warm-up", "ref"):  # the second one, with warm file caches, gives the life of a run
        t = time.time()
        assert spawn(tmp_path / name, "--run-name", name, *flags).wait(timeout=300) == 0
        life = time.time() - t  # process start to exit, uninterrupted
    ref_evals = [r["step"] for r in read_rows(tmp_path / "ref") if "eval/return_mean" in r]
    rng = random.Random(0)
    for case in range(int(os.environ.get("PVM_DREAMER_KILL_CASES", "3"))):
        run_dir, resumed_from, moments = tmp_path / f"c{case}", [0], []
        for _ in range(5):
            newest = max(ckpt_steps(run_dir), default=None)
            start = ["--resume", str(run_dir)] if newest is not None else ["--run-name", run_dir.name]
            if newest is not None:
                resumed_from.append(newest)
            proc = spawn(run_dir, *flags, *start)
            delay, how = rng.uniform(0.0, life), rng.choice([signal.SIGKILL, signal.SIGTERM])
            moments.append((round(delay, 2), how.name))
            try:
                proc.wait(timeout=delay)
                break  # it finished first
            except subprocess.TimeoutExpired:
                proc.send_signal(how)
            assert proc.wait(timeout=120) in (0, -how), f"case {case}: {moments}"  # SIGTERM: a clean stop
        else:
            newest = max(ckpt_steps(run_dir), default=None)
            if newest is not None:
                resumed_from.append(newest)
            proc = spawn(run_dir, *flags, *(["--resume", str(run_dir)] if newest is not None else ["--run-name", run_dir.name]))
            assert proc.wait(timeout=300) == 0, f"case {case}: {moments}"
        print(f"case {case}: life {life:.1f} s, interrupted at {moments}; resumed from steps {resumed_from}")
        assert ckpt_steps(run_dir)[-1] == total and not list(run_dir.glob("checkpoints/*.corrupt"))
        rows = read_rows(run_dir)
        assert_no_metric_logged_twice(rows)
        assert [r["step"] for r in rows if "eval/random_return_mean" in r] == [0] and "eval/return_mean" in rows[0]
        episodes = [(r["step"], r["charts/episodic_length"]) for r in rows if "charts/episodic_return" in r]
        for (prev, _), (end, length) in zip([(0, 0), *episodes], episodes):
            assert end - length == prev or (end - length in resumed_from and end - length > prev), (case, episodes)
        # pointmass episodes: 25 steps. The last one ends in the final 25 steps, unless the last resume came after
        # it: a resumed run starts a fresh episode, which a resume within 25 steps of the end cannot finish.
        assert total - 25 < episodes[-1][0] <= total or episodes[-1][0] <= max(resumed_from) > total - 25, \
            (case, episodes, resumed_from)
        evals = [r["step"] for r in rows if "eval/return_mean" in r and r["step"] > 0]
        assert evals[-1] == total and len(evals) >= len(ref_evals) - 2, (case, evals, ref_evals)


# --- the command line, fuzzed: every flag value ends in a started run or one `error:` line, never a traceback ---
def flag_values(f, tmp):
    """Values for one Args field: its own type's values and their bad neighbours, as command-line strings."""
    from hypothesis import strategies as st

    ints = st.sampled_from(["-1", "0", "1", "2", "3", "8", "2147483648", str(10**12), "-" + str(10**12), "x", "1.5"])
    floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.sampled_from(["x", "1e400"]))
    paths = st.sampled_from([str(tmp / "logs"), str(tmp / "new" / "deeper"), str(tmp / "afile"), "/proc/nope",
                             str(tmp / "nowhere"), str(tmp / "empty"), str(tmp / "logs" / "old"), "x" * 300, ""])
    choices = dict(env=["pointmass", "atari", ""], pvm=["none", "dinov2", "clip", "vgg"], mode=[*pd.MODES, "half"],
                   size=["tiny", "size1m", "huge"], actor_grad=["reinforce", "dynamics", "none"],
                   device=["cpu", "auto", "cuda", "cuda:7", "meta", "tpu", ""],
                   pvm_id=["tiny", "/nonexistent/dinov2-small", str(tmp / "empty"), "no/such-model", ""])
    if f.name in choices:
        return st.sampled_from(choices[f.name]).map(lambda v: [f"--{f.name.replace('_', '-')}", v])
    if f.type in ("bool", bool):
        name = f.name.replace("_", "-")
        return st.sampled_from([[f"--{name}"], [f"--no-{name}"], [f"--{name}", "True"]])
    values = {"int": ints, "float": floats}.get(str(f.type), paths)
    return values.map(lambda v: [f"--{f.name.replace('_', '-')}", v])


def test_fuzzed_flags_start_a_run_or_fail_in_one_line(tmp_path_factory):
    """Up to four flags at a time, drawn from their types and neighbouring bad values (negatives, zero, huge,
    wrong types, non-finite floats, paths that do not exist, are files or cannot be written), on top of a tiny
    pointmass run; argument checks and construction run as in `pvm_dreamer.py` (train_loop replaced). Each
    outcome is a started run (exit 0, its step-0 checkpoint written) or exit 2 with one `error:` line and no
    file written anywhere under the test's directory; anything else (a traceback) fails the test."""
    import contextlib
    import dataclasses
    import io
    from unittest import mock

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "afile").write_text("not a directory")
    (tmp / "empty").mkdir()
    pd.main([*SURVIVE, "--logdir", str(tmp / "logs"), "--run-name", "old", "--total-steps", "20"])  # to --resume
    base = [*SURVIVE, *PVM_TINY, "--logdir", str(tmp / "logs"), "--total-steps", "40"]
    fields = [f for f in dataclasses.fields(pd.Args)]
    draws = st.lists(st.sampled_from(fields), min_size=1, max_size=4, unique_by=lambda f: f.name).flatmap(
        lambda fs: st.tuples(*(flag_values(f, tmp) for f in fs)))
    outcomes = {}

    @settings(max_examples=int(os.environ.get("PVM_DREAMER_FUZZ_EXAMPLES", "200")), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(draws)
    def check(drawn):
        n = sum(outcomes.values())  # a fresh --run-name for each case (unless drawn)
        argv = [*base, "--run-name", f"r{n}", *(x for pair in drawn for x in pair)]
        before = tree(tmp)
        out, err, started = io.StringIO(), io.StringIO(), []
        with mock.patch.object(pd, "train_loop", lambda run, stop: started.append(run.run_dir)), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                pd.main(argv)
                code = 0
            except SystemExit as e:
                code = e.code
        lines = err.getvalue().strip().splitlines()
        if code == 0:
            assert len(started) == 1 and runtime.checkpoint_paths(started[0]), (drawn, err.getvalue())
            outcomes["started"] = outcomes.get("started", 0) + 1
        else:
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (drawn, code, err.getvalue())
            assert tree(tmp) == before, (drawn, "wrote files before failing")
            outcomes["error"] = outcomes.get("error", 0) + 1

    with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf")}):
        check()
    print("fuzzed command lines:", outcomes)
    assert outcomes.get("started", 0) >= 10 and outcomes.get("error", 0) >= 50, outcomes


# ---------------------------------------------------------------------------------------------------------
# --track: Weights & Biases, offline
# ---------------------------------------------------------------------------------------------------------
def wandb_offline_runs(run_dir) -> list[tuple[str, list[dict]]]:
    """(run id, history rows) of each offline W&B run under RUN/wandb, oldest first. The .wandb file is a
    LevelDB-style log of protobuf Records: a 7-byte header, then 32 KiB blocks of chunks (crc, length, type)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/*.wandb")):
        raw, pos, buf, run_id, rows = path.read_bytes(), 7, b"", None, []
        assert raw[:4] == b":W&B"
        while pos + 7 <= len(raw):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
                pos += 32768 - pos % 32768
                continue
            _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
            if n == kind == 0:
                pos += 32768 - pos % 32768
                continue
            buf, pos = buf + raw[pos + 7:pos + 7 + n], pos + 7 + n
            if kind in (1, 4):  # a FULL chunk or the LAST of several
                rec = pb.Record()
                rec.ParseFromString(buf)
                buf, which = b"", rec.WhichOneof("record_type")
                if which == "run":
                    run_id = rec.run.run_id
                elif which == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        out.append((run_id, rows))
    return out


def test_track_logs_the_rows_to_an_offline_wandb_run_that_a_resume_continues(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    flags = [*SURVIVE, "--logdir", str(tmp_path), "--checkpoint-every", "50", "--track", "--capture-video"]
    assert main_in_process([*flags, "--run-name", "b", "--total-steps", "50"], capsys)[0] == 0
    code, _, err = main_in_process([*flags, "--resume", str(tmp_path / "b"), "--total-steps", "100"], capsys)
    assert code == 0, err
    run_id = (tmp_path / "b" / "wandb_id.txt").read_text().strip()
    runs = wandb_offline_runs(tmp_path / "b")
    assert [r[0] for r in runs] == [run_id, run_id]  # two processes, one W&B run
    logged = {}  # step -> every scalar W&B got at that step (rows at one step are merged, as W&B does)
    for _, rows in runs:
        for row in rows:
            logged.setdefault(row["_step"], {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    expected = {}
    for row in read_rows(tmp_path / "b"):
        expected.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
    for step, scalars in expected.items():  # the JSONL's rows, all of them, with the same values
        assert {k: logged[step][k] for k in scalars} == pytest.approx(scalars), step
    assert max(expected) == 100 and any("wm/loss" in s for s in logged.values())
    videos = [step for step, s in logged.items() if s.get("eval/video/_type") == "video-file"]  # media: nested keys
    assert 100 in videos and list((tmp_path / "b" / "wandb").glob("offline-run-*/files/media/videos/eval/*.mp4"))


def test_a_run_without_track_never_imports_wandb(tmp_path):
    code = ("import sys, pvm_dreamer; pvm_dreamer.main(sys.argv[1:]); "
            "assert 'wandb' not in sys.modules, 'wandb was imported'")
    proc = subprocess.run([sys.executable, "-c", code, *SURVIVE, "--logdir", str(tmp_path), "--total-steps", "25",
                           "--eval-episodes", "0"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_track_without_wandb_or_credentials_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(runtime.UsageError, match="wandb login"):
        runtime.check_wandb()
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(runtime.UsageError, match="pip install wandb"):
        runtime.check_wandb()
    with pytest.raises(runtime.UsageError, match="pip install wandb"):
        runtime.start_wandb(tmp_path, project="p")
    assert not (tmp_path / "wandb_id.txt").exists()


def test_a_run_directory_that_cannot_be_made_leaves_no_parent_behind(tmp_path):
    """--logdir NEW --run-name TOO_LONG: one UsageError, and NEW is not left behind (mkdir -p made it before the
    name failed; found by the fuzzed flags above)."""
    for run_dir in (tmp_path / "new" / "deeper" / ("x" * 300), tmp_path / "afile" / "run"):
        if run_dir.parent.name == "afile":
            (tmp_path / "afile").write_text("a file, not a directory")
        before = sorted(p.name for p in tmp_path.rglob("*"))
        with pytest.raises(runtime.UsageError, match="cannot create the run directory"):
            runtime.make_run_dir(run_dir, "--run-name")
        assert sorted(p.name for p in tmp_path.rglob("*")) == before
