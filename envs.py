"""Pixel environments for pvm-dreamer: every task returns uint8 HxWx3 frames and takes actions in [-1, 1].

  make_env("pusher")             MuJoCo Pusher-v5: a 7-DoF arm pushes a white puck onto a red goal (the default)
  make_env("reacher")            MuJoCo Reacher-v5: a 2-link arm touches a red target (the quick one; the target
                                 is drawn larger, see REACHER_TARGET_RADIUS)
  make_env("metadrive")          MetaDrive, forward RGB camera (the paper's driving task; needs MetaDrive's assets)
  make_env("metadrive-topdown")  MetaDrive, bird's-eye view drawn with pygame (needs no assets, fast on a CPU)
  make_env("pointmass")          a dot steered to a goal, drawn with numpy: learnable in minutes on a CPU (the
                                 sanity check that the agent learns; not a task of the paper)

One wrapper (`PixelEnv`) gives all of them the same contract: observation = the rendered frame (never the state
vector), actions rescaled from [-1, 1] to the task's bounds, `action_repeat` repeats summing rewards, gymnasium's
5-tuple API. Episode limits are the tasks' own: Pusher-v5 100 and Reacher-v5 50 simulator steps (so 50 / 25 agent
steps at the default repeat of 2); MetaDrive `horizon` agent steps (1000 unless given).

Visual shifts (shifts.py) edit the MuJoCo scene in place: `env.unwrapped.model` / `.data` are the live MjModel /
MjData (geom_rgba, light_*, tex_* ...), and the camera is MuJoCo's FREE camera, moved with
`set_camera(env, azimuth=..., elevation=..., distance=..., lookat=...)`; the defaults live in `CAMERAS`.
"""
from __future__ import annotations

import os

# Headless rendering. These must be set before mujoco / pygame are first imported, hence at the very top.
os.environ.setdefault("MUJOCO_GL", "egl")  # GPU or mesa llvmpipe (CPU); set MUJOCO_GL=glfw on a desktop/macOS
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame (MetaDrive top-down) without a display
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")  # ...and without a sound card (else ALSA spams stderr)
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
# SDL (started by pygame.init() inside MetaDrive's top-down observation) otherwise takes SIGTERM and SIGINT
# wherever they are at their default action and turns them into an SDL_QUIT event that nothing reads: the
# process would ignore a scheduler's stop. SDL reads this at SDL_Init.
os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")

import functools
import weakref

import gymnasium as gym
import numpy as np

ENV_NAMES = ("pusher", "reacher", "metadrive", "metadrive-topdown", "pointmass")
IMAGE_SIZE_RANGE = (16, 512)  # what the renderers handle; the agent's encoders restrict this further

MUJOCO_TASKS = {"pusher": "Pusher-v5", "reacher": "Reacher-v5"}
MUJOCO_TASK_OF = {"PusherEnv": "pusher", "ReacherEnv": "reacher"}  # gymnasium's env classes -> our names
# Reacher's target, drawn larger for a pixel agent (radius 0.009 m in Reacher-v5: ~1 pixel at 64x64). Visual only:
# the target geom has no contacts (contype = conaffinity = 0) and its body's mass was fixed when the model compiled,
# so dynamics and reward (the distance to the target's centre) are Reacher-v5's. 0.05 m, as DreamerV3's DMC reacher
# (easy): ~14 pixels across at 64x64, ~7 at 32x32 (the camera sees 0.46 m). At 0.025 m (~3 px at 32x32) the world
# models of the README's 4000-step Reacher runs drew the target only faintly in their reconstructions; at 0.05 m
# they drew it.
REACHER_TARGET_RADIUS = 0.05
# MuJoCo free-camera poses, tuned by eye on 64x64 frames so the task-relevant objects are large.
# azimuth/elevation in degrees, distance in metres from `lookat` (world coordinates).
CAMERAS = {
    # From beyond the table's far edge looking back at the arm, 60 degrees down: the shoulder sits top-left, the
    # puck's spawn area and the goal fill the middle, and the arm's height stays readable (a top-down view hides it).
    "pusher": dict(lookat=np.array([0.4, -0.3, -0.25]), azimuth=180.0, elevation=-60.0, distance=1.55),
    # Straight down on the arena centre; distance chosen so the arm's full reach (0.21 m) just fits the frame.
    "reacher": dict(lookat=np.array([0.0, 0.0, 0.0]), azimuth=90.0, elevation=-90.0, distance=0.56),
}
# MetaDrive defaults (any of them, and any other MetaDrive config key, can be overridden via make_env's kwargs).
# A fixed, small set of procedurally generated maps keeps runs reproducible; 0.1 is MetaDrive's own traffic density.
METADRIVE_DEFAULTS = dict(num_scenarios=10, start_seed=0, traffic_density=0.1, horizon=1000)
ONE_PER_PROCESS = ("metadrive", "metadrive-topdown")  # MetaDrive's engine is a per-process singleton
GL_BACKENDS = ("egl", "osmesa", "glfw", "cgl", "wgl")  # what MuJoCo accepts in MUJOCO_GL


def check_image_size(image_size) -> None:
    lo, hi = IMAGE_SIZE_RANGE
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or not lo <= image_size <= hi:
        raise ValueError(f"image_size must be an integer in [{lo}, {hi}], got {image_size!r}")


def make_env(name: str, image_size: int = 64, seed: int = 0, action_repeat: int = 2, render_mode: str | None = None,
             **kwargs) -> gym.Env:
    """A pixel env (see the module docstring). kwargs go to gym.make (MuJoCo) or into MetaDrive's config.
    render_mode may only be "rgb_array" (or None): render() is the observation frame."""
    if name not in ENV_NAMES:
        raise ValueError(f"unknown env {name!r}; choose one of: {', '.join(ENV_NAMES)}")
    if render_mode not in (None, "rgb_array"):
        raise ValueError(f"render_mode must be 'rgb_array' (the observation frame), got {render_mode!r}")
    check_image_size(image_size)
    if not isinstance(action_repeat, (int, np.integer)) or action_repeat < 1:
        raise ValueError(f"action_repeat must be an integer >= 1, got {action_repeat!r}")
    if name == "pointmass":
        inner = PointMass(image_size, **kwargs)
        env = PixelEnv(inner, lambda frame: frame, inner.close, image_size, action_repeat)
    elif name in MUJOCO_TASKS:
        env = PixelEnv(*_make_mujoco(name, image_size, seed, **kwargs), image_size, action_repeat)
    else:
        env = MetaDrivePixelEnv(*_make_metadrive(name, image_size, action_repeat, **kwargs), image_size, action_repeat,
                                seed=seed)
    env.action_space.seed(seed)  # the agent's random prefill samples from it: reproducible too
    return env


# The tasks as gymnasium ids, so that standard tooling builds them:
#   gym.make("pvm_dreamer/Reacher-pixels-v0", image_size=64)   == make_env("reacher", image_size=64), in the usual
#                                                                 gym.make wrappers (env checker, order enforcing)
#   gym.make_vec("pvm_dreamer/PointMass-pixels-v0", num_envs=4, vectorization_mode="async", image_size=32)
GYM_IDS = {"pusher": "pvm_dreamer/Pusher-pixels-v0", "reacher": "pvm_dreamer/Reacher-pixels-v0",
           "metadrive": "pvm_dreamer/MetaDrive-pixels-v0",
           "metadrive-topdown": "pvm_dreamer/MetaDriveTopdown-pixels-v0",
           "pointmass": "pvm_dreamer/PointMass-pixels-v0"}
for _name, _id in GYM_IDS.items():
    if _id not in gym.registry:
        # MetaDrive is seeded but not bit-exact: Bullet's solver carries state across resets, so the same seed and
        # action give rewards that differ by ~1e-12 (measured); its spec says so, and check_env then skips the
        # exact-replay checks for it.
        gym.register(_id, entry_point=f"{__name__}:make_env", kwargs=dict(name=_name),
                     nondeterministic=_name in ONE_PER_PROCESS)


def rng_state(env: gym.Env) -> dict:
    """The env's random generators, i.e. what its next seed-less reset() and action_space.sample() draw."""
    state = dict(np_random=env.np_random.bit_generator.state,
                 action_space=env.action_space.np_random.bit_generator.state)
    if isinstance(env, MetaDrivePixelEnv):
        state["scenario"] = env.scenario_rng.bit_generator.state
    return state


def set_rng_state(env: gym.Env, state: dict) -> None:
    env.np_random.bit_generator.state = state["np_random"]
    env.action_space.np_random.bit_generator.state = state["action_space"]
    if "scenario" in state:
        env.scenario_rng.bit_generator.state = state["scenario"]


class PixelEnv(gym.Wrapper):
    """Frames as observations, [-1, 1] actions, action repeat. `frame_fn(inner_obs) -> uint8 HxWx3`.
    render() returns the latest observation frame (the only view a pixel agent has)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": None}
    render_mode = "rgb_array"

    def __init__(self, env: gym.Env, frame_fn, close_fn, image_size: int, action_repeat: int):
        super().__init__(env)
        self.frame_fn, self.action_repeat, self._last = frame_fn, action_repeat, None
        fps = env.metadata.get("render_fps") or 20  # MuJoCo's 1 / (frame_skip * timestep); pointmass/MetaDrive: 20
        self.metadata = dict(self.metadata, render_fps=fps / action_repeat)  # one frame per agent step
        # close_fn runs once: on close(), or when the env is garbage-collected unclosed. A MuJoCo env left to the
        # collector would otherwise free its GL objects under whichever context is current, i.e. another env's.
        self._closer = weakref.finalize(self, close_fn)
        self._closer.atexit = False  # at interpreter exit the GL and MetaDrive runtimes may already be gone
        self.observation_space = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        inner = env.action_space
        self._low, self._high = inner.low.astype(np.float64), inner.high.astype(np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, inner.shape, np.float32)

    @property
    def spec(self):
        # gym.make of a registered pvm_dreamer id puts its spec on the task env; spec.make() then rebuilds the whole
        # pixel env (what check_env's close check and gym.make_vec do). Made by make_env directly: no spec.
        spec = self.unwrapped.spec
        return spec if spec is not None and spec.id in GYM_IDS.values() else None

    def _frame(self, obs) -> np.ndarray:
        # Renderers hand back flipped or strided views; the replay buffer and torch want a plain C array.
        self._last = np.ascontiguousarray(self.frame_fn(obs), dtype=np.uint8)
        return self._last

    def render(self):
        return None if self._last is None else self._last.copy()

    # What ParallelEnvs asks of an env in its worker process (gymnasium's VectorEnv.call / get_attr / set_attr).
    def sample_action(self) -> np.ndarray:
        return self.action_space.sample()

    def goal_distances(self) -> dict | None:
        return goal_distances(self)

    @property
    def rng(self) -> dict:
        return rng_state(self)

    @rng.setter
    def rng(self, state: dict):
        set_rng_state(self, state)

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        return self._frame(obs), info

    def step(self, action):
        a = np.clip(np.asarray(action, np.float64).reshape(self.action_space.shape), -1.0, 1.0)
        a = (self._low + (a + 1.0) * 0.5 * (self._high - self._low)).astype(np.float32)  # [-1, 1] -> task bounds
        total = 0.0
        for _ in range(self.action_repeat):
            obs, reward, terminated, truncated, info = self.env.step(a)
            total += float(reward)
            if terminated or truncated:  # never step past the end of an episode
                break
        return self._frame(obs), total, bool(terminated), bool(truncated), info

    def close(self):
        self._closer()  # a no-op after the first call


# ---------------------------------------------------------------------------------------------------------
# PointMass: a seconds-to-learn pixel task, for checking on a CPU that the agent learns at all
# ---------------------------------------------------------------------------------------------------------
class PointMass(gym.Env):
    """A blue dot steered by velocity commands toward a red goal drawn at a random place each episode;
    reward = -distance to the goal every step, 50 steps. Random actions and standing still both stay far from
    the goal, while steering straight at it closes the distance in a few steps (test_pointmass_gap checks the
    gap): a task the agent can only solve by seeing where both dots are."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, image_size: int, episode_steps: int = 50, speed: float = 0.1, radius: float = 0.3):
        # radius in [-1, 1] units: 0.3 (5 px at 32x32) is large enough that a world model reconstructs the dots
        # after ~500 updates; at 0.2 it first learns the grey background alone for ~1000 updates.
        self.size, self.episode_steps, self.speed, self.radius = image_size, episode_steps, speed, radius
        self.observation_space = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        grid = (np.arange(image_size) + 0.5) / image_size * 2 - 1  # pixel centres in [-1, 1]
        self._yy, self._xx = np.meshgrid(grid, grid, indexing="ij")

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.goal = self.np_random.uniform(-0.8, 0.8, (2, 2))
        self.t = 0
        return self._render(), {}

    def step(self, action):
        self.pos = np.clip(self.pos + self.speed * np.clip(action, -1, 1), -1, 1)
        self.t += 1
        dist = float(np.linalg.norm(self.pos - self.goal))
        return self._render(), -dist, False, self.t >= self.episode_steps, {"distance": dist}

    def _render(self) -> np.ndarray:
        return self.draw(self.pos, self.goal)

    BACKGROUND, GOAL_RGB, AGENT_RGB = (200, 200, 200), (220, 30, 30), (30, 60, 220)

    def draw(self, pos, goal, look: dict | None = None) -> np.ndarray:
        """The frame of the state (pos, goal), seen as in training (look None) or with a `look` (shifts.py's
        pointmass shifts), a dict with any of: background (an RGB triple or an HxWx3 image, 0..255), goal_rgb,
        agent_rgb, extra (a list of (x, y, rgb) dots drawn under the task's two) and view = (zoom, ox, oy): the
        pixel at p in [-1, 1]^2 shows the arena point p / zoom + (ox, oy). Rendering only: the state is read."""
        look = look or {}
        frame = np.empty((self.size, self.size, 3), np.uint8)
        frame[:] = np.clip(np.asarray(look.get("background", self.BACKGROUND)) + 0.5, 0, 255).astype(np.uint8)
        zoom, ox, oy = look.get("view", (1.0, 0.0, 0.0))
        xx, yy = self._xx / zoom + ox, self._yy / zoom + oy
        radius = max(self.radius, 2.5 / self.size)  # at least 2.5 px at any size
        dots = [*look.get("extra", ()), (*goal, look.get("goal_rgb", self.GOAL_RGB)),
                (*pos, look.get("agent_rgb", self.AGENT_RGB))]
        for x, y, colour in dots:
            frame[(xx - x) ** 2 + (yy - y) ** 2 < radius**2] = np.clip(np.asarray(colour) + 0.5, 0, 255)
        return frame


# ---------------------------------------------------------------------------------------------------------
# MuJoCo: gymnasium's own tasks, observed through their offscreen renderer
# ---------------------------------------------------------------------------------------------------------
def _make_mujoco(name: str, image_size: int, seed: int, **kwargs):
    import mujoco

    cam = dict(CAMERAS[name], **kwargs.pop("default_camera_config", {}))
    inner = gym.make(MUJOCO_TASKS[name], render_mode="rgb_array", width=image_size, height=image_size,
                     default_camera_config=cam, **kwargs)  # gym.make adds the task's TimeLimit (100 / 50 steps)
    # Speed on a CPU (mesa llvmpipe), Pusher at 64^2: 110 ms a frame as shipped, 15 ms without its 4096^2 shadow
    # map, 6 ms with spheres/capsules tessellated 12x12 instead of 28x28 (no visible change at this size). The
    # shadow map and tessellation are fixed when the GL context is made, so set them first; shadows and reflections
    # then go off in the scene flags. 4x MSAA stays (another 2.5x): without it Reacher's 9 mm target is one pixel.
    quality = inner.unwrapped.model.vis.quality
    quality.shadowsize, quality.numslices, quality.numstacks = 0, 12, 12
    if name == "reacher":
        model, gid = inner.unwrapped.model, mujoco.mj_name2id(inner.unwrapped.model, mujoco.mjtObj.mjOBJ_GEOM, "target")
        model.geom_size[gid, 0] = model.geom_rbound[gid] = REACHER_TARGET_RADIUS  # see REACHER_TARGET_RADIUS
    inner.reset(seed=seed)
    inner.render()  # creates the offscreen viewer now (it is otherwise made lazily) so its scene flags can be set
    viewer = inner.unwrapped.mujoco_renderer.viewer
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0

    def frame(_state_vector):
        # gymnasium renders into whichever GL context is current, which is the one made last in this process: an
        # env that renders after another env was made (or closed: then none is current) draws into a stranger's
        # framebuffer or gets all-zero frames. So every frame first makes this env's own context current.
        viewer.make_context_current()
        return inner.render()

    return inner, frame, lambda: _close_mujoco(inner)


def _close_mujoco(inner: gym.Env) -> None:
    # gymnasium frees the EGL context but leaves the MjrContext (MuJoCo's GL objects) to the garbage collector. If
    # it is collected later, while a *newer* env's context is current, mjr_freeContext deletes that env's buffers by
    # id and it renders all-zero frames. So: free it now, under its own context, then drop every reference.
    renderer = inner.unwrapped.mujoco_renderer
    viewer = renderer.viewer
    if viewer is not None:
        viewer.make_context_current()
        viewer.con.free()
    inner.close()
    renderer._viewers.clear()
    renderer.viewer = None


def goal_distances(env: gym.Env) -> dict | None:
    """Where the task's object is relative to its goal, in metres, for the check that separates seeing from
    guessing (evaluate_episodes reads it at reset and at the episode's end); None for tasks without one.
      reacher: dist = fingertip-target distance; blind = the target's distance from the arena centre, the best a
               target-blind policy does on average (park the fingertip at the centre: 0.01 m from it is reachable).
      pusher:  dist = puck-goal distance; blind = the same, read at reset: a policy that never finds the puck
               leaves it there. (The goal is fixed, so a blind policy knows it; only the puck must be seen.)"""
    name = MUJOCO_TASK_OF.get(type(env.unwrapped).__name__)
    if name is None:
        return None
    body = env.unwrapped.data.body
    if name == "reacher":
        target = body("target").xpos[:2]
        return dict(dist=float(np.linalg.norm(body("fingertip").xpos[:2] - target)), blind=float(np.linalg.norm(target)))
    d = float(np.linalg.norm(body("object").xpos[:2] - body("goal").xpos[:2]))
    return dict(dist=d, blind=d)


def set_camera(env: gym.Env, **cam) -> None:
    """Move a MuJoCo env's free camera, e.g. set_camera(env, azimuth=150, distance=1.2, lookat=(0.3, -0.2, -0.3)).
    Keys are mjvCamera fields (azimuth, elevation, distance, lookat); takes effect on the next frame."""
    renderer = env.unwrapped.mujoco_renderer
    renderer.default_cam_config = {**(renderer.default_cam_config or {}), **cam}  # survives a viewer rebuild
    if renderer.viewer is not None:
        for key, value in cam.items():
            if np.ndim(value):
                getattr(renderer.viewer.cam, key)[:] = value
            else:
                setattr(renderer.viewer.cam, key, value)


# ---------------------------------------------------------------------------------------------------------
# MetaDrive (imported lazily: the MuJoCo path never touches it, and it is absent on Python >= 3.12)
# ---------------------------------------------------------------------------------------------------------
class ParallelEnvs:
    """N pixel envs stepped together, so that the agent acts on all N frames with one encoder call.
    N = 1: the env itself, in this process (a run with one env is what it always was). N > 1: gymnasium's
    AsyncVectorEnv, one process per env (so MetaDrive's one engine per process holds), started with "spawn" (a
    forked child would inherit this process's GL state and torch's threads), env i seeded with seed + i, and with
    autoreset off: the caller resets an ended env when it chooses (the collector: lazily, at the next step, as with
    one env), so an episode's last frame is the observation of the step that ended it and nothing is skipped."""

    def __init__(self, env: gym.Env | None = None, *, name: str = "", num: int = 1, image_size: int = 64,
                 seed: int = 0, action_repeat: int = 2, factories=None):
        """env: wrap this one env. Otherwise `num` envs of task `name`, env i from make_env(seed=seed + i), or
        one env per entry of `factories` (picklable callables returning an env, e.g. functools.partials of a
        module-level function: with spawn, each worker imports it)."""
        self.one, self.vec = env, None
        if env is None and factories is None:
            factories = [functools.partial(make_env, name, image_size, seed + i, action_repeat) for i in range(num)]
        if env is None and len(factories) == 1:
            self.one = factories[0]()
        elif env is None:
            from gymnasium.vector import AsyncVectorEnv, AutoresetMode

            self.vec = AsyncVectorEnv(factories, context="spawn", autoreset_mode=AutoresetMode.DISABLED)
        if self.one is not None:
            self.num, self.observation_space, self.action_space = 1, self.one.observation_space, self.one.action_space
        else:
            self.num, self.observation_space = len(factories), self.vec.single_observation_space
            self.action_space = self.vec.single_action_space

    def reset(self, index, seeds) -> np.ndarray:
        """Reset the envs in `index` (seeds: one int or None each) -> their first frames, (len(index), H, W, 3)."""
        if self.one is not None:
            return self.one.reset(seed=seeds[0])[0][None]
        mask = np.zeros(self.num, bool)
        mask[index] = True
        seed = [None] * self.num
        for i, s in zip(index, seeds):
            seed[i] = s
        obs, _ = self.vec.reset(seed=seed, options={"reset_mask": mask})
        return obs[index]

    def step(self, actions: np.ndarray):
        """actions (N, A) -> frames (N, H, W, 3), rewards, terminated, truncated (N,) each."""
        if self.one is not None:
            obs, reward, terminated, truncated, _ = self.one.step(actions[0])
            return obs[None], np.array([reward]), np.array([terminated]), np.array([truncated])
        obs, reward, terminated, truncated, _ = self.vec.step(actions)
        return obs, reward, terminated, truncated

    def sample_actions(self) -> np.ndarray:  # (N, A): uniform, from each env's own seeded action space
        if self.one is not None:
            return self.one.action_space.sample()[None]
        return np.stack(self.vec.call("sample_action"))

    def goal_distances(self, index) -> list[dict | None]:  # module-level goal_distances of the envs in `index`
        if self.one is not None:
            return [goal_distances(self.one)]
        every = self.vec.call("goal_distances")
        return [every[i] for i in index]

    def rng_states(self) -> list[dict]:
        return [rng_state(self.one)] if self.one is not None else list(self.vec.get_attr("rng"))

    def set_rng_states(self, states: list[dict]):
        assert len(states) == self.num, f"{len(states)} env generator states for {self.num} envs"
        if self.one is not None:
            set_rng_state(self.one, states[0])
        else:
            self.vec.set_attr("rng", list(states))

    def close(self):
        (self.one if self.one is not None else self.vec).close()


_live_metadrive = None  # weakref to the open MetaDrive env: MetaDrive's engine is a per-process singleton


class MetaDrivePixelEnv(PixelEnv):
    """MetaDrive's reset(seed) takes a scenario index (map + traffic) in [start_seed, start_seed + num_scenarios)
    and draws an unseeded random one when given none. We map a gym seed to scenario `seed % num_scenarios` (so
    consecutive evaluation seeds visit distinct scenarios) and draw seed-less resets from our own seeded generator,
    so every seed is valid and whole runs are reproducible."""

    def __init__(self, *args, seed: int):
        super().__init__(*args)
        self.scenario_rng = np.random.default_rng(seed)
        global _live_metadrive
        _live_metadrive = weakref.ref(self)

    def reset(self, *, seed=None, options=None):
        cfg = self.env.unwrapped.config
        if seed is not None:
            self.scenario_rng = np.random.default_rng(seed)
            index = seed % cfg["num_scenarios"]
            # gymnasium's contract (check_env tests it): a seeded reset seeds the env's own generator too. MetaDrive
            # never draws from it; it keeps rng_state / set_rng_state meaningful.
            self.env.unwrapped._np_random, _ = gym.utils.seeding.np_random(seed)
        else:
            index = int(self.scenario_rng.integers(cfg["num_scenarios"]))
        obs, info = self.env.reset(seed=cfg["start_seed"] + index)
        return self._frame(obs), info


def _make_metadrive(name: str, image_size: int, action_repeat: int, **kwargs):
    import logging

    try:
        from metadrive.engine.asset_loader import AssetLoader
        from metadrive.engine.base_engine import BaseEngine
        from metadrive.engine.engine_utils import close_engine, engine_initialized
    except ImportError as e:
        raise RuntimeError(f"MetaDrive is unavailable ({str(e).splitlines()[0]}): it needs Python < 3.12 and "
                           "`pip install metadrive-simulator==0.4.3`") from None
    import direct.task.Task as panda_task

    # Panda3D's TaskManager.step() (every MetaDrive step) swaps in a SIGINT handler of its own for each frame, so a
    # Ctrl-C landing then is a KeyboardInterrupt out of env.step() instead of reaching the run's stop handler.
    # Task.py guards each swap with `if signal:`, so this turns it off.
    panda_task.signal = None
    other = _live_metadrive and _live_metadrive()
    if other is not None and other._closer.alive:
        raise RuntimeError("MetaDrive allows one env per process (its engine is a singleton): close() the open "
                           "MetaDrive env before making another")
    if engine_initialized():
        close_engine()  # left behind by a MetaDrive env that was dropped without close()
    assets_ok = os.path.isdir(AssetLoader.asset_path) and not AssetLoader.should_update_asset()
    if name == "metadrive" and not assets_ok:
        raise RuntimeError("MetaDrive's assets (3D models, textures) are missing or outdated: run "
                           "`python -m metadrive.pull_asset` on a machine with internet, or use metadrive-topdown, "
                           "which needs none")
    if not assets_ok:
        # The top-down view draws with pygame and never loads an asset, but the engine still tries to download
        # them on start-up (and fails with a stack trace offline): skip that. Only patched when assets are absent.
        BaseEngine.try_pull_asset = staticmethod(lambda: None)

    cfg = dict(METADRIVE_DEFAULTS, log_level=logging.ERROR, use_render=False, **kwargs)
    if cfg["horizon"]:
        cfg["horizon"] *= action_repeat  # MetaDrive counts its own steps; ours counts agent steps
    if name == "metadrive":
        from metadrive.component.sensors.rgb_camera import RGBCamera
        from metadrive.envs.metadrive_env import MetaDriveEnv

        # stack_size=1: the agent stacks nothing, the world model carries the history.
        cfg = {**dict(image_observation=True, norm_pixel=False, stack_size=1, show_interface=False, show_logo=False,
                      sensors=dict(rgb_camera=(RGBCamera, image_size, image_size)),
                      vehicle_config=dict(image_source="rgb_camera")), **cfg}
        inner = MetaDriveEnv(cfg)
        # Panda3D hands back BGR on the CPU path (metadrive issue #651): flip to RGB. Frames may arrive as float.
        frame_fn = lambda obs: np.clip(obs["image"][..., ::-1, -1], 0, 255).astype(np.uint8)  # noqa: E731
    else:
        from metadrive.envs.top_down_env import TopDownMetaDrive

        cfg = {**dict(resolution_size=image_size, norm_pixel=True), **cfg}
        inner = TopDownMetaDrive(cfg)
        frame_fn = lambda obs: topdown_to_rgb(obs, inner.config["distance"])  # noqa: E731

    def close_fn():
        global _live_metadrive
        inner.close()  # destroys the engine singleton, so a new MetaDrive env can be made afterwards
        _live_metadrive = None

    return inner, frame_fn, close_fn


# metadrive-topdown frames. MetaDrive's own top-down RGB renderer (env.render(mode="top_down")) is as fast (both
# ~10-15 ms per step on a CPU, dominated by physics and pygame rotations), but it does not show the navigation
# route, which the reward follows. So we colour the ego-centric, heading-up multi-channel tensor of
# TopDownMetaDrive instead (channels: road, ego's past positions, traffic now, 0.5 s ago, 1 s ago):
#   black: off-road | mid grey: the route to drive | dim grey: lane lines of other roads
#   red: vehicles now, fading through magenta to dark blue: where they were 0.5 s / 1 s ago (so motion is visible)
#   yellow dots: the ego's own past positions | green box (centre, pointing up): the ego car itself
_TD_TRAFFIC_NOW, _TD_TRAFFIC_OLD = np.array([255.0, 50, 50]), np.array([40.0, 40, 170])
_TD_PAST_POS, _TD_EGO = np.array([255.0, 210, 0]), np.array([0.0, 220, 90])
_TD_EGO_M = (4.5, 1.8)  # ego length and width in metres (MetaDrive's default car)


def topdown_to_rgb(obs: np.ndarray, view_m: float = 30.0) -> np.ndarray:
    """(H, W, C) floats in [0, 1] from TopDownMultiChannel -> (H, W, 3) uint8 RGB, colour key above.
    view_m: metres across the view (TopDownMetaDrive's `distance`), to draw the ego car to scale."""
    h, w, c = obs.shape
    img = np.repeat(np.clip(obs[..., :1] * 2.0, 0.0, 1.0), 3, axis=2) * 140.0  # road channel peaks at 0.5
    n = c - 2  # traffic channels 2..c-1, newest first
    layers = [(2 + i, _TD_TRAFFIC_NOW + (_TD_TRAFFIC_OLD - _TD_TRAFFIC_NOW) * i / max(n - 1, 1)) for i in range(n)]
    for ch, colour in layers[::-1] + [(1, _TD_PAST_POS)]:  # oldest first, so the present is painted on top
        alpha = np.clip(obs[..., ch:ch + 1] / 0.4, 0.0, 1.0)  # vehicles are drawn at grey ~0.45-0.7; soft edges
        img = img * (1.0 - alpha) + colour * alpha
    ego_len, ego_wid = (max(1, round(m * h / view_m)) for m in _TD_EGO_M)
    img[(h - ego_len) // 2:(h + ego_len) // 2, (w - ego_wid) // 2:(w + ego_wid) // 2] = _TD_EGO
    return img.astype(np.uint8)
