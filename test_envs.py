"""Tests of the pixel environments (envs.py) and the visual shifts (shifts.py). Offline, CPU."""
import functools
import gc
import os
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest

import envs
import shifts


# ---------------------------------------------------------------------------------------------------------
# Environments (envs.py): pixel frames, action scaling and repeat, MuJoCo/MetaDrive lifecycles
# ---------------------------------------------------------------------------------------------------------
try:
    import metadrive  # noqa: F401

    HAVE_METADRIVE = True
except ImportError:
    HAVE_METADRIVE = False
needs_metadrive = pytest.mark.skipif(not HAVE_METADRIVE, reason="metadrive-simulator not installed (Python >= 3.12?)")
MUJOCO = ["pusher", "reacher"]
RUNNABLE = MUJOCO + ["pointmass", pytest.param("metadrive-topdown", marks=needs_metadrive)]


def check_frame(obs, size):
    assert isinstance(obs, np.ndarray) and obs.dtype == np.uint8 and obs.shape == (size, size, 3)
    assert obs.flags["C_CONTIGUOUS"]
    assert obs.std() > 5, "blank frame"


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", RUNNABLE)
def test_frames_spaces_and_determinism(name, size):
    env = envs.make_env(name, image_size=size, seed=3)
    try:
        assert env.observation_space.shape == (size, size, 3) and env.observation_space.dtype == np.uint8
        space = env.action_space
        assert space.dtype == np.float32 and np.all(space.low == -1) and np.all(space.high == 1)
        first, _ = env.reset(seed=3)
        check_frame(first, size)
        assert env.observation_space.contains(first)
        again, _ = env.reset(seed=3)
        np.testing.assert_array_equal(first, again)  # same seed, same first frame
        obs = first
        for _ in range(8):  # full throttle / torque for a few steps visibly changes the picture
            obs, reward, terminated, truncated, info = env.step(np.ones(space.shape, np.float32))
            assert isinstance(reward, float) and isinstance(terminated, bool) and isinstance(truncated, bool)
            check_frame(obs, size)
        assert np.abs(obs.astype(int) - first).mean() > 0.5, "frame did not change when the agent acted"
    finally:
        env.close()


@pytest.mark.parametrize("name", MUJOCO)
def test_actions_are_clipped_and_rescaled(name):
    env = envs.make_env(name, image_size=32, seed=0)
    try:
        frames = []
        for a in (1.0, 7.0):  # out-of-range input acts like the bound itself
            env.reset(seed=0)
            frames.append(env.step(np.full(env.action_space.shape, a))[0])
        np.testing.assert_array_equal(*frames)
        env.reset(seed=0)
        env.step(np.ones(env.action_space.shape))
        # [-1, 1] maps onto the task's ctrlrange: +1 is the upper torque limit (2.0 for Pusher, 1.0 for Reacher)
        np.testing.assert_allclose(env.unwrapped.data.ctrl, env.unwrapped.model.actuator_ctrlrange[:, 1])
    finally:
        env.close()


@pytest.mark.parametrize("name, repeat, steps", [("reacher", 2, 25), ("reacher", 1, 50), ("pusher", 2, 50)])
def test_episode_length_with_action_repeat(name, repeat, steps):
    env = envs.make_env(name, image_size=16, seed=0, action_repeat=repeat)
    try:
        env.reset(seed=0)
        for t in range(1, steps + 1):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            assert not terminated and truncated == (t == steps)
    finally:
        env.close()


def test_action_repeat_sums_rewards():
    action = np.array([0.7, -0.4], np.float32)
    one = envs.make_env("reacher", image_size=16, seed=0, action_repeat=1)
    one.reset(seed=5)
    r1 = [one.step(action)[1] for _ in range(2)]
    info1 = one.step(action)[4]
    one.close()
    two = envs.make_env("reacher", image_size=16, seed=0, action_repeat=2)
    two.reset(seed=5)
    r2 = two.step(action)[1]
    info2 = two.step(action)[4]
    two.close()
    assert r2 == pytest.approx(sum(r1))
    assert "reward_dist" in info1 and "reward_dist" in info2  # the task's own info is passed through


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="pusher, reacher, metadrive, metadrive-topdown"):
        envs.make_env("cheetah")
    for size in (8, 15, 513, 64.0, "64"):
        with pytest.raises(ValueError, match=r"\[16, 512\]"):
            envs.make_env("reacher", image_size=size)
    envs.check_image_size(16)
    envs.check_image_size(512)
    with pytest.raises(ValueError, match="action_repeat"):
        envs.make_env("reacher", action_repeat=0)


def test_sequential_mujoco_envs_still_render():
    # Regression: a closed env whose GL objects were freed late (by the garbage collector, while a newer env's GL
    # context was current) made every later env render all-zero frames.
    first = envs.make_env("pusher", image_size=32, seed=0)
    check_frame(first.reset(seed=0)[0], 32)
    first.close()
    second = envs.make_env("reacher", image_size=32, seed=0)
    check_frame(second.reset(seed=0)[0], 32)
    del first
    gc.collect()
    check_frame(second.step(second.action_space.sample())[0], 32)
    second.close()
    second.close()  # closing twice is harmless
    third = envs.make_env("pusher", image_size=32, seed=0)
    check_frame(third.reset(seed=0)[0], 32)
    third.close()


def test_a_live_mujoco_env_renders_its_own_scene_whatever_other_envs_do():
    # Regression: gymnasium renders into whichever GL context is current. Closing another env left none current
    # (all-zero frames), and an env dropped unclosed freed its GL objects under the live env's context.
    live = envs.make_env("reacher", image_size=32, seed=0)
    want = live.reset(seed=5)[0]
    check_frame(want, 32)
    other = envs.make_env("pusher", image_size=64, seed=0)  # made last: its context is the current one
    other.reset(seed=0)
    np.testing.assert_array_equal(live.reset(seed=5)[0], want)
    other.close()
    np.testing.assert_array_equal(live.reset(seed=5)[0], want)
    dropped = envs.make_env("pusher", image_size=32, seed=0)
    dropped.reset(seed=0)
    del dropped  # never closed: collected now, and closed by its finaliser
    gc.collect()
    np.testing.assert_array_equal(live.reset(seed=5)[0], want)
    live.close()


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_env_passes_gymnasiums_env_checker_through_its_registered_id(name):
    from gymnasium.utils.env_checker import check_env
    from gymnasium.utils.passive_env_checker import env_render_passive_checker

    one = name in envs.ONE_PER_PROCESS  # MetaDrive: one engine per process, so check_env may not make a second env
    env = gym.make(envs.GYM_IDS[name], image_size=32, seed=3)
    assert env.spec.id == envs.GYM_IDS[name] and env.spec.nondeterministic == one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=one, skip_close_check=one)  # the latter makes, closes and recloses a copy
        if one:
            env_render_passive_checker(env)
    complaints = [str(w.message) for w in caught if "WARN" in str(w.message)
                  and "different from the unwrapped" not in str(w.message)]  # (advice to check the bare task env)
    assert not complaints, complaints
    obs, _ = env.reset(seed=7)
    np.testing.assert_array_equal(env.render(), obs)  # render() is what the agent sees
    plain = None
    if not one:  # the registered id builds exactly make_env's env
        plain = envs.make_env(name, image_size=32, seed=3)
        np.testing.assert_array_equal(plain.reset(seed=7)[0], obs)
        plain.close()
    env.close()
    env.close()  # closing twice is allowed


def test_make_vec_builds_parallel_pixel_envs():
    for mode in ("sync", "async"):
        vec = gym.make_vec(envs.GYM_IDS["pointmass"], num_envs=3, vectorization_mode=mode, image_size=32)
        obs, _ = vec.reset(seed=0)  # env i is seeded 0 + i
        assert obs.shape == (3, 32, 32, 3) and obs.dtype == np.uint8
        assert not np.array_equal(obs[0], obs[1])
        single = envs.make_env("pointmass", image_size=32)
        np.testing.assert_array_equal(obs[2], single.reset(seed=2)[0])
        obs, reward, *_ = vec.step(np.zeros((3, 2), np.float32))
        assert obs.shape == (3, 32, 32, 3) and reward.shape == (3,)
        vec.close()


def test_bad_render_mode_is_one_line():
    with pytest.raises(ValueError, match="render_mode must be 'rgb_array'"):
        envs.make_env("pointmass", image_size=32, render_mode="human")


def set_qpos(env, idx, values):
    u = env.unwrapped
    qpos = u.data.qpos.copy()
    qpos[idx] = values
    u.set_state(qpos, np.zeros_like(u.data.qvel))  # runs mj_forward: body positions follow


def test_goal_distances_on_constructed_positions():
    """reacher: fingertip-target distance and the target's distance from the arena centre (the blind bound);
    pusher: puck-goal distance (its blind bound, read at reset, is the same: a puck left in place)."""
    env = envs.make_env("reacher", 32)
    env.reset(seed=0)
    set_qpos(env, slice(None), [0.0, 0.0, 0.1, 0.05])  # arm straight along +x: fingertip at (0.21, 0)
    d = envs.goal_distances(env)
    assert d["blind"] == pytest.approx(np.hypot(0.1, 0.05), abs=1e-6)
    assert d["dist"] == pytest.approx(np.hypot(0.21 - 0.1, 0.05), abs=1e-3)
    set_qpos(env, slice(None), [np.pi / 2, 0.0, 0.0, 0.21])  # straight along +y, onto the target
    assert envs.goal_distances(env)["dist"] == pytest.approx(0.0, abs=1e-3)
    env.close()
    env = envs.make_env("pusher", 32)
    env.reset(seed=0)
    set_qpos(env, slice(-4, None), [-0.2, 0.1, 0.0, 0.0])  # puck offset (-0.2, 0.1) from the goal
    d = envs.goal_distances(env)
    assert d["dist"] == d["blind"] == pytest.approx(np.hypot(0.2, 0.1), abs=1e-6)
    env.close()
    assert envs.goal_distances(envs.make_env("pointmass", 32)) is None


def test_reacher_target_is_drawn_large_and_changes_nothing_else():
    """The target marker is ~14 pixels wide at 64x64 (moving it changes far more pixels than Reacher-v5's 9 mm
    sphere would), and the dynamics and reward are Reacher-v5's: the same actions from the same start give the
    same states and rewards as the unmodified task."""
    import mujoco

    env = envs.make_env("reacher", 64, action_repeat=1)
    env.reset(seed=0)
    model = env.unwrapped.model
    gid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, "target")
    assert model.geom_size[gid, 0] == envs.REACHER_TARGET_RADIUS and model.geom_contype[gid] == 0
    set_qpos(env, slice(None), [np.pi, 0.0, 0.12, 0.12])  # the arm points away from both target positions
    a = env.unwrapped.render().astype(int)
    set_qpos(env, slice(None), [np.pi, 0.0, 0.12, -0.12])
    b = env.unwrapped.render().astype(int)
    changed = (np.abs(a - b).sum(-1) > 60).sum()
    assert changed >= 2 * 100, changed  # two ~14-pixel discs (one appears, one disappears)
    plain = gym.make("Reacher-v5")
    obs_plain, _ = plain.reset(seed=3)
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.uniform(-1, 1, 2)
        obs_plain, r_plain, *_ = plain.step(a.astype(np.float32))
        _, r, *_ = env.step(a)
        assert r == pytest.approx(float(r_plain), abs=1e-9)
    np.testing.assert_allclose(env.unwrapped.data.qpos, plain.unwrapped.data.qpos, atol=1e-12)
    env.close()
    plain.close()


def test_scene_is_exposed_and_camera_moves():
    env = envs.make_env("pusher", image_size=32, seed=0)
    try:
        before, _ = env.reset(seed=0)
        assert env.unwrapped.model.ngeom > 0 and env.unwrapped.data.qpos.shape == (env.unwrapped.model.nq,)
        envs.set_camera(env, azimuth=90.0, distance=2.5)
        moved, _ = env.reset(seed=0)
        check_frame(moved, 32)
        assert np.abs(moved.astype(int) - before).mean() > 5
        env.unwrapped.model.geom_rgba[:, :3] = [0.0, 0.0, 1.0]  # what shifts.py does: edit the live model
        assert env.reset(seed=0)[0][..., 2].mean() > moved[..., 2].mean()
    finally:
        env.close()


def test_mujoco_path_never_imports_metadrive():
    code = "import sys, envs; envs.make_env('reacher', image_size=16).close(); print('metadrive' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_missing_metadrive_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "metadrive.engine.asset_loader", None)  # makes its import fail
    with pytest.raises(RuntimeError, match="Python < 3.12") as err:
        envs.make_env("metadrive-topdown")
    assert "\n" not in str(err.value)


@needs_metadrive
def test_metadrive_rgb_needs_assets():
    from metadrive.engine.asset_loader import AssetLoader

    if os.path.isdir(AssetLoader.asset_path) and not AssetLoader.should_update_asset():
        pytest.skip("MetaDrive assets are installed; the RGB camera env is too slow for a CPU test")
    with pytest.raises(RuntimeError, match="metadrive.pull_asset") as err:
        envs.make_env("metadrive", image_size=32)
    assert "\n" not in str(err.value) and "metadrive-topdown" in str(err.value)


@needs_metadrive
def test_metadrive_topdown_singleton_and_episodes():
    env = envs.make_env("metadrive-topdown", image_size=32, seed=0, horizon=5)
    with pytest.raises(RuntimeError, match="one env per process"):
        envs.make_env("metadrive-topdown", image_size=32)
    env.reset(seed=1)
    for t in range(1, 6):  # horizon counts agent steps, whatever the action repeat
        _, _, terminated, truncated, info = env.step([0.0, 0.2])
        assert not terminated and truncated == (t == 5)
    assert "route_completion" in info
    env.close()
    again = envs.make_env("metadrive-topdown", image_size=32, seed=0)  # a closed env frees the singleton engine
    check_frame(again.reset(seed=12345)[0], 32)  # any seed is valid (mapped onto the fixed scenario set)
    again.close()


@needs_metadrive
def test_topdown_to_rgb_colour_key():
    obs = np.zeros((30, 30, 5), np.float32)
    obs[:, 10:20, 0] = 0.5  # route
    obs[2:4, 12:14, 2] = 0.7  # a vehicle now
    obs[6:8, 12:14, 4] = 0.7  # where a vehicle was 1 s ago
    img = envs.topdown_to_rgb(obs, view_m=30.0)
    assert img.dtype == np.uint8 and img.shape == (30, 30, 3)
    assert tuple(img[0, 0]) == (0, 0, 0) and tuple(img[0, 11]) == (140, 140, 140)
    assert img[2, 12, 0] > 200 and img[2, 12, 2] < 100  # red: now
    assert img[6, 12, 2] > img[6, 12, 0]  # blue: the past
    assert tuple(img[15, 15]) == (0, 220, 90)  # ego at the centre, green


def test_pointmass_gap():
    """Steering at the goal beats random and zero actions by a wide margin: the task is worth learning."""
    env = envs.make_env("pointmass", image_size=16, seed=0)
    policies = {"random": lambda: env.action_space.sample(), "zero": lambda: np.zeros(2),
                "oracle": lambda: np.clip((env.unwrapped.goal - env.unwrapped.pos) / 0.1, -1, 1)}
    returns = {}
    for name, policy in policies.items():
        total = 0.0
        for ep in range(10):
            env.reset(seed=ep)
            done = False
            while not done:
                _, reward, terminated, truncated, _ = env.step(policy())
                total, done = total + reward, terminated or truncated
        returns[name] = total / 10
    assert returns["oracle"] > max(returns["random"], returns["zero"]) + 20, returns


# ---------------------------------------------------------------------------------------------------------
# Visual shifts (shifts.py): graded, reproducible, and blind to the task's dynamics and reward
# ---------------------------------------------------------------------------------------------------------
SIZE, SEEDS, STEPS = 32, (0, 1), 5
LADDER = shifts.SEVERITIES


def rollout(env, seeds=SEEDS) -> dict:
    """Frames, rewards, done flags and MuJoCo qpos over STEPS fixed random actions from reset(seed) per seed."""
    out = {k: [] for k in ("frames", "rewards", "dones", "qpos")}
    actions = np.random.default_rng(123).uniform(-1, 1, (STEPS,) + env.action_space.shape)
    for seed in seeds:
        frame, _ = env.reset(seed=seed)
        for a in [None, *actions]:
            if a is not None:
                frame, reward, terminated, truncated, _ = env.step(a)
                out["rewards"].append(reward)
                out["dones"].append((terminated, truncated))
            assert frame.dtype == np.uint8 and frame.shape == (SIZE, SIZE, 3)
            out["frames"].append(frame)
            if hasattr(env.unwrapped, "data"):
                out["qpos"].append(env.unwrapped.data.qpos.copy())
            elif hasattr(env.unwrapped, "pos"):  # pointmass: its whole state
                out["qpos"].append(np.concatenate([env.unwrapped.pos, env.unwrapped.goal]))
    return {k: np.array(v) for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def mujoco_rollout(name: str, shift: str, severity: str) -> dict:
    env = shifts.make_shifted_env(name, shift, severity, image_size=SIZE, seed=0)
    try:
        return rollout(env)
    finally:
        env.close()


def distance(a: dict, b: dict) -> float:
    return float(np.abs(a["frames"].astype(np.int64) - b["frames"]).mean())


def test_registry():
    assert shifts.shift_names("pusher") == shifts.shift_names("reacher") == \
        ["color", "table", "light", "camera", "distractors", "placement"]
    assert shifts.shift_names("metadrive") == shifts.shift_names("metadrive-topdown") == ["color", "weather"]
    assert shifts.shift_names("pointmass") == ["color", "texture", "camera", "distractors", "noise"]
    assert all(isinstance(desc, str) and desc for _, desc in shifts.SHIFTS.values())
    assert set(shifts.WEATHER_LADDER.values()) < set(shifts.WEATHERS) and len(shifts.WEATHERS) == 4


@pytest.mark.parametrize("args, choices", [
    (("cartpole", "color", "easy"), envs.ENV_NAMES),
    (("pusher", "fog", "easy"), shifts.shift_names("pusher")),
    (("pusher", "weather", "easy"), shifts.shift_names("pusher")),  # exists, but not for this env
    (("metadrive-topdown", "table", "hard"), shifts.shift_names("metadrive-topdown")),
    (("reacher", "color", "extreme"), LADDER),
    (("pusher", "color", "hard_low_light"), LADDER),  # paper weather names are for `weather` only
])
def test_bad_names_raise_one_line_with_choices(args, choices):
    with pytest.raises(ValueError) as e:
        shifts.make_shifted_env(*args, image_size=SIZE)
    msg = str(e.value)
    assert "\n" not in msg and all(c in msg for c in choices), msg


@pytest.mark.parametrize("name", shifts.MUJOCO)
@pytest.mark.parametrize("shift", shifts.shift_names("pusher"))
def test_mujoco_shift_ladder_and_dynamics(name, shift):
    base = mujoco_rollout(name, "none", "none")
    runs = {sev: mujoco_rollout(name, shift, sev) for sev in LADDER}
    assert np.array_equal(runs["none"]["frames"], base["frames"])  # none is the unshifted env, pixel for pixel
    dists = [distance(runs[sev], base) for sev in LADDER]
    if shift == "placement":  # a moved object's pixel change saturates; the rings' monotonicity is tested below
        assert dists[0] == 0 < min(dists[1:]), dists
        return
    assert all(a < b for a, b in zip(dists, dists[1:])), f"{name}/{shift}: not increasing {dists}"
    for sev in LADDER[1:]:  # what the camera sees changed; what happens did not
        for key in ("rewards", "dones", "qpos"):
            assert np.array_equal(runs[sev][key], base[key]), f"{name}/{shift}/{sev}: {key} differs"


@pytest.mark.parametrize("shift", shifts.shift_names("pointmass"))
def test_pointmass_shift_ladder_and_dynamics(shift):
    base = mujoco_rollout("pointmass", "none", "none")
    runs = {sev: mujoco_rollout("pointmass", shift, sev) for sev in LADDER}
    assert np.array_equal(runs["none"]["frames"], base["frames"])
    dists = [distance(runs[sev], base) for sev in LADDER]
    assert all(a < b for a, b in zip(dists, dists[1:])), f"pointmass/{shift}: not increasing {dists}"
    for sev in LADDER[1:]:
        for key in ("rewards", "dones", "qpos"):
            assert np.array_equal(runs[sev][key], base[key]), f"pointmass/{shift}/{sev}: {key} differs"


def test_pointmass_distractors_move_and_never_hide_the_task_dots():
    env = shifts.make_shifted_env("pointmass", "distractors", "hard", image_size=SIZE, seed=0)
    plain = envs.make_env("pointmass", image_size=SIZE, seed=0)
    frames = [env.reset(seed=4)[0]]
    for _ in range(5):
        frames.append(env.step(np.zeros(2))[0])  # a zero action: the task's dots stay where they are
    assert len(env.ep["use"]) == shifts.N_DISTRACTORS and not np.array_equal(frames[0], frames[-1])  # they drift
    pm = plain.unwrapped
    plain.reset(seed=4)
    task = pm.draw(pm.pos, pm.goal, dict(background=(0, 0, 0)))
    dots = task.any(-1)  # the goal's and agent's pixels: the distractors pass under them
    assert dots.sum() > 0 and np.array_equal(frames[-1][dots], task[dots])
    env.close()
    plain.close()


@pytest.mark.parametrize("name, shift", [(n, s) for n in shifts.MUJOCO
                                         for s in ("color", "light", "camera", "distractors", "placement")]
                         + [("pointmass", s) for s in ("color", "texture", "camera", "distractors")])
def test_reproducible_per_seed_and_resampled_per_episode(name, shift):
    a = shifts.make_shifted_env(name, shift, "hard", image_size=SIZE, seed=0)
    b = shifts.make_shifted_env(name, shift, "hard", image_size=SIZE, seed=5)
    try:
        fa, fb = a.reset(seed=3)[0], b.reset(seed=3)[0]
        assert np.array_equal(fa, b.reset(seed=3)[0]) and np.array_equal(fa, fb)  # the reset seed decides the look
        first = {k: np.copy(v) for k, v in a.ep.items()}
        a.reset()  # next episode: a new look drawn from the (seeded) stream
        assert any(not np.array_equal(first[k], a.ep[k]) for k in first)
    finally:
        a.close()
        b.close()


def test_table_texture_is_fixed_and_dark_wood_is_dark():
    env = shifts.make_shifted_env("pusher", "table", "hard", image_size=SIZE, seed=0)
    try:
        assert np.array_equal(env.reset(seed=0)[0], env.reset(seed=0)[0])
    finally:
        env.close()
    wood = shifts.wood_texture(np.random.default_rng(0))
    assert wood.shape == (shifts.TEX_SIZE, shifts.TEX_SIZE, 3) and wood.mean() < 0.3  # dark
    assert (wood[..., 0] > wood[..., 2]).mean() > 0.95 and wood.std() > 0.02  # brown, with visible grain


def test_distractors_are_not_in_the_model():
    plain = envs.make_env("pusher", image_size=SIZE)
    env = shifts.make_shifted_env("pusher", "distractors", "hard", image_size=SIZE)
    try:
        env.reset(seed=0)
        assert env.unwrapped.model.ngeom == plain.unwrapped.model.ngeom  # the shapes live only in the drawn scene
        assert len(env.ep["use"]) == shifts.N_DISTRACTORS
    finally:
        env.close()
        plain.close()


def test_placement_is_outside_the_training_range():
    radii = {}
    for name in shifts.MUJOCO:
        for sev in LADDER[1:]:
            env = shifts.make_shifted_env(name, "placement", sev, image_size=16, seed=0)
            try:
                for seed in range(8):
                    env.reset(seed=seed)
                    q = env.unwrapped.data.qpos
                    if name == "pusher":  # training: puck in [-0.3, 0] x [-0.2, 0.2], goal exactly at 0
                        puck, goal = q[-4:-2], q[-2:]
                        assert not (-0.3 <= puck[0] <= 0 and -0.2 <= puck[1] <= 0.2), puck
                        assert np.linalg.norm(goal) >= 0.03 and np.linalg.norm(puck - goal) > 0.17
                        r = np.linalg.norm(puck - shifts.PUSHER_BOX_CENTRE)
                    else:  # training: target radius < 0.2, joints within +-0.1 rad
                        r = np.linalg.norm(q[-2:])
                        assert 0.2 <= r <= 0.21 and np.all(np.abs(q[:2]) > 0.1)
                        r = np.abs(q[0])
                    radii.setdefault((name, sev), []).append(r)
            finally:
                env.close()
    for name in shifts.MUJOCO:  # each rung's band lies further out than the one before
        bands = [radii[name, sev] for sev in LADDER[1:]]
        assert all(max(a) <= min(b) for a, b in zip(bands, bands[1:])), bands


# --- MetaDrive (image-space shifts; the RGB camera env needs assets, so its wrapper is tested on fake frames) ----
@pytest.fixture
def topdown():  # function scope: MetaDrive allows one open env per process
    pytest.importorskip("metadrive")
    env = envs.make_env("metadrive-topdown", image_size=SIZE, seed=0)
    yield env
    env.close()


def test_metadrive_topdown_shifts(topdown):
    base, again = rollout(topdown), rollout(topdown)
    # MetaDrive itself (Bullet physics) repeats an episode only to ~1e-9 across resets, so compare with a
    # tolerance; the shift cannot reach the simulator anyway (it only edits the returned frame).
    same = functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-6)
    same(again["rewards"], base["rewards"])
    for shift in shifts.shift_names("metadrive-topdown"):
        runs = {sev: rollout(shifts.ShiftWrapper(topdown, "metadrive-topdown", shift, sev, seed=0))
                for sev in LADDER[1:]}
        dists = [0.0] + [distance(runs[sev], base) for sev in LADDER[1:]]
        assert all(a < b for a, b in zip(dists, dists[1:])), f"{shift}: not increasing {dists}"
        for run in runs.values():
            same(run["rewards"], base["rewards"])
            assert np.array_equal(run["dones"], base["dones"])
        again = rollout(shifts.ShiftWrapper(topdown, "metadrive-topdown", shift, "hard", seed=0))
        assert np.array_equal(again["frames"], runs["hard"]["frames"])  # noise too is seeded
    noisy = rollout(shifts.ShiftWrapper(topdown, "metadrive-topdown", "weather", "hard_noisy_low_light"))
    assert distance(noisy, base) > dists[-1]


def test_metadrive_rng_state_round_trip(topdown):
    """The scenario generator is part of the env's state: after an evaluation's seeded resets are undone, the
    next seed-less reset draws the scenario it would have drawn."""
    topdown.reset(seed=3)
    saved = envs.rng_state(topdown)
    expected = [topdown.reset()[0] for _ in range(2)]
    envs.set_rng_state(topdown, saved)
    for i in range(2):
        topdown.reset(seed=20_000 + i)  # what evaluate() does
    envs.set_rng_state(topdown, saved)
    for frame in expected:
        assert np.array_equal(topdown.reset()[0], frame)


class FakeCamera(gym.Env):
    """Stands in for the `metadrive` RGB env (no assets here): sky above, road below."""
    observation_space = gym.spaces.Box(0, 255, (SIZE, SIZE, 3), np.uint8)
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def _frame(self):
        img = np.zeros((SIZE, SIZE, 3), np.uint8)
        img[: SIZE // 2], img[SIZE // 2:] = (140, 180, 230), (90, 90, 85)
        return img

    def reset(self, *, seed=None, options=None):
        return self._frame(), {}

    def step(self, action):
        return self._frame(), 1.0, False, False, {}


def test_metadrive_camera_weather_ladder_and_fog_gradient():
    frames = {sev: shifts.ShiftWrapper(FakeCamera(), "metadrive", "weather", sev).reset(seed=0)[0]
              for sev in LADDER[1:] + ("hard_noisy_low_light",)}
    plain = FakeCamera()._frame().astype(int)
    dists = [np.abs(frames[sev] - plain).mean() for sev in LADDER[1:]]
    assert 0 < dists[0] < dists[1] < dists[2], dists
    # fog is thickest at the top of the forward view: the sky moves toward the fog colour more than the bonnet
    fog = shifts.weather_image(np.full((SIZE, SIZE, 3), 255, np.uint8), shifts.WEATHERS["hard_low_light"],
                               np.random.default_rng(0), vertical_fog=True)
    assert fog[0].mean() < fog[-1].mean()
    assert not np.array_equal(frames["hard_noisy_low_light"], frames["hard"])


SIGNALS_REACH = """import os, signal, sys, time
sys.path.insert(0, os.environ["REPO"])
import envs
env = envs.make_env(sys.argv[1], image_size=32, seed=0)
env.reset(seed=0)
env.step(env.action_space.sample())
caught = []
signal.signal(signal.SIGINT, lambda *a: caught.append("INT"))
for _ in range(3):  # a Ctrl-C between (and, for MetaDrive, inside Panda3D's frame of) steps reaches the handler
    os.kill(os.getpid(), signal.SIGINT)
    env.step(env.action_space.sample())
print(caught, flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # no handler: the default action, death
time.sleep(3)
print("SURVIVED SIGTERM", flush=True)
"""


@pytest.mark.parametrize("name", RUNNABLE)
def test_signals_reach_the_process_on_every_env(name):
    """A scheduler's SIGTERM ends a process that has built any env (MetaDrive's pygame/SDL once took it over and
    the process carried on), and a SIGINT handler installed after the env is built still receives Ctrl-C."""
    proc = subprocess.run([sys.executable, "-c", SIGNALS_REACH, name], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "REPO": os.path.dirname(os.path.abspath(envs.__file__))})
    assert proc.returncode == -15 and "SURVIVED" not in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "['INT', 'INT', 'INT']" in proc.stdout, proc.stdout + proc.stderr[-2000:]
