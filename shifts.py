"""Visual domain shifts: the same tasks as envs.py, seen differently, for out-of-distribution evaluation.

    env = make_shifted_env("pusher", shift="table", severity="hard", seed=0)   # the paper's dark-wood table
    env = make_shifted_env("metadrive-topdown", shift="weather", severity="hard_noisy_low_light")

A shift changes what the camera sees and nothing of the task: the same seed and actions give the same rewards,
terminations and simulator state as the unshifted env. The one deliberate exception is `placement`, whose whole
point is an initial state outside the training distribution (the paper's "OOD placement").

Severity is a ladder none < easy < medium < hard, i.e. an intensity s = 0, 1/3, 2/3, 1 that scales every change.
`none` returns the plain envs.make_env env, so it is pixel-identical by construction.

Randomness: each episode's look (colours, light tint, camera offset, distractors, placement, sensor noise) comes from
the wrapper's own generator. reset(seed=k) re-seeds it from k, so evaluation episode k looks the same for every agent
and run; reset() without a seed draws a new look. The draws never depend on the severity, only their scale does, so
at one seed the rungs are the same shift, stronger, and the distance to the unshifted frame grows with severity.

MuJoCo shifts edit the live MjModel's visual fields only (geom_rgba, lights, headlight, textures, the free camera);
distractors are extra geoms appended to the renderer's scene (mjvGeom markers), never part of the model, so physics
cannot see them. MetaDrive has no weather API, so its shifts are image-space (gain/gamma, fog, sensor noise, hue).
"""
from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET

import envs  # first: it sets the headless-rendering environment variables before mujoco / pygame load
import gymnasium as gym
import numpy as np

SEVERITIES = ("none", "easy", "medium", "hard")
INTENSITY = dict(zip(SEVERITIES, (0.0, 1 / 3, 2 / 3, 1.0)))
MUJOCO, DRIVING, POINTMASS = ("pusher", "reacher"), ("metadrive", "metadrive-topdown"), ("pointmass",)
SHIFTS = {  # name -> (envs it applies to, what it does)
    "color": (MUJOCO + DRIVING + POINTMASS, "MuJoCo: robot/object/goal recoloured toward random colours; "
              "MetaDrive: hue rotation (up to 180 deg) and a colour cast; pointmass: both dots and the background"),
    "table": (MUJOCO, "table/floor: tinted -> light wood -> dark-wood texture (the paper's hard manipulation shift)"),
    "texture": (POINTMASS, "the grey background blended toward a random two-colour blotch texture"),
    "light": (MUJOCO, "dimmer (down to 30%), tinted lights; Pusher's lamp also tilts away (up to 40 deg)"),
    "camera": (MUJOCO + POINTMASS, "free camera azimuth/elevation/distance off envs.CAMERAS by up to 30 deg / "
               "20 deg / 25%; pointmass: the view zoomed by up to 30% in or out and shifted by up to 0.25"),
    "distractors": (MUJOCO + POINTMASS, "2 / 4 / 6 visual-only coloured shapes drifting over the table or floor "
                    "(pointmass: dots like the task's, under them)"),
    "placement": (MUJOCO, "object/goal start in an outer ring outside the training range (changes the initial state)"),
    "weather": (DRIVING, "image-space: soft_high_light / soft_noisy_low_light / hard_low_light; "
                         "hard_noisy_low_light by name"),
    "noise": (POINTMASS, "Gaussian sensor noise, sigma up to 0.15 of the pixel range, new every frame"),
}
# The paper's four driving weathers as image operations on [0, 1] RGB: x -> gain * x**gamma, blended toward fog_rgb
# by `fog` (a vertical gradient on the forward camera, where the top of the image is far away), plus Gaussian noise.
# The ladder is easy / medium / hard = the first three; the fourth, the paper's worst, is asked for by name.
WEATHERS = {
    "soft_high_light": dict(gain=1.25, gamma=0.8, fog=0.03, fog_rgb=(0.95, 0.95, 0.9), noise=0.0),
    "soft_noisy_low_light": dict(gain=0.5, gamma=1.25, fog=0.12, fog_rgb=(0.3, 0.3, 0.35), noise=0.05),
    # hard: a murky night, crushed contrast under a dim blue-grey haze that lifts the blacks
    "hard_low_light": dict(gain=0.22, gamma=1.7, fog=0.45, fog_rgb=(0.14, 0.15, 0.2), noise=0.0),
    "hard_noisy_low_light": dict(gain=0.22, gamma=1.7, fog=0.45, fog_rgb=(0.14, 0.15, 0.2), noise=0.1),
}
WEATHER_LADDER = dict(zip(SEVERITIES[1:], WEATHERS))  # easy / medium / hard -> the first three names
# Bodies (or world geoms) recoloured by `color`, and the geom that is the table / floor, per MuJoCo task.
PARTS = {"pusher": dict(robot=("r_", "tips_arm"), object=("object",), goal=("goal",)),
         "reacher": dict(robot=("body", "fingertip", "root"), goal=("target",))}
TABLE_GEOM = {"pusher": "table", "reacher": "ground"}
TABLE_RGB = {"pusher": 0.5, "reacher": 0.9}  # their unshifted grey (Pusher's is MuJoCo's default geom colour)
TEX_SIZE, TEX_REPEAT = 256, {"pusher": 2, "reacher": 6}  # reacher's camera sees 0.46 m of its 2 m floor: finer
# Placement rings, as offsets in the tasks' own qpos coordinates (see reset_model in gymnasium's pusher_v5.py /
# reacher_v5.py). Training: Pusher puck x in [-0.3, 0], y in [-0.2, 0.2], goal fixed at 0; Reacher target radius
# < 0.2, arm joints within +-0.1 rad. Each ring is split into three bands, one per rung (outwards = harder).
PUSHER_BOX_CENTRE, PUSHER_PUCK_RING, PUSHER_GOAL_RING = np.array([-0.15, 0.0]), (0.26, 0.38), (0.03, 0.15)
REACHER_TARGET_RING = (0.2, 0.21)  # the arm reaches 0.21 m: any further out and the task becomes impossible
REACHER_JOINT_RINGS = ((0.1, np.pi), (0.1, 2.6))  # |offset| of joint0 (unlimited) and joint1 (range +-3)
WOOD_DARK = ((0.36, 0.21, 0.11), (0.14, 0.07, 0.03))  # (early wood, late wood): walnut, the hard rung
WOOD_LIGHT = ((0.85, 0.68, 0.45), (0.62, 0.42, 0.24))  # oak, what the lower rungs fade toward
N_DISTRACTORS = 6


def shift_names(env_name: str) -> list[str]:
    return [name for name, (applies, _) in SHIFTS.items() if env_name in applies]


def severities(shift: str) -> tuple[str, ...]:
    return SEVERITIES + tuple(WEATHERS) if shift == "weather" else SEVERITIES  # weather also takes paper names


def _check(kind: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of: {', '.join(map(str, choices))}")


def make_shifted_env(name: str, shift: str = "none", severity: str = "none", image_size: int = 64, seed: int = 0,
                     action_repeat: int = 2, **kw) -> gym.Env:
    """envs.make_env(name, ...) seen under `shift` at `severity`; shift or severity "none" is the plain env."""
    _check("env", name, envs.ENV_NAMES)
    _check(f"shift for {name}", shift, ["none"] + shift_names(name))
    _check(f"severity for shift {shift}", severity, severities(shift))
    if shift == "none" or severity == "none":
        return envs.make_env(name, image_size, seed, action_repeat, **kw)
    if shift != "table":
        return ShiftWrapper(envs.make_env(name, image_size, seed, action_repeat, **kw), name, shift, severity, seed)
    # The tasks' tables have no texture to paint: load the task's XML with a texture + material added (visual only).
    with tempfile.TemporaryDirectory() as tmp:
        xml_file = _xml_with_table_texture(name, kw.pop("xml_file", None), os.path.join(tmp, f"{name}.xml"))
        env = envs.make_env(name, image_size, seed, action_repeat, xml_file=xml_file, **kw)
    return ShiftWrapper(env, name, shift, severity, seed)


def part_geoms(model, env_name: str) -> dict[str, list[int]]:
    """Geom ids of each of PARTS[env_name] (robot, object, goal): the geoms of bodies whose name starts with one
    of the part's prefixes, or geoms named exactly so. The `color` shift recolours them; probe.py's ground truth
    is their union."""
    import mujoco

    body = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, b) or "" for b in model.geom_bodyid]
    geom = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_GEOM, g) or "" for g in range(model.ngeom)]
    return {part: [g for g in range(model.ngeom) if body[g].startswith(pre) or geom[g] in pre]
            for part, pre in PARTS[env_name].items()}


def _xml_with_table_texture(name: str, xml_file: str | None, out: str) -> str:
    assets = os.path.join(os.path.dirname(gym.envs.mujoco.__file__), "assets")
    xml_file = xml_file or {"pusher": "pusher_v5.xml", "reacher": "reacher.xml"}[name]  # the v5 defaults
    root = ET.parse(xml_file if os.path.isabs(xml_file) else os.path.join(assets, xml_file)).getroot()
    asset = root.find("asset")
    if asset is None:
        asset = ET.Element("asset")
        root.insert(list(root).index(root.find("worldbody")), asset)
    rep = TEX_REPEAT[name]  # the texture's pixels are overwritten at run time (ShiftWrapper._paint_table)
    ET.SubElement(asset, "texture", name="shift_table", type="2d", builtin="flat", rgb1="1 1 1",
                  width=str(TEX_SIZE), height=str(TEX_SIZE))
    ET.SubElement(asset, "material", name="shift_table", texture="shift_table", texrepeat=f"{rep} {rep}",
                  rgba="1 1 1 1")
    geom = root.find(f".//geom[@name='{TABLE_GEOM[name]}']")
    geom.attrib.pop("rgba", None)  # a geom's own rgba would override the material's colour
    geom.set("material", "shift_table")
    ET.ElementTree(root).write(out)
    return out


def _rng(seed) -> np.random.Generator:
    # Salted: gymnasium seeds the task's own generator with default_rng(seed), and we want independent draws.
    return np.random.default_rng([int(seed), 0x5E1F7])


def _band(s: float, u, lo: float, hi: float):
    """A point of ring [lo, hi] split into three bands: rung s = 1/3, 2/3, 1 picks a band, u in [0, 1) the spot."""
    return lo + (hi - lo) * np.clip(s - (1.0 - np.asarray(u)) / 3.0, 0.0, 1.0)


def _smooth_noise(rng, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Value noise in [0, 1]: a coarse (rows, cols) grid of random values, bicubically upsampled to size x size."""
    from PIL import Image

    grid = Image.fromarray(rng.random(cells).astype(np.float32), mode="F")
    return np.asarray(grid.resize((size, size), Image.BICUBIC), dtype=np.float64).clip(0.0, 1.0)


def wood_texture(rng, size: int = TEX_SIZE, palette=WOOD_DARK, planks: int = 6) -> np.ndarray:
    """Procedural wood: `planks` boards side by side, grain running along y. Each board shows the growth rings of
    a log sawn off-centre (rings = level sets of the distance to the log's axis, which slowly drifts along the
    board, warped by noise), fine fibres along the grain, a per-board tone, and dark seams. -> (size, size, 3)."""
    y, x = np.mgrid[0:size, 0:size] / size
    board = np.minimum((x * planks).astype(int), planks - 1)
    across = x * planks - board  # 0..1 across each board
    axis, depth, slope, freq, tone = (rng.uniform(lo, hi, planks) for lo, hi in
                                      ((0.2, 0.8), (0.05, 0.5), (-0.6, 0.6), (6.0, 11.0), (0.85, 1.15)))
    warp = _smooth_noise(rng, size, (24, 4))  # rings wobble more along the grain than across it
    dist = np.hypot(across - axis[board], depth[board] + slope[board] * y + 0.25 * (warp - 0.5))
    rings = (dist * freq[board] + 0.4 * warp) % 1.0
    late = rings ** 4  # sharp dark late-wood bands, wide pale early wood
    fibres = _smooth_noise(rng, size, (6, 96))  # streaks stretched along the grain
    shade = np.clip(0.55 * late + 0.45 * fibres, 0, 1)[..., None]
    early, dark = np.array(palette[0]), np.array(palette[1])
    img = (early + (dark - early) * shade) * tone[board][..., None]
    seam = np.minimum(across, 1.0 - across) * planks * size < 1.5  # 1-2 px gaps between boards
    img[seam] *= 0.45
    return np.clip(img, 0.0, 1.0)


class ShiftWrapper(gym.Wrapper):
    """Shows `env` (an envs.make_env env named `env_name`) under a visual shift; see the module docstring.
    For `table` the env must have been built with the texture-carrying XML: use make_shifted_env."""

    def __init__(self, env: gym.Env, env_name: str, shift: str, severity: str, seed: int = 0):
        super().__init__(env)
        _check(f"shift for {env_name}", shift, shift_names(env_name))
        _check(f"severity for shift {shift}", severity, severities(shift)[1:])
        self.env_name, self.shift, self.severity = env_name, shift, severity
        self.s = INTENSITY.get(severity, 1.0)
        self.rng, self.ep, self.t = _rng(seed), {}, 0
        if env_name in MUJOCO:
            import mujoco

            self.mj, self.task = mujoco, env.unwrapped
            m = self.model = self.task.model
            # The unshifted visuals: every episode's look is computed from these, never from the last episode's.
            self.base = dict(rgba=m.geom_rgba.copy(), diffuse=m.light_diffuse.copy(), specular=m.light_specular.copy(),
                             head_amb=m.vis.headlight.ambient.copy(), head_dif=m.vis.headlight.diffuse.copy())
            self.parts = part_geoms(m, env_name)
            if shift == "table":
                self._paint_table(seed)
            # Placement and distractor layout need the state the task's own reset just drew: hook in after it.
            task_reset_model = self.task.reset_model

            def reset_model():
                task_reset_model()
                return self._after_reset_model()
            self.task.reset_model = reset_model
        elif env_name in POINTMASS:
            self.task = env.unwrapped  # envs.PointMass: frames are redrawn from its state with the episode's look

    # --- gym API --------------------------------------------------------------------------------------------
    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.rng = _rng(seed)
        self.t, self.ep = 0, self._draw_episode()
        if self.env_name in MUJOCO:
            self._apply_scene()  # before the env's reset, which renders the episode's first frame
        obs, info = self.env.reset(seed=seed, options=options)
        return self._image(obs), info

    def step(self, action):
        self.t += 1
        if self.shift == "distractors" and self.env_name in MUJOCO:
            self._add_distractors()  # markers last one frame: re-add them before each render
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._image(obs), reward, terminated, truncated, info

    # --- per-episode draws: the same number of draws at every severity, only their scale depends on s ---------
    def _draw_episode(self) -> dict:
        r = self.rng
        if self.env_name in POINTMASS and self.shift != "camera":  # camera: the same three offsets as MuJoCo's
            return self._draw_pointmass_episode()
        if self.shift == "color":
            return dict(rgb=_vivid(r, 3), sign=r.choice([-1.0, 1.0]), cast=r.uniform(-1, 1, 3))
        if self.shift == "light":
            return dict(tint=_vivid(r, 1)[0], tilt_azimuth=r.uniform(0, 2 * np.pi))
        if self.shift == "camera":
            return dict(offsets=r.choice([-1.0, 1.0], 3) * r.uniform(0.6, 1.0, 3))  # x the rung's maximum
        if self.shift == "distractors":
            n = 3 * N_DISTRACTORS  # candidates: the first ones clear of the task's objects are used
            return dict(xy=r.random((n, 2)), kind=r.integers(0, 3, n), rgb=_vivid(r, n), size=r.random(n),
                        phase=r.uniform(0, 2 * np.pi, (n, 2)), omega=r.uniform(0.1, 0.3, n))
        if self.shift == "placement":
            return dict(u=r.random((16, 4)))
        return {}  # table: fixed per env; weather: only per-frame noise

    # --- MuJoCo: edit the live model's visual fields -----------------------------------------------------------
    def _apply_scene(self):
        m, s, ep, b = self.model, self.s, self.ep, self.base
        if self.shift == "color":
            for rgb, ids in zip(ep["rgb"], self.parts.values()):
                m.geom_rgba[ids, :3] = (1 - s) * b["rgba"][ids, :3] + s * rgb
        elif self.shift == "light":
            # Dimmer and tinted (the tint is normalised to max 1 so that it only colours; dimming is separate).
            scale = (1.0 - 0.7 * s) * (1.0 + 0.6 * s * (ep["tint"] / ep["tint"].max() - 1.0))
            m.light_diffuse[:] = b["diffuse"] * scale
            m.light_specular[:] = b["specular"] * scale
            m.vis.headlight.ambient[:] = b["head_amb"] * scale
            m.vis.headlight.diffuse[:] = b["head_dif"] * scale
            # Pusher's one lamp points straight down: tilt it (Reacher has only the headlight, which follows the camera)
            tilt, az = np.deg2rad(40.0) * s, ep["tilt_azimuth"]
            m.light_dir[:] = [np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), -np.cos(tilt)]
        elif self.shift == "camera":
            base, (da, de, dd) = envs.CAMERAS[self.env_name], ep["offsets"]
            de = abs(de) if base["elevation"] <= -85 else de  # a top-down camera can only tilt up
            envs.set_camera(self.task, azimuth=base["azimuth"] + 30.0 * s * da,
                            elevation=base["elevation"] + 20.0 * s * de,
                            distance=base["distance"] * (1.0 + 0.25 * s * dd))

    def _paint_table(self, seed: int):
        """Fill the table's texture: a blend from the original table colour through oak (medium) to walnut (hard).
        Fixed per env (like the paper's one dark-wood table): the grain comes from the env's seed."""
        m, mj = self.model, self.mj
        tex = mj.mj_name2id(m, mj.mjtObj.mjOBJ_TEXTURE, "shift_table")
        if tex < 0:
            raise ValueError("the table shift needs the textured XML: build the env with make_shifted_env")
        original = TABLE_RGB[self.env_name]
        s, grain = self.s, np.random.default_rng([seed, 0x3D00D])
        palette = np.array(WOOD_LIGHT) + (np.array(WOOD_DARK) - np.array(WOOD_LIGHT)) * max(0.0, 2 * s - 1)
        img = original + (wood_texture(grain, palette=palette) - original) * min(1.0, 1.5 * s)
        adr, n = m.tex_adr[tex], TEX_SIZE * TEX_SIZE * m.tex_nchannel[tex]
        m.tex_data[adr:adr + n] = (img * 255 + 0.5).astype(np.uint8)[..., :m.tex_nchannel[tex]].ravel()
        viewer = self.task.mujoco_renderer.viewer  # envs.make_env made it; the GPU copy must be refreshed
        viewer.make_context_current()
        mj.mjr_uploadTexture(m, viewer.con, tex)

    def _after_reset_model(self):
        if self.shift == "placement":
            self._place()
        elif self.shift == "distractors":
            self._layout_distractors()
            self._add_distractors()
        return self.task._get_obs()

    def _place(self):
        """Move the task's object/goal (and Reacher's arm) into the outer ring of the current rung."""
        data, s, u = self.task.data, self.s, self.ep["u"]
        qpos = data.qpos.copy()
        if self.env_name == "pusher":
            goal = _band(s, u[0, 0], *PUSHER_GOAL_RING) * _unit(u[0, 1])
            # Like the task's own reset, keep the puck >= 0.17 from the goal: the first of 15 candidates that is.
            pucks = [PUSHER_BOX_CENTRE + _band(s, a, *PUSHER_PUCK_RING) * _unit(b) for a, b in u[1:, :2]]
            qpos[-4:-2] = next((p for p in pucks if np.linalg.norm(p - goal) > 0.17), pucks[-1])
            qpos[-2:] = goal
        else:
            qpos[-2:] = _band(s, u[0, 0], *REACHER_TARGET_RING) * _unit(u[0, 1])
            for j, ring in enumerate(REACHER_JOINT_RINGS):
                qpos[j] = self.task.init_qpos[j] + np.sign(u[1, j] - 0.5) * _band(s, u[2, j], *ring)
        self.task.set_state(qpos, data.qvel.copy())  # set_state runs mj_forward: the frame shows the new state

    def _layout_distractors(self):
        """Positions in the visible workspace, skipping candidates within 0.12 m (Reacher: 0.06 m) of the task's
        object and goal, so no rung starts with a target hidden (they may still drift over it later)."""
        ep, d = self.ep, self.task.data
        if self.env_name == "pusher":  # world x/y of the table area the camera sees; shapes rest on the table
            lo, hi, clear, keep = np.array([0.05, -0.45]), np.array([0.8, 0.3]), 0.12, ("object", "goal")
        else:  # the floor patch in view, around the arm
            lo, hi, clear, keep = np.array([-0.21, -0.21]), np.array([0.21, 0.21]), 0.06, ("target",)
        xy = lo + (hi - lo) * ep["xy"]
        ok = np.all([np.linalg.norm(xy - d.body(b).xpos[:2], axis=1) > clear for b in keep], axis=0)
        order = np.concatenate([np.flatnonzero(ok), np.flatnonzero(~ok)])[:N_DISTRACTORS]
        ep["use"], ep["xy0"] = order[:round(N_DISTRACTORS * self.s)], xy

    def _add_distractors(self):
        mj, ep, viewer = self.mj, self.ep, self.task.mujoco_renderer.viewer
        pusher = self.env_name == "pusher"
        base = 0.055 if pusher else envs.REACHER_TARGET_RADIUS  # typical half-size: about the puck's / target's
        z0 = -0.325 if pusher else 0.0  # resting on the table / floor
        amplitude = 0.1 if pusher else 0.03  # metres of drift
        for i in ep["use"]:
            r = base * (0.6 + 0.8 * ep["size"][i])
            h = r if pusher else 0.004  # Reacher: flat, below the arm and target, so never hiding them from above
            geom_type, size = [(mj.mjtGeom.mjGEOM_ELLIPSOID, (r, r, h)), (mj.mjtGeom.mjGEOM_BOX, (r, r, h)),
                               (mj.mjtGeom.mjGEOM_CYLINDER, (r, h, 0.0))][ep["kind"][i]]
            xy = ep["xy0"][i] + amplitude * np.sin(ep["omega"][i] * self.t + ep["phase"][i])
            viewer.add_marker(type=geom_type, size=np.array(size), pos=np.append(xy, z0 + h),
                              rgba=np.append(ep["rgb"][i], 1.0))

    # --- pointmass: the task's own renderer, drawn with a different look --------------------------------------------
    def _draw_pointmass_episode(self) -> dict:
        r, size = self.rng, self.observation_space.shape[0]
        if self.shift == "color":  # background, goal, agent
            return dict(rgb=255.0 * _vivid(r, 3))
        if self.shift == "texture":  # two colours in blotches: smooth noise pushed toward 0 or 1
            blotch = np.clip((_smooth_noise(r, size, (5, 5)) - 0.5) * 6.0 + 0.5, 0.0, 1.0)[..., None]
            c0, c1 = 255.0 * _vivid(r, 2)
            return dict(texture=c0 + (c1 - c0) * blotch)
        if self.shift == "distractors":
            n = N_DISTRACTORS
            return dict(xy=r.uniform(-0.8, 0.8, (n, 2)), rgb=255.0 * _vivid(r, n), phase=r.uniform(0, 2 * np.pi, (n, 2)),
                        omega=r.uniform(0.1, 0.3, n), use=np.arange(round(n * self.s)))
        return {}  # noise: drawn per frame

    def _pointmass_frame(self) -> np.ndarray:
        pm, s, ep, look = self.task, self.s, self.ep, {}
        grey, goal, agent = (np.array(c, np.float64) for c in (pm.BACKGROUND, pm.GOAL_RGB, pm.AGENT_RGB))
        if self.shift == "color":
            look.update(background=grey + s * (ep["rgb"][0] - grey), goal_rgb=goal + s * (ep["rgb"][1] - goal),
                        agent_rgb=agent + s * (ep["rgb"][2] - agent))
        elif self.shift == "texture":
            look["background"] = grey + s * (ep["texture"] - grey)
        elif self.shift == "camera":  # zoom (in or out), x offset, y offset
            dz, dx, dy = ep["offsets"]
            look["view"] = (1.0 + 0.3 * s * dz, 0.25 * s * dx, 0.25 * s * dy)
        elif self.shift == "distractors":  # drifting along Lissajous paths, 0.3 of the half-width each way
            xy = ep["xy"] + 0.3 * np.sin(ep["omega"][:, None] * self.t + ep["phase"])
            look["extra"] = [(*xy[i], ep["rgb"][i]) for i in ep["use"]]
        frame = pm.draw(pm.pos, pm.goal, look)
        if self.shift == "noise":
            frame = to_uint8(frame / 255.0 + self.rng.normal(0.0, 0.15 * s, frame.shape))
        return frame

    # --- image space (MetaDrive) ----------------------------------------------------------------------------------
    def _image(self, frame: np.ndarray) -> np.ndarray:
        if self.env_name in POINTMASS:
            return self._pointmass_frame()
        if self.shift == "weather":
            return weather_image(frame, WEATHERS[WEATHER_LADDER.get(self.severity, self.severity)], self.rng,
                                 vertical_fog=self.env_name == "metadrive")
        if self.shift == "color" and self.env_name in DRIVING:
            return color_image(frame, self.s * np.pi * self.ep["sign"], 1.0 + 0.5 * self.s * self.ep["cast"])
        return frame


def _vivid(rng, n: int) -> np.ndarray:
    """n saturated colours of random hue and brightness (uniform RGB draws are mostly pastel greys)."""
    hue, value = rng.random((n, 1)), rng.uniform(0.5, 1.0, (n, 1))
    return value * (0.5 + 0.5 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3]))))


def _unit(u) -> np.ndarray:
    return np.array([np.cos(2 * np.pi * u), np.sin(2 * np.pi * u)])


def weather_image(frame: np.ndarray, w: dict, rng: np.random.Generator, vertical_fog: bool) -> np.ndarray:
    """A WEATHERS entry applied to a uint8 RGB frame: exposure, fog, then sensor noise (drawn from rng)."""
    x = w["gain"] * (frame / 255.0) ** w["gamma"]
    fog = np.full((frame.shape[0], 1, 1), w["fog"])
    if vertical_fog:  # forward camera: thickest at the top (horizon and sky), thinning toward the bonnet
        fog = fog * np.clip(1.6 * np.linspace(1.0, 0.0, frame.shape[0]), 0.0, 1.0)[:, None, None]
    x = x * (1.0 - fog) + fog * np.asarray(w["fog_rgb"])
    if w["noise"]:
        x = x + rng.normal(0.0, w["noise"], x.shape)
    return to_uint8(x)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] RGB (values outside are clipped) -> uint8, rounded."""
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def color_image(frame: np.ndarray, hue: float, gains) -> np.ndarray:
    """Rotate hues by `hue` radians (a rotation about the grey axis, so greys stay grey) and scale each channel."""
    k = np.ones(3) / np.sqrt(3.0)  # Rodrigues' rotation matrix about k
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + np.sin(hue) * kx + (1.0 - np.cos(hue)) * kx @ kx
    x = frame.astype(np.float64) @ (rot.T * np.asarray(gains))
    return np.clip(x + 0.5, 0.0, 255.0).astype(np.uint8)


if __name__ == "__main__":  # python shifts.py: the table of shifts (e.g. for the README)
    for shift_name, (applies, text) in SHIFTS.items():
        print(f"{shift_name:12s} {', '.join(applies):45s} {text}")
