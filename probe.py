"""Where does a PVM look? The paper's segmentation probe: the Jaccard index between what the last layer's CLS token
attends to and the simulator's ground-truth mask of the task-relevant objects (robot, object, goal).

  python probe.py --pvm dinov2 --env pusher                              # pre-trained DINOv2-S (cached weights)
  python probe.py --pvm clip --env pusher --shift table --severity hard  # ... and under the dark-wood table
  python probe.py --checkpoint runs/pusher__dinov2-full__1__1712345678   # the agent's fine-tuned backbone
  python probe.py --pvm dinov2 --pvm-id tiny --pvm-random-init --image-size 64 --pvm-image-size 64  # offline

Per frame: CLS -> patch attention of the last block (heads averaged), kept as the smallest set of patches that
holds --mass of the attention (see top_mass_mask), upsampled to the PVM's input; ground truth from MuJoCo's
segmentation render, put through the same resize + crop as the frame (PVMEncoder.preprocess), so both masks live
in what the PVM sees. Frames come from uniform-random actions, every STRIDE-th step of seeded episodes.
MetaDrive has no segmentation render here, so it is unsupported; pointmass's mask is its two dots.

Does the agent's world model draw what it must see? (any encoder, CNN included; reacher and pusher)

  python probe.py --checkpoint runs/reacher__cnn__1__1712345678 --reconstruction   # Reacher's target; Pusher's puck

The world model filters held-out random-action episodes and decodes each frame from its posterior state; the score
is how much of the part's pixel error a frame with the part hidden would have that the reconstruction removes
(see part_drawn): 1 = drawn exactly, 0 = no better than leaving it out. Beside it, the same score for another
episode's reconstruction (a part elsewhere): what a model that draws the scene but not where the part is gets.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import envs  # first: sets the headless-rendering variables before mujoco loads
import pvm_dreamer as pd
import runtime
import shifts
from runtime import UsageError

STRIDE = 5  # agent steps between probed frames: consecutive frames are near-duplicates
POINTMASS_BACKGROUND = 200  # envs.PointMass paints everything else this grey


# ---------------------------------------------------------------------------------------------------------
# Masks and the metric
# ---------------------------------------------------------------------------------------------------------
def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A n B| / |A u B| of two boolean masks (1.0 when both are empty: identical sets)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    assert a.shape == b.shape, (a.shape, b.shape)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def top_mass_mask(attn: np.ndarray, mass: float) -> np.ndarray:
    """(..., g, g) attention -> boolean mask of the smallest set of patches holding `mass` of each map's total.
    We follow DINO (Caron et al. 2021, Fig. 3), which keeps 60% of the mass: unlike a fixed top-k or a fixed
    threshold it adapts to how peaked the map is, and it is invariant to the map's scale (softmax temperature)."""
    flat = attn.reshape(-1, attn.shape[-2] * attn.shape[-1]).astype(np.float64)
    order = np.argsort(-flat, axis=1, kind="stable")
    csum = np.cumsum(np.take_along_axis(flat, order, 1), axis=1)
    keep_n = (csum < mass * csum[:, -1:] * (1 - 1e-9)).sum(1) + 1  # patches before the one that crosses, and it
    keep = np.zeros_like(flat, dtype=bool)
    for i, (o, k) in enumerate(zip(order, keep_n)):
        keep[i, o[:k]] = True
    return keep.reshape(attn.shape)


def ground_truth(env, env_name: str, frame: np.ndarray, geoms: np.ndarray | None) -> np.ndarray:
    """Boolean (h, w) mask of the task-relevant objects in the frame just rendered."""
    if env_name == "pointmass":
        return np.any(frame != POINTMASS_BACKGROUND, axis=-1)
    return mujoco_segmentation(env, geoms)


def task_geoms(model, env_name: str) -> np.ndarray:
    """Geom ids of every task-relevant part (robot, object, goal), as the `color` shift finds them."""
    return np.array(sorted({g for ids in shifts.part_geoms(model, env_name).values() for g in ids}))


def mujoco_segmentation(env, geoms: np.ndarray) -> np.ndarray:
    """Re-render the current state with MuJoCo's segmentation flags (each geom drawn in a flat colour that encodes
    its scene index) through the env's own viewer and camera, and keep the pixels of `geoms`."""
    import mujoco

    viewer = env.unwrapped.mujoco_renderer.viewer
    viewer.make_context_current()
    flags, on = viewer.scn.flags, (mujoco.mjtRndFlag.mjRND_SEGMENT, mujoco.mjtRndFlag.mjRND_IDCOLOR)
    for f in on:
        flags[f] = 1
    try:
        img = viewer.render("rgb_array").astype(np.int64)  # flipped upright like the frames
    finally:
        for f in on:
            flags[f] = 0
    seg = img[..., 0] + 256 * img[..., 1] + 65536 * img[..., 2]  # 0 = background, else scene segid + 1
    lut = np.zeros(viewer.scn.ngeom + 2, bool)
    for i in range(viewer.scn.ngeom):
        g = viewer.scn.geoms[i]
        if g.segid >= 0 and g.objtype == mujoco.mjtObj.mjOBJ_GEOM and g.objid in geoms:
            lut[g.segid + 1] = True
    return lut[np.clip(seg, 0, len(lut) - 1)]


def collect(env_name: str, shift: str, severity: str, n: int, image_size: int, seed: int):
    """n (frame, ground-truth mask) pairs under uniform-random actions, every STRIDE-th agent step."""
    if env_name.startswith("metadrive"):
        raise UsageError(f"the probe needs a ground-truth object mask and {env_name} has no segmentation render: "
                            "unsupported; use pusher, reacher or pointmass")
    try:
        env = shifts.make_shifted_env(env_name, shift, severity, image_size=image_size, seed=seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    geoms = task_geoms(env.unwrapped.model, env_name) if env_name in shifts.PARTS else None
    frames, masks, ep = [], [], 0
    try:
        while len(frames) < n:
            obs, _ = env.reset(seed=seed + ep)
            done, t = False, 0
            while not done and len(frames) < n:
                if t % STRIDE == 0:
                    frames.append(obs)
                    masks.append(ground_truth(env, env_name, obs, geoms))
                obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
                done, t = terminated or truncated, t + 1
            ep += 1
    finally:
        env.close()
    return np.stack(frames), np.stack(masks)


# ---------------------------------------------------------------------------------------------------------
# Attention of the PVM
# ---------------------------------------------------------------------------------------------------------
def to_pvm_view(enc: pd.PVMEncoder, masks: np.ndarray) -> np.ndarray:
    """Boolean (N, h, w) masks -> (N, R, R) through the frames' own resize + crop (then undo mean/std, > 0.5)."""
    img = torch.as_tensor(np.repeat(masks[..., None].astype(np.uint8) * 255, 3, -1), device=enc.mean.device)
    x = enc.preprocess(img) * enc.std + enc.mean  # (N, 3, R, R) in [0, 1]
    return (x[:, 0] > 0.5).cpu().numpy()


def probe(enc: pd.PVMEncoder, frames: np.ndarray, gt: np.ndarray, mass: float) -> dict:
    """Jaccard per frame (heads averaged) and per head (mean over frames), plus the maps for plotting."""
    att = enc.cls_attention(torch.as_tensor(frames, device=enc.mean.device)).float().cpu()  # (N, heads, g, g)
    up = enc.image_size // att.shape[-1]
    gt_view = to_pvm_view(enc, gt)  # (N, R, R)
    to_px = lambda m: np.kron(m, np.ones((up, up), bool))  # noqa: E731  patch mask -> pixel mask, (..., R, R)
    mean_mask = to_px(top_mass_mask(att.mean(1).numpy(), mass))  # (N, R, R)
    head_masks = to_px(top_mass_mask(att.numpy(), mass))  # (N, heads, R, R)
    per_frame = [jaccard(m, g) for m, g in zip(mean_mask, gt_view)]
    # Chance level: the expected Jaccard of a mask of the same size placed uniformly at random, a*g / (a + g - a*g)
    # for area fractions a, g. A near-uniform attention map keeps ~60% of the view and scores well above 0 by size.
    a_g = [(m.mean(), g.mean()) for m, g in zip(mean_mask, gt_view)]
    chance = float(np.mean([a * g / (a + g - a * g) for a, g in a_g]))
    per_head = [float(np.mean([jaccard(head_masks[i, h], gt_view[i]) for i in range(len(frames))]))
                for h in range(att.shape[1])]
    heat = F.interpolate(att.mean(1, keepdim=True), size=enc.image_size, mode="bilinear", align_corners=False)[:, 0]
    view = (enc.preprocess(torch.as_tensor(frames, device=enc.mean.device)) * enc.std + enc.mean).clamp(0, 1)
    return dict(mean=float(np.mean(per_frame)), std=float(np.std(per_frame)), per_frame=per_frame,
                per_head=per_head, chance=chance, gt_fraction=float(gt_view.mean()), attn_fraction=float(mean_mask.mean()),
                _maps=(view.permute(0, 2, 3, 1).cpu().numpy(), heat.numpy(), mean_mask, gt_view))


def build_encoder(a) -> tuple[pd.PVMEncoder, str, bool]:
    """The backbone to probe (inside a PVMEncoder, for its preprocessing): from a checkpoint (the agent's own,
    fine-tuned or not) or fresh (pre-trained, or random with --pvm-random-init). -> (encoder, pvm, random_init)."""
    if a.checkpoint:
        import evaluate

        agent, args, _, _ = evaluate.load_agent(Path(a.checkpoint), a.device)
        if args.pvm == "none":
            raise UsageError(f"{a.checkpoint} was trained with the CNN encoder: the probe needs a PVM (a ViT)")
        if a.pvm and a.pvm != args.pvm:
            raise UsageError(f"--pvm {a.pvm} but the checkpoint's PVM is {args.pvm}: drop --pvm")
        if a.env != args.env or a.image_size != args.image_size:
            print(f"using the checkpoint's --env {args.env} --image-size {args.image_size}")
        a.env, a.image_size = args.env, args.image_size
        return agent.wm.encoder, args.pvm, args.pvm_random_init
    if not a.pvm:
        raise UsageError(f"pass --pvm {'|'.join(pd.FAMILIES)}, or --checkpoint RUN_DIR")
    backbone = pd.load_pvm(a.pvm, pd.pvm_source(a.pvm, a.pvm_id), a.pvm_random_init)
    enc = pd.PVMEncoder(backbone, a.pvm, "frozen", 1, a.pvm_image_size, out_dim=8, token_dim=1,
                        preprocessing=pd.pvm_preprocessing(a.pvm, a.pvm_id, a.pvm_random_init))
    return enc.to(runtime.resolve_device(a.device)), a.pvm, a.pvm_random_init


# ---------------------------------------------------------------------------------------------------------
# What the world model draws: is the part the agent must see in its reconstructions?
# ---------------------------------------------------------------------------------------------------------
SEEN_PART = {"reacher": "goal", "pusher": "object"}  # shifts.PARTS names: Reacher's target, Pusher's puck
RECON_SEED = 30_000  # held-out episodes: neither training's seeds nor evaluation's (pd.EVAL_SEED)


def collect_episodes(env_name: str, episodes: int, image_size: int, action_repeat: int, seed: int = RECON_SEED):
    """Whole uniform-random-action episodes, as the replay holds them, with the SEEN_PART's ground truth:
    frames (E, L, h, w, 3) uint8, actions (E, L, A) (row t: the action that led to frame t; row 0: zeros),
    masks (E, L, h, w) of the part's visible pixels, and blanks (E, L, h, w, 3): each frame re-rendered with the
    part hidden (alpha 0), i.e. the same scene with nothing where the part was. Episode e resets with seed + e."""
    if env_name not in SEEN_PART:
        raise UsageError(f"--reconstruction scores {' or '.join(SEEN_PART)} (the part an agent must see): "
                         f"{env_name} has none; pass --env reacher or --env pusher")
    env = envs.make_env(env_name, image_size=image_size, seed=seed, action_repeat=action_repeat)
    model, viewer = env.unwrapped.model, env.unwrapped.mujoco_renderer.viewer
    geoms = np.array(shifts.part_geoms(model, env_name)[SEEN_PART[env_name]])
    alpha = model.geom_rgba[geoms, 3].copy()
    out = {k: [] for k in ("frames", "actions", "masks", "blanks")}
    try:
        for e in range(episodes):
            obs, _ = env.reset(seed=seed + e)
            rows = {k: [] for k in out}
            action, done = np.zeros(env.action_space.shape, np.float32), False
            while True:
                rows["frames"].append(obs)
                rows["actions"].append(action)
                rows["masks"].append(mujoco_segmentation(env, geoms))
                model.geom_rgba[geoms, 3] = 0.0
                try:
                    viewer.make_context_current()
                    rows["blanks"].append(viewer.render("rgb_array").copy())
                finally:
                    model.geom_rgba[geoms, 3] = alpha
                if done:
                    break
                action = env.action_space.sample().astype(np.float32)
                obs, _, terminated, truncated, _ = env.step(action)
                done = terminated or truncated
            for k in out:
                out[k].append(np.stack(rows[k]))
    finally:
        env.close()
    return tuple(np.stack(out[k]) for k in ("frames", "actions", "masks", "blanks"))


@torch.no_grad()
def reconstruct(agent: pd.Dreamer, frames: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """The world model's reconstruction of each frame (E, L, h, w, 3) uint8, decoded from the posterior state that
    filtering the episode up to and including that frame gives (as WorldModel.loss decodes during training)."""
    device = agent.wm.bins.device
    image = torch.as_tensor(frames, device=device)
    is_first = torch.zeros(frames.shape[:2], dtype=torch.bool, device=device)
    is_first[:, 0] = True
    with pd.autocast(agent):
        deter, stoch, _ = agent.wm.rssm.observe(agent.wm.encoder(image), torch.as_tensor(actions, device=device),
                                                is_first)
        rec = agent.wm.decoder(torch.cat([deter, stoch], -1)).float()  # frame / 255 - 0.5
    return ((rec + 0.5) * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def part_drawn(rec: np.ndarray, frames: np.ndarray, masks: np.ndarray, blanks: np.ndarray) -> dict:
    """score = 1 - SSE(rec, frame) / SSE(blank, frame), both summed over the part's pixels of every frame: the share
    of the error of a reconstruction that leaves the part out which this one removes (1: the part drawn exactly;
    0: no better than leaving it out; below 0: worse). control = the same score for the reconstruction of the next
    episode (episodes rolled by one): a reconstruction of the same kind of scene with the part somewhere else. A
    world model that has learnt the scene but not where the part is scores near its control."""
    assert rec.shape == frames.shape == blanks.shape and masks.shape == frames.shape[:-1], (rec.shape, masks.shape)
    if len(frames) < 2 or not masks.any():
        raise UsageError("the reconstruction probe needs at least 2 episodes with the part in view: raise --episodes")
    x = frames.astype(np.float64)
    sse = lambda y: float(((y.astype(np.float64) - x) ** 2).sum(-1)[masks].sum())  # noqa: E731
    blank = sse(blanks)
    return dict(score=1.0 - sse(rec) / blank, control=1.0 - sse(np.roll(rec, 1, axis=0)) / blank,
                part_pixels=float(masks.sum(axis=(-2, -1)).mean()))


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------
def save_grid(results: dict, path: str, title: str, rows: int = 4):
    """Per condition three columns: the PVM's view, the attention heatmap on it, and the masks (attention red,
    ground truth green, both yellow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(results)
    n = min(rows, len(results[conds[0]]["_maps"][0]))
    fig, axes = plt.subplots(n, 3 * len(conds), figsize=(2.2 * 3 * len(conds), 2.2 * n + 0.4), squeeze=False)
    for c, cond in enumerate(conds):
        view, heat, att_mask, gt = results[cond]["_maps"]
        for i in range(n):
            overlay = np.stack([att_mask[i], gt[i], np.zeros_like(gt[i])], -1).astype(float)
            ax = axes[i, 3 * c:3 * c + 3]
            ax[0].imshow(view[i].clip(0, 1))
            ax[1].imshow(view[i].clip(0, 1))
            ax[1].imshow(heat[i], cmap="inferno", alpha=0.6)
            ax[2].imshow((0.4 * view[i] + 0.6 * overlay).clip(0, 1))
            if i == 0:
                ax[0].set_title(cond, fontsize=8)
                ax[1].set_title("CLS attention", fontsize=8)
                ax[2].set_title(f"J={results[cond]['mean']:.2f} (red attn, green GT)", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="probe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--pvm", choices=[p for p in pd.PVMS if p != "none"], default="",
                   help="the PVM (implied by --checkpoint)")
    p.add_argument("--pvm-id", default="", help="Hugging Face id or local dir (default: the family's, see pvm_dreamer.FAMILIES)")
    p.add_argument("--pvm-random-init", action="store_true", help="RANDOM weights of the architecture (tests)")
    p.add_argument("--checkpoint", default="", help="a run dir or checkpoint: probe the agent's own backbone")
    p.add_argument("--env", default="pusher", choices=envs.ENV_NAMES)
    p.add_argument("--shift", default="none", help="also probe under this shift (shifts.py), e.g. table")
    p.add_argument("--severity", default="hard", help="the shift's severity: easy | medium | hard")
    p.add_argument("--frames", type=int, default=20, help="frames per condition")
    p.add_argument("--mass", type=float, default=0.6, help="attention mass the mask keeps (DINO's 0.6)")
    p.add_argument("--image-size", type=int, default=64, help="frame size the env renders (as the agent's)")
    p.add_argument("--pvm-image-size", type=int, default=224, help="side of the PVM's input (as the agent's)")
    p.add_argument("--seed", type=int, default=0, help="episode i is reset with seed + i")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="probe.png", help="PNG grid; the numbers go to the same name .json")
    p.add_argument("--reconstruction", action="store_true",
                   help="score whether the --checkpoint's world model draws the part it must see (see part_drawn)")
    p.add_argument("--episodes", type=int, default=10, help="held-out episodes for --reconstruction")
    a = p.parse_args(argv)
    if a.reconstruction:
        return main_reconstruction(a)
    with runtime.one_line_errors():
        if not 0 < a.mass <= 1 or a.frames < 1:
            raise UsageError(f"--mass {a.mass} must be in (0, 1] and --frames {a.frames} at least 1")
        torch.manual_seed(a.seed)  # a --pvm-random-init model is then the same on every call
        enc, pvm, random_init = build_encoder(a)
        conds = [("none", "none")] + ([(a.shift, a.severity)] if a.shift != "none" else [])
        results = {}
        for shift, sev in conds:
            frames, gt = collect(a.env, shift, sev, a.frames, a.image_size, a.seed)
            if not gt.any():
                raise UsageError(f"the ground-truth mask is empty on {a.env}: the objects are out of view")
            results["ID" if shift == "none" else f"{shift}:{sev}"] = probe(enc, frames, gt, a.mass)
    name = a.checkpoint or pvm + (f" ({a.pvm_id})" if a.pvm_id else "")
    label = f"{name}{' RANDOM WEIGHTS' if random_init else ''} on {a.env}"
    for cond, r in results.items():
        print(f"{label} [{cond}]: Jaccard {r['mean']:.3f} +- {r['std']:.3f} over {len(r['per_frame'])} frames "
              f"(chance {r['chance']:.3f}; mass {a.mass}; GT covers {r['gt_fraction']:.0%} of the view, the attention "
              f"mask {r['attn_fraction']:.0%})")
    out = Path(a.out)
    summary = dict(model=name, pvm=pvm, random_weights=random_init, env=a.env, mass=a.mass, frames=a.frames,
                   results={c: {k: v for k, v in r.items() if not k.startswith("_")} for c, r in results.items()})
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    save_grid(results, str(out), label)
    return summary


def main_reconstruction(a) -> dict:
    with runtime.one_line_errors():
        if not a.checkpoint:
            raise UsageError("--reconstruction scores a trained world model: pass --checkpoint RUN_DIR")
        if a.shift != "none" or a.episodes < 2:
            raise UsageError(f"--reconstruction runs in distribution (drop --shift {a.shift}) on --episodes >= 2 "
                             f"(got {a.episodes})")
        import evaluate

        agent, args, step, ckpt = evaluate.load_agent(Path(a.checkpoint), a.device)
        torch.manual_seed(a.seed)  # the posterior's latent samples
        frames, actions, masks, blanks = collect_episodes(args.env, a.episodes, args.image_size, args.action_repeat,
                                                          RECON_SEED + a.seed)
        rec = reconstruct(agent, frames, actions)
        r = part_drawn(rec, frames, masks, blanks)
    part = SEEN_PART[args.env]
    print(f"{ckpt} (step {step}) on {args.env}: {part} drawn {r['score']:.3f} (control, another episode's "
          f"reconstruction: {r['control']:.3f}; 1 = exactly, 0 = as if left out) over {a.episodes} episodes of "
          f"{frames.shape[1]} frames, {r['part_pixels']:.0f} {part} pixels a frame")
    summary = dict(checkpoint=str(ckpt), step=step, env=args.env, part=part, episodes=a.episodes, **r)
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    save_reconstructions(frames, rec, blanks, str(out), f"{ckpt.parent.parent.name} step {step}: {part} drawn "
                         f"{r['score']:.2f} (control {r['control']:.2f})")
    return summary


def save_reconstructions(frames, rec, blanks, path: str, title: str, rows: int = 4):
    """Rows of (frame, reconstruction, frame with the part hidden), at the middle step of the first episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, t = min(rows, len(frames)), frames.shape[1] // 2
    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.2 * n + 0.4), squeeze=False)
    for i in range(n):
        for j, (img, name) in enumerate([(frames, "frame"), (rec, "reconstruction"), (blanks, "part hidden")]):
            axes[i, j].imshow(img[i, t])
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
