"""pvm-dreamer: DreamerV3 from pixels, with a from-scratch CNN or a pre-trained vision model (PVM) as its eyes.

One file, read top to bottom, in the order data flows:
  Args -> math (symlog, two-hot, lambda-returns, return normaliser) -> replay -> encoders (CNN | a ViT family:
  DINOv2, CLIP, SigLIP, ViT, MAE; frozen / partial / full / lora) -> world model (RSSM, decoder, reward and
  continue heads) -> actor-critic in imagination -> one training step -> acting and evaluation -> what a checkpoint holds -> main loop.
It imports its companions envs.py (pixel envs) and runtime.py (checkpoint files, run lock, logging, signals,
one-line CLI errors); the scripts (evaluate.py, probe.py, bench.py, sweep.py) import it, never the reverse.

  python pvm_dreamer.py                                            # CNN baseline on MuJoCo Pusher, no download
  python pvm_dreamer.py --pvm dinov2 --mode partial --env metadrive # the paper's flagship setting

References
  [D3]  Hafner, Pasukonis, Ba, Lillicrap. Mastering Diverse Domains through World Models (DreamerV3), 2023;
        hyperparameters from danijar/dreamerv3 `configs.yaml` (latest version, which names sizes size1m..size400m).
  [PVM] Jones, Zhou, Pattinson. Pre-trained Visual Representations Generalize Where it Matters in
        Model-Based Reinforcement Learning, 2025 (arXiv 2509.12531).

Deviations from [D3]/[PVM]; each is marked `# differs from paper:` where it lives:
  - Adam with the DreamerV3 paper's (v1) learning rates, eps and global-norm clipping instead of the latest
    code's LaProp + adaptive gradient clipping (a PyTorch-native choice, used by the PyTorch ports too).
  - LayerNorm (as DreamerV3 v1) instead of the latest code's RMSNorm: a fused kernel in PyTorch (see norm()).
  - Strided 4x4 convolutions in the CNN (as DreamerV3 v1) instead of stride-1 convs + pooling: ~4x cheaper.
  - Two-hot bins live in symlog space (as the DreamerV3 paper describes it).
  - Defaults sized for a CPU (`--size small`, 64x64 images); the paper ran size200m at 224x224.
  - A learned projection to the embedding width E after the PVM: per patch token for patch features (DINOv2),
    and a Linear for a pooled output (CLIP) (see PVMEncoder).
Left out, for readability: the replay-value loss (`repval`), replay context / latent replay, prioritised
replay, parallel environments, and distributed actors. `# ABLATION POINT:` marks the knobs worth forking.

Shape legend (used in the trailing comments): B batch, T time, H imagination horizon, N = B*T imagination
starts, S stochastic groups, C classes per group, D deterministic state, F = D + S*C model features,
E embedding, P image patches, W PVM width, A action dims, K two-hot bins.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import shlex
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import envs
import runtime
from runtime import UsageError


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------
PVM = Literal["none", "dinov2", "clip", "siglip", "vit", "mae"]  # the image encoder: none = the from-scratch CNN
Mode = Literal["frozen", "partial", "full", "lora"]  # how a PVM is fine-tuned
LoraTargets, LoraBlocks = Literal["qv", "attn", "attn-mlp"], Literal["last-k", "all"]  # see Args.lora_*
PVMS, MODES = get_args(PVM), get_args(Mode)


def encoder_label(pvm: str, mode: str) -> str:
    """How runs, sweeps and result tables name an encoder: cnn, or PVM-MODE (the CNN has no mode)."""
    return "cnn" if pvm == "none" else f"{pvm}-{mode}"


@dataclass
class Args:
    # --- experiment
    env: str = "pusher"
    """environment: pusher | reacher | metadrive | metadrive-topdown | pointmass (see envs.py)"""
    seed: int = 1
    """seed of python, numpy, torch and the environment"""
    device: str = "auto"
    """torch device: auto (cuda if available, else cpu) | cpu | cuda | cuda:N"""
    compile: bool = False
    """torch.compile what an update repeats: the posterior scan in chunks of --compile-chunk steps (`RSSM.scan`),
    the prior's `RSSM.img_step` and `Dreamer.policy_step` (15 times each at H = 15), and what every env step
    repeats: `Dreamer.act_step` (encoder, posterior step, actor) and `Dreamer.cache_prefix`. Fewer, fused kernels
    where the GPU waits on kernel launches. Off by default: it costs compile time at start and gains little on
    a CPU; the eager steps are the ones to read"""
    compile_chunk: int = 8
    """--compile: the posterior scan's steps per compiled graph. Inside one graph the chunk's steps are fused
    and their weight gradients summed; more steps compile for longer (at the NM512 configuration on a 2-core
    CPU: 1 -> 42 s, 8 -> 117 s, 16 -> 202 s) for fewer kernels per update (5,884 -> 4,071 -> 3,923)"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16: bfloat16 autocast of the networks' maths (PVM, world model, actor-critic) in updates and acting; weights,
    optimiser state, losses and distributions stay fp32. auto = bf16 on a CUDA GPU that supports it, fp32 on
    anything else: [D3]'s default compute dtype is bfloat16; on an H200 at the paper's configuration it halved
    full fine-tuning's update (1.89 -> 0.97 s) and cut its memory by 36%; most CPUs run bf16 slower than fp32"""
    logdir: str = "runs"
    """runs are written to LOGDIR/RUN_NAME (TensorBoard events, metrics.jsonl, checkpoints/, videos/)"""
    run_name: str = ""
    """empty = ENV__ENCODER__SEED__UNIXTIME, as CleanRL names runs"""
    resume: str = ""
    """a run directory (continues from its newest intact checkpoint) or a checkpoint file; same flags as the
    original run (--total-steps may grow)"""

    # --- encoder: a from-scratch CNN or a pre-trained vision model
    pvm: PVM = "none"
    """image encoder: none = DreamerV3's CNN trained from scratch (the baseline); dinov2 | clip = the paper's PVMs;
    siglip | vit | mae = more ViT families from the Hub (beyond the paper; see FAMILIES)"""
    pvm_id: str = ""
    """Hugging Face model id or local directory of a model of --pvm's family (DINOv2 with registers is --pvm
    dinov2); empty = the family's default: dinov2-small / clip-vit-base-patch32 (the paper's),
    siglip-base-patch16-224, vit-base-patch16-224-in21k, vit-mae-base"""
    pvm_features: Literal["auto", "patches", "pooled"] = "auto"
    """what the PVM hands the world model: auto = [PVM]'s rule (patch tokens for self-supervised DINOv2 / MAE and
    for ViT; the pooled output for contrastive CLIP / SigLIP); patches = the final-norm patch tokens; pooled = the
    final-norm CLS token (SigLIP: its attention-pooling head)"""
    pvm_random_init: bool = False
    """build the PVM architecture with RANDOM weights (offline tests and timing only; not a pre-trained model)"""
    mode: Mode = "partial"
    """PVM fine-tuning: frozen = no gradient reaches it; partial = only the last k blocks train; full = all train;
    lora = low-rank adapters on the last k blocks train, the pre-trained weights never change (beyond the paper)"""
    finetune_blocks: int = 4
    """k for --mode partial / lora: the last k transformer blocks train or get adapters ([PVM]: 4 of 12)"""
    finetune_norm: bool = False
    """--mode partial: also train the ViT's final layernorm (and SigLIP's pooling head; [PVM] keeps it frozen)"""
    grad_checkpoint: Literal["auto", "on", "off", "nested"] = "auto"
    """activation checkpointing of the ViT that trains (its blocks in partial, lora, full; also its embeddings in
    full): their activations are recomputed in the backward pass instead of kept, the same numbers for one more
    forward pass of them. auto = on where a ViT trains on a CUDA device, off otherwise. At the paper's batch
    partial and full need ~35 / ~90 GiB without it and 14-18 GiB with it (measured on an H200; bench.py
    --memory shows where it goes), +14% time for full; a CPU run has RAM for a CPU-sized batch and too
    little compute to spare. nested: also checkpoint groups of ceil(sqrt(k)) of the k trained blocks around the
    per-block checkpoints, so ~2 sqrt(k) block inputs are kept instead of k (7 instead of 12 in full mode), for
    one more forward pass of the trained blocks; the same numbers again (a 16-GB card in full mode)"""
    encoder_lr_scale: float = 0.1
    """fine-tuned PVM parameters (LoRA adapters included) learn at wm_lr * this ([PVM]: 0.1; untuned for --mode
    lora, where adapters that start at B = 0 usually want a higher rate)"""
    lora_rank: int = 8
    """--mode lora: rank r of each adapter (peft's default)"""
    lora_alpha: float = 8.0
    """--mode lora: adapter scale; a layer computes W x + (alpha / r) B A x (peft's default: 8, so 1.0 at r=8)"""
    lora_dropout: float = 0.0
    """--mode lora: dropout on the adapters' input (the only dropout that runs while fine-tuning, see PVMEncoder)"""
    lora_targets: LoraTargets = "qv"
    """--mode lora: which linear layers of a block get adapters: qv = query and value (the LoRA paper's choice);
    attn = every attention projection; attn-mlp = every linear layer of the block"""
    lora_blocks: LoraBlocks = "last-k"
    """--mode lora: adapt the last --finetune-blocks blocks (the same blocks as partial, so the feature cache keeps
    the frozen prefix) or all blocks"""
    l2sp: float = 0.0
    """--mode partial / full: weight a of the L2-SP penalty a/2 * ||theta - theta_pretrained||^2 on the fine-tuned
    PVM parameters, added to the world-model loss (0 = off; beyond the paper)"""
    pvm_image_size: int = 224
    """side of the square image the PVM sees (frames are resized to it with the PVM's own preprocessing)"""
    pvm_token_dim: int = 16
    """patch features only: width each patch token is projected to before flattening (see PVMEncoder)"""
    feature_cache: bool = True
    """frozen/partial: run the frozen part of the PVM once per frame, when it enters replay, and train on its
    stored output instead of re-encoding every replayed frame ~train-ratio times (the same maths up to the
    fp16 rounding of the stored features)"""
    feature_cache_gb: float = 4.0
    """memory budget of the feature cache (replay-size x bytes per frame); above it the cache is switched off"""

    # --- environment and model size
    image_size: int = 64  # differs from paper: 224, too slow for a CPU
    """side of the square frames the env renders, the CNN sees and the decoder reconstructs"""
    action_repeat: int = 2
    """each agent action is repeated this many simulator steps"""
    size: Literal["tiny", "size1m", "small", "size12m", "size25m", "size50m", "size100m", "size200m",
                  "size400m"] = "small"  # differs from paper: size200m
    """model size preset, smallest first: tiny (tests), size1m, small (CPU default), then [D3]'s presets"""

    # --- training loop
    total_steps: int = 1_010_000
    """agent steps to train for (each is --action-repeat simulator steps), counted over all envs; [PVM]
    manipulation: 1.01M"""
    num_envs: int = 1
    """envs stepped in parallel (one process each for N > 1), with one encoder call for all N frames per step.
    1 (the paper's setting) keeps runs exactly as they were; a PVM on a GPU gains most from 4-8"""
    learning_starts: int = 1000
    """agent steps of uniform-random actions collected before the first update"""
    train_ratio: float = 32.0
    """replayed steps per agent step: an update (batch_size * batch_length steps) runs every B*T/ratio steps"""
    batch_size: int = 16
    """B: sequences per update"""
    batch_length: int = 64
    """T: steps per sequence"""
    replay_size: int = 250_000  # differs from paper: 5e6, which would need 61 GB of 64x64 frames
    """replay capacity in agent steps (uint8 frames: 12 KB each at 64x64)"""
    checkpoint_every: int = 10_000
    """agent steps between checkpoints RUN/checkpoints/ckpt_STEP.pt (also written at step 0, at the end, and
    on SIGTERM/Ctrl-C)"""
    keep_checkpoints: int = 3
    """how many of the newest checkpoints to keep (older ones are deleted; corrupt ones are kept as *.corrupt)"""
    checkpoint_replay: bool = True
    """store the replay buffer in the checkpoint, so --resume continues with the same data"""
    eval_every: int = 10_000
    """agent steps between evaluations (0 = only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation, with the policy's mean action"""
    capture_video: bool = False
    """write the first evaluation episode of each evaluation to RUN/videos/*.mp4"""
    log_every: int = 1_000
    """agent steps between logged averages of the training losses"""
    track: bool = False
    """also log to Weights & Biases, as CleanRL does: the same scalars, the flags, evaluation videos (needs
    `pip install wandb`; WANDB_MODE=offline writes RUN/wandb/ for a later `wandb sync`)"""
    wandb_project_name: str = "pvm-dreamer"
    """the W&B project of --track"""
    wandb_entity: str = ""
    """the W&B team or user of --track (empty: your default entity)"""

    # --- DreamerV3 hyperparameters ([D3] defaults unless marked)
    wm_lr: float = 1e-4  # differs from paper: latest code uses 4e-5 with LaProp; 1e-4 is the paper's Adam rate
    """world-model learning rate"""
    actor_lr: float = 3e-5
    """actor learning rate"""
    critic_lr: float = 3e-5
    """critic learning rate"""
    imag_horizon: int = 15
    """imagined steps per actor-critic update"""
    horizon: float = 333.0
    """discount horizon: gamma = 1 - 1/horizon"""
    lam: float = 0.95
    """lambda of the lambda-returns"""
    actor_entropy: float = 3e-4
    """entropy regulariser weight (on normalised returns)"""
    slow_critic_rate: float = 0.02
    """EMA rate of the slow critic that regularises the critic"""
    free_nats: float = 1.0
    """KL free bits: each KL term is clipped below at this many nats"""
    dyn_scale: float = 1.0
    """weight of KL(sg(posterior) || prior), which trains the prior"""
    rep_scale: float = 0.1
    """weight of KL(posterior || sg(prior)), which regularises the representation"""
    unimix: float = 0.01
    """uniform mixture in every categorical (latents and actor)"""
    actor_grad: Literal["reinforce", "dynamics"] = "reinforce"
    """actor gradient: reinforce ([D3] latest) | dynamics (backprop through the world model, [D3] v1's choice
    for continuous actions; learns faster per update, costs a backward pass through imagination)"""
    torch_deterministic: bool = True
    """torch.backends.cudnn.deterministic"""


# Model size presets: RSSM deter/hidden/stoch groups/classes, CNN depth, MLP units, GRU blocks.
# size1m..size400m are [D3]'s (configs.yaml). `tiny` exists for tests; `small` makes a CPU run practical.
SIZES = {
    "tiny": dict(deter=64, hidden=32, stoch=8, classes=8, depth=4, units=32, blocks=4),
    "size1m": dict(deter=512, hidden=64, stoch=32, classes=4, depth=4, units=64, blocks=8),
    "small": dict(deter=256, hidden=128, stoch=16, classes=16, depth=16, units=128, blocks=4),
    "size12m": dict(deter=2048, hidden=256, stoch=32, classes=16, depth=16, units=256, blocks=8),
    "size25m": dict(deter=3072, hidden=384, stoch=32, classes=24, depth=24, units=384, blocks=8),
    "size50m": dict(deter=4096, hidden=512, stoch=32, classes=32, depth=32, units=512, blocks=8),
    "size100m": dict(deter=6144, hidden=768, stoch=32, classes=48, depth=48, units=768, blocks=8),
    "size200m": dict(deter=8192, hidden=1024, stoch=32, classes=64, depth=64, units=1024, blocks=8),
    "size400m": dict(deter=12288, hidden=1536, stoch=32, classes=96, depth=96, units=1536, blocks=8),
}


def uses_bf16(args: Args, device: torch.device) -> bool:
    """--precision on this device: auto = bf16 on a CUDA GPU that supports it (see Args)."""
    if args.precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return args.precision == "bf16"


def grad_checkpointing(args: Args, device: torch.device) -> str:
    """--grad-checkpoint on this device, off | on | nested: auto = on where a ViT trains on CUDA (see Args)."""
    ckpt = {True: "on", False: "off"}.get(args.grad_checkpoint, args.grad_checkpoint)  # (checkpoints' old bools)
    if ckpt == "auto":
        return "on" if device.type == "cuda" and args.pvm != "none" and args.mode != "frozen" else "off"
    return ckpt


def for_device(args: Args, device: torch.device) -> Args:
    """args with --precision auto and --grad-checkpoint auto decided for this device and mode."""
    return replace(args, precision="bf16" if uses_bf16(args, device) else "fp32",
                   grad_checkpoint=grad_checkpointing(args, device))


# ---------------------------------------------------------------------------------------------------------
# Math: symlog, two-hot, lambda-returns, return normalisation ([D3] Sec. 2-3)
# ---------------------------------------------------------------------------------------------------------
def symlog(x: torch.Tensor) -> torch.Tensor:
    """Squash large magnitudes but stay linear near 0, so one network fits rewards of any scale ([D3] eq. 1)."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.expm1(x.abs())


BINS = torch.linspace(-20.0, 20.0, 255)  # K two-hot bins in symlog space: covers |y| up to e^20


def twohot(y: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Encode y (already in symlog space) as weights on its two nearest bins; (...) -> (..., K)."""
    y = y.clamp(bins[0], bins[-1]).contiguous()
    hi = torch.searchsorted(bins, y, right=True).clamp(1, len(bins) - 1)  # index of the bin above y
    lo = hi - 1
    w_hi = (y - bins[lo]) / (bins[hi] - bins[lo])
    out = torch.zeros(*y.shape, len(bins), device=y.device, dtype=y.dtype)
    out.scatter_(-1, lo[..., None], (1 - w_hi)[..., None])
    out.scatter_add_(-1, hi[..., None], w_hi[..., None])
    return out


def twohot_mean(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Prediction of a two-hot head: expected bin under softmax, back in raw units; (..., K) -> (...)."""
    return symexp((logits.float().softmax(-1) * bins).sum(-1))  # .float(): in fp32 under --precision bf16 too


def twohot_loss(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the two-hot code of symlog(target): regression that ignores the target's scale."""
    assert logits.shape[:-1] == target.shape, (logits.shape, target.shape)
    return -(twohot(symlog(target), bins) * logits.float().log_softmax(-1)).sum(-1)


def lambda_return(reward, disc, value, lam):
    """TD(lambda) targets over an imagined trajectory ([D3] eq. 7), computed backwards from the bootstrap.
    reward, disc: (H, N) for states 1..H (disc = gamma * P(continue)); value: (H+1, N) for states 0..H.
    Returns (H, N): R_t = r_{t+1} + disc_{t+1} * ((1 - lam) * v_{t+1} + lam * R_{t+1}), R_H = v_H."""
    assert reward.shape == disc.shape and value.shape[0] == reward.shape[0] + 1, (reward.shape, value.shape)
    ret, out = value[-1], []
    for t in reversed(range(reward.shape[0])):
        ret = reward[t] + disc[t] * ((1 - lam) * value[t + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1])  # (H, N)


def imagination_weight(cont: torch.Tensor, gamma: float) -> torch.Tensor:
    """Weight of imagined steps 0..H-1 in the actor-critic losses: the discounted probability that the episode
    still runs there, w_t = c_0 * prod_{i=1..t} gamma * c_i, as [D3]'s `imag_loss` (cumprod(disc * con) / disc).
    cont: (H+1, N) continue probabilities of states 0..H, c_0 that of the posterior start state, so a start
    that is already terminal weighs nothing. Returns (H, N)."""
    assert cont.dim() == 2 and cont.shape[0] >= 2, cont.shape
    return torch.cumprod(torch.cat([cont[:1], gamma * cont[1:-1]]), 0)


class ReturnNorm(nn.Module):
    """Scale advantages by the 5th-95th percentile range of returns, but never amplify (scale >= 1).
    EMA of the percentiles (rate 0.01). Mirrors `retnorm` (impl perc) in [D3]; state lives in buffers so it
    is checkpointed with the agent.
    # ABLATION POINT: the return normaliser (e.g. no normalisation: scale() = 1)"""

    def __init__(self, rate=0.01, limit=1.0, lo=5.0, hi=95.0):
        super().__init__()
        self.rate, self.limit = rate, limit
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        # a buffer moves with the agent, so no update copies it to the GPU (a copy that waits for the GPU);
        # not persistent: a constant, not in checkpoints
        self.register_buffer("q", torch.tensor([lo / 100, hi / 100]), persistent=False)

    def update(self, ret: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.quantile(ret.detach().flatten().float(), self.q)
        self.lo.lerp_(lo, self.rate)
        self.hi.lerp_(hi, self.rate)
        return self.scale()

    def scale(self) -> torch.Tensor:
        return (self.hi - self.lo).clamp(min=self.limit)


# ---------------------------------------------------------------------------------------------------------
# Replay: a ring buffer of single steps that samples (B, T) windows
# ---------------------------------------------------------------------------------------------------------
class Replay:
    """Row t holds obs[t] (uint8), the action that LED to obs[t] (`prevact`, zeros after a reset), the reward
    received on arriving at obs[t], is_first (obs[t] came from reset) and is_terminal (the episode ended in
    obs[t]; a time-limit truncation is not terminal). Windows may cross episode boundaries: the RSSM resets
    its state wherever is_first is set, and every window starts with is_first=True because we do not replay
    latent states (latest [D3] does; the replay-context trick is left out).
    With `feat_shape`, row t also holds `feat`: the frozen PVM prefix's output for obs[t] (fp16, see
    `feature_cache_shape`), so training never runs the frozen part of the PVM twice on the same frame.
    With `streams` = N parallel envs, each env writes its own ring of capacity // N rows (`add(..., stream=i)`),
    and a window lies inside one stream: it never runs from one env's frames into another's. Windows are drawn
    uniformly over all the windows the streams hold (with one stream: exactly the draws of a single ring)."""

    def __init__(self, capacity: int, image_shape, action_dim: int, seed: int, feat_shape=None, streams: int = 1):
        assert capacity >= streams >= 1, f"replay capacity {capacity} is below one row per stream ({streams})"
        self.capacity = capacity // streams  # rows per stream
        self.idx, self.full = np.zeros(streams, np.int64), np.zeros(streams, bool)
        shape = lambda *s: (streams, self.capacity, *s)  # noqa: E731
        self.data = dict(
            image=np.zeros(shape(*image_shape), np.uint8),
            action=np.zeros(shape(action_dim), np.float32),
            reward=np.zeros(shape(), np.float32),
            is_first=np.zeros(shape(), bool),
            is_terminal=np.zeros(shape(), bool),
        )
        if feat_shape is not None:
            self.data["feat"] = np.zeros(shape(*feat_shape), np.float16)
        self.rng = np.random.default_rng(seed)

    @property
    def streams(self) -> int:
        return len(self.idx)

    def lengths(self) -> np.ndarray:  # rows held per stream
        return np.where(self.full, self.capacity, self.idx)

    def __len__(self):
        return int(self.lengths().sum())

    def windows(self, length: int) -> np.ndarray:  # how many windows of `length` rows each stream holds
        return np.maximum(self.lengths() - length + 1, 0)

    def add(self, image, action, reward, is_first, is_terminal, feat=None, stream: int = 0):
        assert (feat is None) == ("feat" not in self.data), "pass feat exactly when the replay caches features"
        i = self.idx[stream]
        for key, value in zip(self.data, (image, action, reward, is_first, is_terminal, feat)):
            self.data[key][stream, i] = value
        self.idx[stream] = (i + 1) % self.capacity
        self.full[stream] |= self.idx[stream] == 0

    def sample(self, batch_size: int, length: int) -> dict:
        windows = self.windows(length)
        assert windows.sum() > 0, f"replay holds {len(self)} steps, no window of {length} in one stream"
        draw = self.rng.integers(0, windows.sum(), batch_size)  # a window, numbered across all streams
        stream = np.searchsorted(np.cumsum(windows), draw, side="right")  # (B,), stream 0 when there is one
        starts = draw - (np.cumsum(windows) - windows)[stream]  # offsets from that stream's oldest row
        oldest = np.where(self.full, self.idx, 0)[stream]  # a window must not run across the write head
        rows = (oldest[:, None] + starts[:, None] + np.arange(length)) % self.capacity  # (B, T)
        batch = {k: v[stream[:, None], rows] for k, v in self.data.items()}
        batch["is_first"][:, 0] = True
        return batch

    def state_dict(self):
        n = self.lengths()
        return dict(idx=self.idx.copy(), full=self.full.copy(), rng=self.rng.bit_generator.state,
                    data={k: [v[s, :n[s]].copy() for s in range(self.streams)] for k, v in self.data.items()})

    def load_state_dict(self, state) -> bool:
        """Returns False when this replay caches features but the checkpoint's replay did not (refill them)."""
        data, idx, full = state["data"], np.atleast_1d(state["idx"]), np.atleast_1d(state["full"])
        if np.ndim(state["idx"]) == 0:  # written before replay streams existed: one ring
            data = {k: [v] for k, v in data.items()}
        assert len(idx) == self.streams, f"checkpoint replay has {len(idx)} streams, this run {self.streams}"
        for k, per_stream in data.items():
            if k in self.data:  # a cache saved by a run with --feature-cache is dropped without it
                for s, v in enumerate(per_stream):
                    self.data[k][s, :len(v)] = v
        self.idx[:], self.full[:] = idx, full
        self.rng.bit_generator.state = state["rng"]
        return "feat" not in self.data or "feat" in data

    @torch.no_grad()
    def fill_cache(self, encoder, device, chunk: int = 64):
        """Compute the feature cache of every stored frame (resuming a run saved without the cache)."""
        for s, n in enumerate(self.lengths()):
            for i in range(0, n, chunk):
                frames = torch.as_tensor(self.data["image"][s, i:min(i + chunk, n)], device=device)
                self.data["feat"][s, i:i + len(frames)] = encoder.prefix(frames).half().cpu().numpy()


# ---------------------------------------------------------------------------------------------------------
# Building blocks: every hidden layer is Linear/Conv -> norm -> SiLU, as in [D3]
# ---------------------------------------------------------------------------------------------------------
def norm(dim: int) -> nn.LayerNorm:
    """The hidden layers' normalisation. differs from paper: LayerNorm, as DreamerV3 v1, not the latest code's
    RMSNorm: PyTorch's LayerNorm is one fused CPU kernel, its RMSNorm a chain of elementwise ops that is 2.5x
    slower forward+backward and 4x slower without grad on the (H*N, units) activations of imagination."""
    return nn.LayerNorm(dim, eps=1e-3)


def mlp(inp: int, units: int, layers: int) -> nn.Sequential:
    """The bias before the norm matters: without it norm(W a) forgets the scale of a low-dimensional input (a
    2-D action a and 0.1 a would embed identically), so the dynamics could not tell a nudge from a full push."""
    mods = []
    for i in range(layers):
        mods += [nn.Linear(inp if i == 0 else units, units), norm(units), nn.SiLU()]
    return nn.Sequential(*mods)


def head(inp: int, units: int, layers: int, out: int, outscale: float) -> nn.Sequential:
    """MLP + output layer whose initial weights are scaled by `outscale`. [D3] zero-initialises the reward
    and value outputs (outscale 0), so early predictions are exactly 0 instead of random large numbers."""
    linear = nn.Linear(units, out)
    with torch.no_grad():
        linear.weight.mul_(outscale)
        linear.bias.zero_()
    return nn.Sequential(mlp(inp, units, layers), linear)


class ChannelNorm(nn.LayerNorm):
    """norm() over the channels of a (N, C, H, W) map, per pixel. Run on the channels-last view: with
    channels_last tensors the permute is free."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-3)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_stages(image_size: int) -> tuple[int, int]:
    """Number of stride-2 stages that take image_size down to a 4..7 pixel grid, and that grid's side."""
    stages, res = 0, image_size
    while res > 7 and res % 2 == 0:
        res, stages = res // 2, stages + 1
    if res > 7 or stages < 2:
        raise UsageError(f"--image-size {image_size} cannot be halved down to a 4-7 pixel grid by the CNN "
                         "encoder/decoder; use e.g. 32, 48, 64, 96, 128 or 224")
    return stages, res


def cnn_channels(depth: int, stages: int) -> list[int]:
    return [depth * min(2**i, 8) for i in range(stages)]  # depth, 2d, 4d, 8d, 8d, ...


def cnn_embed_dim(image_size: int, depth: int) -> int:
    stages, res = conv_stages(image_size)
    return cnn_channels(depth, stages)[-1] * res * res  # the flattened last feature map


# ---------------------------------------------------------------------------------------------------------
# Encoders. Both map uint8 frames (..., h, w, 3) to embeddings (..., E).
# ---------------------------------------------------------------------------------------------------------
class CNNEncoder(nn.Module):
    """DreamerV3's image encoder, trained from scratch: the paper's baseline."""

    def __init__(self, image_size: int, depth: int):
        super().__init__()
        stages, res = conv_stages(image_size)
        mods, cin = [], 3
        for cout in cnn_channels(depth, stages):  # differs from paper: stride-2 4x4 convs (v1), not conv+pool
            mods += [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), ChannelNorm(cout), nn.SiLU()]
            cin = cout
        self.net, self.out_dim = nn.Sequential(*mods), cnn_embed_dim(image_size, depth)
        self.to(memory_format=torch.channels_last)  # NHWC convs: ~1.4x faster on CPU (oneDNN) and on GPU

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.reshape(-1, *obs.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0 - 0.5  # (B*T, 3, h, w), NHWC
        return self.net(x).reshape(*obs.shape[:-3], self.out_dim)  # (..., E)


# ---------------------------------------------------------------------------------------------------------
# PVM families: how each kind of Hugging Face ViT is taken apart. Everything PVMEncoder does to a backbone
# (its blocks for partial/lora, its final norm, what precedes the patch tokens, how its embeddings are called)
# is read from this table, so supporting one more family is one entry.
# ---------------------------------------------------------------------------------------------------------
IMAGENET_STATS = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
HALF_STATS = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CLIP_STATS = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))


@dataclass(frozen=True)
class Family:
    models: dict[str, tuple[str, str]]  # config.model_type -> (transformers model class, its config class)
    default_id: str  # the checkpoint --pvm loads without --pvm-id
    root: str  # the submodule that is the ViT ("" = the model itself)
    blocks: str  # its transformer blocks (a ModuleList), relative to root
    final_norm: str  # the norm after the last block
    features: str  # [PVM]'s rule: patches (self-supervised) or pooled (contrastive); --pvm-features overrides
    cls: bool = True  # a CLS token precedes the patch tokens (SigLIP has none)
    pre_norm: str = ""  # a norm between the embeddings and the first block (CLIP's pre_layrnorm)
    pool_head: str = ""  # a learned pooling module after the final norm (SigLIP's attention-pooling head)
    block_masks: int = 0  # how many mask arguments (passed as None) a block takes after the hidden states
    embed_kw: tuple[str, ...] = ()  # keyword arguments of its embeddings: interpolate_pos_encoding, noise (MAE)
    model_kw: tuple[tuple[str, object], ...] = ()  # extra model-constructor arguments
    preprocessing: dict = None  # the default checkpoint's image-processor config, for when none is at hand


FAMILIES = {
    # DINOv2 (self-supervised): final-norm patch tokens. With registers, 4 register tokens follow the CLS.
    "dinov2": Family(models={"dinov2": ("Dinov2Model", "Dinov2Config"),
                             "dinov2_with_registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig")},
                     default_id="facebook/dinov2-small", root="", blocks="encoder.layer", final_norm="layernorm",
                     features="patches",
                     preprocessing=dict(resize=256, crop=224, resample="bicubic", **IMAGENET_STATS)),
    # CLIP (contrastive): pooled output = the post-layernorm CLS token.
    "clip": Family(models={"clip": ("CLIPVisionModel", "CLIPVisionConfig"),
                           "clip_vision_model": ("CLIPVisionModel", "CLIPVisionConfig")},
                   default_id="openai/clip-vit-base-patch32", root="vision_model", blocks="encoder.layers",
                   final_norm="post_layernorm", features="pooled", pre_norm="pre_layrnorm", block_masks=2,
                   embed_kw=("interpolate_pos_encoding",),
                   preprocessing=dict(resize=224, crop=224, resample="bicubic", **CLIP_STATS)),
    # SigLIP (contrastive, no CLS): pooled output = its multi-head attention-pooling head over all tokens.
    "siglip": Family(models={"siglip": ("SiglipVisionModel", "SiglipVisionConfig"),
                             "siglip_vision_model": ("SiglipVisionModel", "SiglipVisionConfig")},
                     default_id="google/siglip-base-patch16-224", root="vision_model", blocks="encoder.layers",
                     final_norm="post_layernorm", features="pooled", cls=False, pool_head="head", block_masks=1,
                     embed_kw=("interpolate_pos_encoding",),
                     preprocessing=dict(resize=224, crop=None, resample="bicubic", **HALF_STATS)),
    # ViT (supervised, ImageNet-21k): patch tokens, as for DINOv2 (control needs where things are; its CLS was
    # trained to name a class). Built without its pooler (a Linear + tanh the agent never uses).
    "vit": Family(models={"vit": ("ViTModel", "ViTConfig")}, default_id="google/vit-base-patch16-224-in21k",
                  root="", blocks="encoder.layer", final_norm="layernorm", features="patches",
                  embed_kw=("interpolate_pos_encoding",), model_kw=(("add_pooling_layer", False),),
                  preprocessing=dict(resize=224, crop=None, resample="bilinear", **HALF_STATS)),
    # ViT-MAE (self-supervised): patch tokens, with masking off (mask ratio 0 and an identity "shuffle", so every
    # patch is kept in its place; MAE's encoder otherwise drops 75% of them at random).
    "mae": Family(models={"vit_mae": ("ViTMAEModel", "ViTMAEConfig")}, default_id="facebook/vit-mae-base",
                  root="", blocks="encoder.layer", final_norm="layernorm", features="patches",
                  embed_kw=("interpolate_pos_encoding", "noise"),
                  preprocessing=dict(resize=224, crop=None, resample="bicubic", **IMAGENET_STATS)),
}
PVM_DEFAULT_IDS = {name: fam.default_id for name, fam in FAMILIES.items()}


def pvm_source(pvm: str, pvm_id: str = "") -> str:
    """The Hugging Face id or local directory a PVM loads from: --pvm-id, else the family's default model."""
    return pvm_id or PVM_DEFAULT_IDS[pvm]


# Architectures of well-known checkpoints, so --pvm-random-init builds them offline (no config download), with
# the same parameter shapes as the real weights (DINOv2 was trained with 37x37 position embeddings, image 518).
PVM_ARCHS = {
    "facebook/dinov2-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518),
    "facebook/dinov2-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518),
    "facebook/dinov2-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518),
    "facebook/dinov2-with-registers-small": dict(model_type="dinov2_with_registers", hidden_size=384,
                                                 num_hidden_layers=12, num_attention_heads=6, image_size=518,
                                                 patch_size=14, num_register_tokens=4),  # (its config's default: 16)
    "openai/clip-vit-base-patch32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, patch_size=32),
    "openai/clip-vit-base-patch16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, patch_size=16),
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, patch_size=14),
    "google/siglip-base-patch16-224": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, patch_size=16, image_size=224),
    "google/vit-base-patch16-224-in21k": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, patch_size=16, image_size=224),
    "facebook/vit-mae-base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, patch_size=16, image_size=224),
    # A 6-block, 32-wide ViT of --pvm's family for tests and debugging on a CPU (a few ms per frame).
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2,
                 patch_size=8, image_size=32),
    "tiny-registers": dict(model_type="dinov2_with_registers", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=6, num_attention_heads=2, patch_size=8, image_size=32,
                           num_register_tokens=4),
}


# PVMEncoder's `lora` settings: Args' lora_* flags, without the prefix (defaults read from Args, never copied).
LORA_DEFAULTS = {k: getattr(Args, f"lora_{k}") for k in ("rank", "alpha", "dropout", "targets", "blocks")}
_LOAD_FIX = "pass a local directory with --pvm-id, or use --pvm-random-init for an untrained model of the same " \
            "architecture"


def pvm_classes(pvm: str, model_type: str, src: str) -> tuple[type, type]:
    """The transformers (model, config) classes of a checkpoint's model_type, if it belongs to --pvm's family."""
    import transformers

    if model_type not in FAMILIES[pvm].models:
        owner = next((name for name, fam in FAMILIES.items() if model_type in fam.models), None)
        if owner:
            raise UsageError(f"'{src}' is a {model_type} model, not {pvm}: pass --pvm {owner}")
        known = ", ".join(f"{name} ({'/'.join(fam.models)})" for name, fam in FAMILIES.items())
        raise UsageError(f"'{src}' is a '{model_type}' model, which pvm-dreamer cannot take apart; supported "
                         f"--pvm families (their model types): {known}")
    return tuple(getattr(transformers, c) for c in FAMILIES[pvm].models[model_type])


def load_pvm(pvm: str, pvm_id: str, random_init: bool) -> nn.Module:
    """A transformers vision model of --pvm's family (FAMILIES), by Hub id or local directory: pre-trained via
    from_pretrained, or randomly initialised from a config (tests, timing). Its config's model_type decides
    the class; a model of another family, an unsupported one, or missing weights are one line each."""
    from transformers import PretrainedConfig
    from transformers.utils import logging as hf_logging

    def model_type(src: str, **kw) -> str:  # what AutoConfig dispatches on, read from config.json
        cfg = PretrainedConfig.get_config_dict(src, **kw)[0]
        if "model_type" not in cfg:  # (an empty directory reads as {}; AutoConfig would then guess from its name)
            raise OSError("no config.json with a model_type")
        return cfg["model_type"]

    hf_logging.set_verbosity_error()
    fam = FAMILIES[pvm]
    if random_init and pvm_id in PVM_ARCHS:
        arch = dict(PVM_ARCHS[pvm_id])
        model_cls, config_cls = pvm_classes(pvm, arch.pop("model_type", next(iter(fam.models))), pvm_id)
        config = config_cls(**arch)
    elif random_init and not Path(pvm_id).is_dir():
        raise UsageError(f"--pvm-random-init knows the architectures {sorted(PVM_ARCHS)}; for '{pvm_id}' pass "
                         "a local directory that holds its config.json")
    else:
        config = None
        model_cls, config_cls = pvm_classes(pvm, runtime.from_pretrained(model_type, pvm_id, fix=_LOAD_FIX), pvm_id)
    kw = dict(fam.model_kw)
    if random_init:
        # a vision config class reads the vision tower's part of a full CLIP/SigLIP config.json
        config = config if isinstance(config, config_cls) else config_cls.from_pretrained(pvm_id)
        model = model_cls(config, **kw)
    else:
        model = runtime.from_pretrained(lambda src, **k: model_cls.from_pretrained(src, **kw, **k), pvm_id,
                                        fix=_LOAD_FIX)
    if hasattr(model.config, "mask_ratio"):
        model.config.mask_ratio = 0.0  # ViT-MAE: keep every patch (its embeddings read this on every call)
    return model


def pvm_preprocessing(pvm: str, pvm_id: str, random_init: bool) -> dict:
    """The model's own preprocessing, read from its image-processor config (preprocessor_config.json, beside the
    weights on the Hub or in a local directory): resize side, centre-crop side (None = no crop), resampling and
    mean/std. Falls back to the family's default checkpoint's (FAMILIES) when there is none: a random-init
    architecture, or a directory without that file (which is then said)."""
    fam = FAMILIES[pvm]
    src = pvm_source(pvm, pvm_id)
    if random_init and not Path(src).is_dir():
        return dict(fam.preprocessing)
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        cfg = runtime.from_pretrained(lambda s, **k: ImageProcessingMixin.get_image_processor_dict(s, **k)[0],
                                      src, fix=_LOAD_FIX)
    except UsageError as e:
        if not random_init:
            print(f"note: no image-processor config for '{src}' ({e}); using {fam.default_id}'s preprocessing")
        return dict(fam.preprocessing)
    return preprocessing_from_config(cfg, fam.preprocessing)


def preprocessing_from_config(cfg: dict, default: dict) -> dict:
    """A Hugging Face image-processor config (dict) -> {resize, crop, resample, mean, std} for square frames.
    `size` is {shortest_edge} (DINOv2, CLIP), {height, width} (SigLIP) or an int (older ViT/CLIP configs):
    on a square frame each means the same square resize."""
    size, crop = cfg.get("size"), cfg.get("crop_size")
    side = lambda s: s if isinstance(s, int) or s is None else (s.get("shortest_edge") or s.get("height"))  # noqa: E731
    normalise = cfg.get("do_normalize", True)
    return dict(resize=side(size) or default["resize"],
                crop=side(crop) if cfg.get("do_center_crop") and crop is not None else None,
                resample={2: "bilinear", 3: "bicubic"}.get(cfg.get("resample"), default["resample"]),  # PIL codes
                mean=tuple(cfg.get("image_mean", default["mean"])) if normalise else (0.0, 0.0, 0.0),
                std=tuple(cfg.get("image_std", default["std"])) if normalise else (1.0, 1.0, 1.0))


class PVMEncoder(nn.Module):
    """A pre-trained ViT (any family of FAMILIES) as the world model's image encoder, in one of four modes:
      frozen:  no parameter of the ViT trains; it runs under no_grad in eval mode.
      partial: only the last k blocks train (as [PVM]: blocks 8-11 of 12; the final layernorm stays frozen
               unless finetune_norm); the prefix (embeddings + first L-k blocks) runs under no_grad, so no
               activation of it is kept for backward.
      full:    every ViT parameter the features depend on trains (not those loaded as fixed, as MAE's sin-cos
               position embeddings, nor parts the features never reach, as DINOv2's mask token).
      lora:    (beyond the paper) every pre-trained weight stays as loaded; low-rank adapters W + (alpha/r) B A
               (Hu et al. 2021, via Hugging Face `peft`) on the chosen linear layers of the last k blocks (or all
               blocks) train instead. B starts at 0, so at step 0 the encoder is exactly the pre-trained one.
    Optionally (partial/full) the L2-SP penalty (Li et al. 2018) pulls the fine-tuned weights back towards the
    pre-trained ones, which are kept as buffers (`anchor`) so that a resumed run has them exactly.
    Features ([PVM]'s rule, per family; `features` overrides): self-supervised models (DINOv2, MAE; and the
    supervised ViT) -> the final-norm patch tokens (no CLS, no registers); contrastive ones -> the pooled output
    (CLIP: the post-layernorm CLS token; SigLIP: its attention-pooling head). Both then pass a learned
    projection to E, the CNN's embedding width, and end in RMSNorm + SiLU, as [PVM]'s encoder output does.
    differs from paper, in the projection:
      patches: [PVM] flattens DINOv2-S's 256x384 tokens into a 98k-wide input of the posterior MLP; we project
               each token to `token_dim` first (256 x 16 = 4k), then linearly to E: every patch's position is
               kept (control needs *where*), at 4M instead of 100M parameters.
      pooled:  [PVM] normalises CLIP's 768-wide pooled output directly; we add a Linear(768 -> E) first, so that
               every encoder hands the RSSM an equally wide embedding and an ablation changes only the encoder
               (768 x E weights: 1.6M at the default E = 2048, trained with the world model).
    # ABLATION POINT: the features (patch tokens / pooled output) and their projection to E"""

    def __init__(self, backbone: nn.Module, pvm: str, mode: str, finetune_blocks: int, image_size: int,
                 out_dim: int, token_dim: int, finetune_norm: bool = False, lora: dict | None = None,
                 l2sp: float = 0.0, features: str = "auto", preprocessing: dict | None = None,
                 grad_checkpoint: str = "off"):
        super().__init__()
        self.backbone, self.pvm, self.mode, self.k, self.image_size = backbone, pvm, mode, finetune_blocks, image_size
        self.grad_checkpoint = grad_checkpoint  # off | on | nested (grad_checkpointing decides it)
        self.fam = fam = FAMILIES[pvm]
        cfg = backbone.config
        if image_size % cfg.patch_size:
            raise UsageError(f"--pvm-image-size {image_size} is not a multiple of the PVM's patch size "
                             f"{cfg.patch_size}; use e.g. {cfg.patch_size * (image_size // cfg.patch_size or 1)}")
        self.features_kind = fam.features if features == "auto" else features
        if self.features_kind == "pooled" and not fam.cls and not self.pool_head:
            raise UsageError(f"this {pvm} model has no CLS token and no pooling head: use --pvm-features patches")
        depth = len(self.blocks)
        self.lora = dict(LORA_DEFAULTS, **(lora or {}))
        if mode == "lora" and self.lora["blocks"] == "all":
            self.k = finetune_blocks = depth
        if mode in ("partial", "lora") and not 1 <= finetune_blocks <= depth:
            raise UsageError(f"--finetune-blocks {finetune_blocks} must be in 1..{depth} (the PVM's depth)")
        self.prep = dict(preprocessing or fam.preprocessing)
        self.register_buffer("mean", torch.tensor(self.prep["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.prep["std"]).view(1, 3, 1, 1), persistent=False)
        self.crop_ratio = (self.prep["crop"] or self.prep["resize"]) / self.prep["resize"]
        width = cfg.hidden_size
        # CLS (+ DINOv2's registers) precede the patches
        self.skip = int(fam.cls) + getattr(cfg, "num_register_tokens", 0)
        if self.features_kind == "patches":
            patches = (image_size // cfg.patch_size) ** 2
            self.proj = nn.Sequential(nn.Linear(width, token_dim), nn.Flatten(-2), nn.Linear(patches * token_dim, out_dim))
        else:
            self.proj = nn.Linear(width, out_dim)
        self.out = nn.Sequential(nn.RMSNorm(out_dim, eps=1e-4), nn.SiLU())
        self.out_dim = out_dim
        # ABLATION POINT: which ViT parameters train, the frozen / partial / full switch.
        # "Used": what the features depend on. A parameter that loads frozen (MAE's fixed sin-cos position
        # embeddings) stays frozen; one the features never reach (DINOv2's mask token, SigLIP's pooling head
        # under patch features) never trains, so no mode lists it as trainable.
        head = [self.final_norm, *([self.pool_head] if self.features_kind == "pooled" and self.pool_head else [])]
        used = [self.vit.embeddings, *([self.vit.get_submodule(fam.pre_norm)] if fam.pre_norm else []),
                self.blocks, *head]
        used_ids = {id(p) for m in used for n, p in m.named_parameters() if "mask_token" not in n}
        trainable = {id(p) for p in backbone.parameters() if p.requires_grad and id(p) in used_ids}
        for p in backbone.parameters():
            p.requires_grad_(mode == "full" and id(p) in trainable)
        if mode == "partial":
            for m in [*self.blocks[depth - finetune_blocks:], *(head if finetune_norm else [])]:
                for p in m.parameters():
                    p.requires_grad_(id(p) in trainable)
        self.lora_targets, self.lora_dropouts = [], []  # filled by _add_adapters
        if mode == "lora":
            self._add_adapters(self.blocks[depth - finetune_blocks:])
        self.backbone.eval()
        # L2-SP: a frozen copy of every parameter that trains, saved with the checkpoint.
        if l2sp and mode not in ("partial", "full"):
            raise UsageError(f"--l2sp applies to --mode partial or full (the weights that move), not --mode {mode}")
        self.l2sp, self.anchor = l2sp, nn.Module()
        self.l2sp_names = [n for n, p in backbone.named_parameters() if p.requires_grad] if l2sp else []
        params = dict(backbone.named_parameters())
        for n in self.l2sp_names:
            self.anchor.register_buffer(n.replace(".", "__"), params[n].detach().clone())

    def _add_adapters(self, blocks):
        """LoRA adapters on the `lora["targets"]` linear layers of `blocks`, injected into the backbone in place
        (module paths stay, so `blocks`, `final_norm` and the feature cache's prefix/suffix split are unchanged).
        The rule is by module path, so it holds for every HF ViT family: a Linear whose path names attention
        (`attention`, `attn`) is an attention projection; query/value are `query`/`value` or `q_proj`/`v_proj`."""
        from peft import LoraConfig, inject_adapter_in_model

        names = {id(b): n for n, b in self.backbone.named_modules()}
        targets = []
        for blk in blocks:
            for n, m in blk.named_modules():
                if not isinstance(m, nn.Linear):
                    continue
                leaf, attn = n.split(".")[-1], any(w in n for w in ("attention", "attn"))
                if {"qv": leaf in ("query", "value", "q_proj", "v_proj"), "attn": attn,
                        "attn-mlp": True}[self.lora["targets"]]:
                    targets.append(f"{names[id(blk)]}.{n}")
        if not targets:
            raise UsageError(f"--lora-targets {self.lora['targets']} matches no linear layer of this PVM's blocks; "
                             "try --lora-targets attn-mlp")
        cfg = LoraConfig(r=self.lora["rank"], lora_alpha=self.lora["alpha"], lora_dropout=self.lora["dropout"],
                         target_modules=targets, bias="none")
        inject_adapter_in_model(cfg, self.backbone)
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(".lora_" in n)  # only the adapters; every pre-trained weight (and bias) stays
        self.lora_targets = targets
        self.lora_dropouts = [m for n, m in self.backbone.named_modules() if ".lora_dropout." in n]

    def l2sp_penalty(self) -> torch.Tensor:
        """a/2 * sum ||theta - theta_0||^2 over the fine-tuned PVM parameters (0 without --l2sp)."""
        if not self.l2sp:
            return torch.zeros((), device=self.mean.device)
        params = dict(self.backbone.named_parameters())
        sq = sum((params[n] - getattr(self.anchor, n.replace(".", "__"))).pow(2).sum() for n in self.l2sp_names)
        return 0.5 * self.l2sp * sq

    # Named views of the family's parts (properties, so nothing is registered twice).
    @property
    def vit(self) -> nn.Module:
        return self.backbone.get_submodule(self.fam.root) if self.fam.root else self.backbone

    @property
    def blocks(self):
        return self.vit.get_submodule(self.fam.blocks)

    @property
    def final_norm(self):
        return self.vit.get_submodule(self.fam.final_norm)

    @property
    def pool_head(self):
        return getattr(self.vit, self.fam.pool_head, None) if self.fam.pool_head else None

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # dropout/drop-path stay off even while fine-tuning: the RL signal is noisy enough
        for m in self.lora_dropouts:  # ... except --lora-dropout, which is asked for by name
            m.train(mode)
        return self

    def preprocess(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 (N, h, w, 3) -> the PVM's normalised input (N, 3, R, R): resize (to R / crop_ratio, with the
        model's resampling), centre crop R, then the model's mean/std. Its image processor's maths, at side R."""
        x = obs.permute(0, 3, 1, 2).float() / 255.0
        resized = round(self.image_size / self.crop_ratio)
        x = F.interpolate(x, size=(resized, resized), mode=self.prep["resample"], align_corners=False, antialias=True)
        off = (resized - self.image_size) // 2
        x = x[:, :, off:off + self.image_size, off:off + self.image_size].clamp(0, 1)
        return (x - self.mean) / self.std

    def _model_kw(self, n: int, device) -> dict:
        """The keyword arguments the family's embeddings (and its model's forward) need at our image size."""
        cfg, kw = self.backbone.config, {}
        if "interpolate_pos_encoding" in self.fam.embed_kw:
            kw["interpolate_pos_encoding"] = self.image_size != cfg.image_size
        if "noise" in self.fam.embed_kw:  # MAE: ascending noise = identity shuffle, so no patch moves or drops
            patches = (self.image_size // cfg.patch_size) ** 2
            kw["noise"] = torch.arange(patches, device=device, dtype=torch.float32).expand(n, patches)
        return kw

    def _checkpointed(self, part: nn.Module, fn, *args):
        """fn(*args); with --grad-checkpoint, where `part` trains and a backward pass will follow, only args are kept
        for it and fn's inside is recomputed in the backward pass (same RNG state, so the same numbers)."""
        if (self.grad_checkpoint != "off" and torch.is_grad_enabled()
                and any(p.requires_grad for p in part.parameters())):  # checked last: it walks the parameters
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _run(self, x: torch.Tensor, blocks) -> torch.Tensor:
        blocks = list(blocks)
        if self.grad_checkpoint == "nested":  # groups of g blocks keep only their input; inside, each block does
            g = math.ceil(math.sqrt(len(blocks) or 1))
            for i in range(0, len(blocks), g):
                x = self._checkpointed(blocks[i], functools.partial(self._blocks, blocks=blocks[i:i + g]), x)
            return x
        return self._blocks(x, blocks)

    def _blocks(self, x: torch.Tensor, blocks) -> torch.Tensor:
        masks = (None,) * self.fam.block_masks
        for blk in blocks:
            out = self._checkpointed(blk, blk, x, *masks)  # a checkpointed block keeps only its input
            x = out[0] if isinstance(out, tuple) else out  # older transformers return (hidden, ...) tuples
        return x

    def _tokens(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 (N, h, w, 3) -> the first block's input (N, skip+P, W): preprocessing and the embeddings."""
        x = self.preprocess(obs)  # (N, 3, R, R)
        h = self.vit.embeddings(x, **self._model_kw(len(x), x.device))
        h = h[0] if isinstance(h, tuple) else h  # MAE: (tokens, mask, ids_restore)
        return self.vit.get_submodule(self.fam.pre_norm)(h) if self.fam.pre_norm else h

    @property
    def trained_blocks(self) -> int:
        return {"frozen": 0, "partial": self.k, "lora": self.k, "full": len(self.blocks)}[self.mode]

    def prefix(self, obs: torch.Tensor) -> torch.Tensor:
        """The part of the ViT that does not train, uint8 (N, h, w, 3) -> hidden tokens (N, skip+P, W) after the
        first L-k blocks (partial), or the final features (frozen, see `suffix`). Full mode has no frozen part:
        this is then just the (trained) embeddings."""
        depth, k = len(self.blocks), self.trained_blocks
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode == "full"):
            # full + --grad-checkpoint: the embeddings keep the uint8 frames, not the (N, 3, R, R) fp32 pixels
            h = self._checkpointed(self.vit.embeddings, self._tokens, obs)
            h = self._run(h, self.blocks[:depth - k])  # (N, skip+P, W)
            return self._head(h) if k == 0 else h

    def suffix(self, h: torch.Tensor) -> torch.Tensor:
        """The trained part: the last k blocks, then the final norm (and pooling); identity when frozen."""
        k = self.trained_blocks
        if k == 0:
            return h
        return self._head(self._run(h, self.blocks[len(self.blocks) - k:]))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(h)
        if self.features_kind == "patches":
            return h[:, self.skip:]  # (N, P, W)
        return self.pool_head(h) if self.pool_head is not None else h[:, 0]  # (N, W)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 (N, h, w, 3) -> patch tokens (N, P, W) or the pooled output (N, W)."""
        return self.suffix(self.prefix(obs))

    @torch.no_grad()
    def cls_attention(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 (N, h, w, 3) -> the last block's CLS -> patch attention per head (N, heads, g, g), on the input
        as the agent prepares it (probe.py's segmentation probe); for SigLIP, which has no CLS, its pooling
        head's query -> patch attention. sdpa never materialises the attention matrix, so the backbone runs with
        eager attention here and gets its own back after."""
        cfg, attn = self.backbone.config, self.backbone.config._attn_implementation
        x, g = self.preprocess(obs), self.image_size // cfg.patch_size
        if not self.fam.cls:
            if self.pool_head is None:
                raise UsageError(f"this {self.pvm} model has neither a CLS token nor a pooling head to probe")
            h = self.final_norm(self._run(self._tokens(obs), self.blocks))
            head = self.pool_head
            _, att = head.attention(head.probe.expand(len(x), -1, -1), h, h, need_weights=True,
                                    average_attn_weights=False)  # (N, heads, 1, P)
            return att[:, :, 0].reshape(len(obs), -1, g, g)
        self.backbone.set_attn_implementation("eager")
        try:
            att = self.backbone(pixel_values=x, output_attentions=True, **self._model_kw(len(x), x.device))
        finally:
            self.backbone.set_attn_implementation(attn)
        return att.attentions[-1][:, :, 0, self.skip:].reshape(len(obs), -1, g, g)  # (N, heads, g, g)

    def prefix_shape(self) -> tuple[int, ...]:
        """Per-frame shape of `prefix`'s output: what the feature cache stores."""
        cfg, width = self.backbone.config, self.backbone.config.hidden_size
        patches = (self.image_size // cfg.patch_size) ** 2
        if self.trained_blocks == 0:
            return (patches, width) if self.features_kind == "patches" else (width,)
        return (self.skip + patches, width)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:  # (N, P, W) | (N, W) -> (N, E)
        # .float(): under bf16 autocast the norm runs in fp32, as autocast runs LayerNorm (RMSNorm is on none of
        # its lists, and a bf16 input with fp32 weights takes its unfused path); a no-op in fp32
        return self.out(self.proj(feats).float())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        feats = self.features(obs.reshape(-1, *obs.shape[-3:]))
        return self.embed(feats).reshape(*obs.shape[:-3], self.out_dim)  # (..., E)

    def from_prefix(self, cached: torch.Tensor, lead: tuple) -> torch.Tensor:
        """Embeddings from cached prefix outputs (fp16, (*lead, ...)): the frozen part is not run again."""
        h = cached.reshape(-1, *cached.shape[len(lead):]).float()  # (N, ...) fp32 for the trained part
        return self.embed(self.suffix(h)).reshape(*lead, self.out_dim)  # (..., E)


def make_encoder(args: Args) -> nn.Module:
    depth = SIZES[args.size]["depth"]
    if args.pvm == "none":
        return CNNEncoder(args.image_size, depth)
    src = pvm_source(args.pvm, args.pvm_id)
    backbone = load_pvm(args.pvm, src, args.pvm_random_init)
    # E equals the CNN's output width at this size, so both encoders feed the posterior equally wide inputs.
    lora = {k: getattr(args, f"lora_{k}") for k in LORA_DEFAULTS}
    return PVMEncoder(backbone, args.pvm, args.mode, args.finetune_blocks, args.pvm_image_size,
                      cnn_embed_dim(args.image_size, depth), args.pvm_token_dim, args.finetune_norm, lora, args.l2sp,
                      args.pvm_features, pvm_preprocessing(args.pvm, args.pvm_id, args.pvm_random_init),
                      grad_checkpointing(args, runtime.resolve_device(args.device)))


def feature_cache_shape(encoder: nn.Module, args: Args) -> tuple | None:
    """Per-frame shape of the replay's feature cache (--feature-cache), or None for no cache.
    Why: a frozen prefix gives the same output for a frame every time, and each frame is replayed ~train_ratio
    (32) times, so running it once when the frame enters replay removes ~97% of the PVM's training FLOPs.
    Cost in fp16 (x1e6 for a million frames), vs 12 KB for a 64x64 uint8 frame:
      DINOv2-S @224: frozen 256x384 patch tokens = 197 KB (197 GB/M); partial 257x384 tokens = 197 KB (197 GB/M)
      CLIP B/32 @224: frozen 768 = 1.5 KB (1.5 GB/M);                partial 50x768 tokens = 77 KB (77 GB/M)
    so the cache is switched off (loudly) when --replay-size frames would exceed --feature-cache-gb."""
    if not (args.feature_cache and isinstance(encoder, PVMEncoder) and encoder.mode != "full"):
        return None
    shape = encoder.prefix_shape()
    need_gb = args.replay_size * 2 * int(np.prod(shape)) / 1e9
    if need_gb > args.feature_cache_gb:
        print(f"WARNING: FEATURE CACHE OFF: {args.replay_size} frames x {2 * int(np.prod(shape)) / 1e3:.1f} KB "
              f"({'x'.join(map(str, shape))} fp16) = {need_gb:.1f} GB > --feature-cache-gb {args.feature_cache_gb}; "
              "the frozen PVM part is recomputed for every replayed frame (raise the budget or lower --replay-size)")
        return None
    return tuple(shape)


# ---------------------------------------------------------------------------------------------------------
# World model: RSSM with categorical latents, image decoder, reward and continue heads ([D3] Sec. 2)
# ---------------------------------------------------------------------------------------------------------
class BlockLinear(nn.Module):
    """G independent linear maps on G slices: a block-diagonal weight. [D3]'s RSSM splits its GRU into 8
    blocks so a wide deterministic state costs G times fewer FLOPs and parameters than a dense GRU."""

    def __init__(self, groups: int, din: int, dout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(groups, din, dout) / din**0.5)
        self.bias = nn.Parameter(torch.zeros(groups, dout))

    def forward(self, x):  # (N, G, din) -> (N, G, dout)
        return torch.baddbmm(self.bias[:, None], x.transpose(0, 1), self.weight).transpose(0, 1)


class RSSM(nn.Module):
    """h_t = GRU(h_{t-1}, z_{t-1}, a_{t-1});  prior p(z_t | h_t);  posterior q(z_t | h_t, e_t).
    z_t is S one-hot categoricals of C classes, sampled with straight-through gradients and 1% unimix."""

    def __init__(self, embed_dim, action_dim, deter, hidden, stoch, classes, blocks, unimix, **_):
        super().__init__()
        assert deter % blocks == 0, (deter, blocks)
        self.deter, self.stoch, self.classes, self.blocks, self.unimix = deter, stoch, classes, blocks, unimix
        self.chunk = None  # observe's steps per scan() call: all T, or --compile-chunk under --compile
        self.in_deter = mlp(deter, hidden, 1)
        self.in_stoch = mlp(stoch * classes, hidden, 1)
        self.in_action = mlp(action_dim, hidden, 1)
        self.gru_hidden = BlockLinear(blocks, 3 * hidden + deter // blocks, deter // blocks)
        self.gru_norm = norm(deter // blocks)
        self.gru_gates = BlockLinear(blocks, deter // blocks, 3 * deter // blocks)
        self.prior_net = nn.Sequential(mlp(deter, hidden, 2), nn.Linear(hidden, stoch * classes))
        # The posterior's first layer, Linear([h_t, e_t]), split in two: the embedding's share does not depend on
        # the recurrence, so observe() computes it for all T steps in one matmul instead of T small ones.
        self.post_deter = nn.Linear(deter, hidden, bias=False)
        self.post_embed = nn.Linear(embed_dim, hidden, bias=False)
        self.post_net = nn.Sequential(norm(hidden), nn.SiLU(), nn.Linear(hidden, stoch * classes))

    def initial(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(n, self.deter, device=device), torch.zeros(n, self.stoch * self.classes, device=device)

    def core(self, deter, stoch, action):
        """Block GRU step, as `_core` in [D3]'s rssm.py. (N, D), (N, S*C), (N, A) -> (N, D)."""
        action = action / action.abs().clamp(min=1).detach()  # stop-grad: only rescales actions outside [-1, 1]
        x = torch.cat([self.in_deter(deter), self.in_stoch(stoch), self.in_action(action)], -1)  # (N, 3h)
        g = self.blocks
        deter_g = deter.unflatten(-1, (g, -1))  # (N, G, D/G)
        x = torch.cat([x.unsqueeze(1).expand(-1, g, -1), deter_g], -1)  # (N, G, 3h + D/G)
        x = F.silu(self.gru_norm(self.gru_hidden(x)))  # (N, G, D/G)
        reset, cand, update = self.gru_gates(x).chunk(3, -1)  # 3 x (N, G, D/G)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1)  # bias -1: start by mostly keeping the old state
        return (update * cand + (1 - update) * deter_g).flatten(1)  # (N, D)

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Log-probabilities with 1% uniform mixed in ([D3] 'unimix'): keeps KL and log-probs finite."""
        probs = raw.float().unflatten(-1, (self.stoch, self.classes)).softmax(-1)  # (..., S, C), fp32 always
        return torch.log((1 - self.unimix) * probs + self.unimix / self.classes)

    def sample(self, logits: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
        """One-hot sample (Gumbel-max) with straight-through gradients; (..., S, C) -> (..., S*C). uniform: the
        U[0, 1) noise to use, logits' shape (default: drawn from torch's stream; evaluation passes its own)."""
        uniform = torch.rand_like(logits) if uniform is None else uniform
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0)))
        onehot = F.one_hot((logits + gumbel).argmax(-1), self.classes).to(logits.dtype)
        probs = logits.exp()
        return (onehot + probs - probs.detach()).flatten(-2)  # stop-grad: straight-through estimator

    def prior(self, deter):  # (..., D) -> (..., S, C)
        return self.logits(self.prior_net(deter))

    def img_step(self, deter, stoch, action, uniform=None):
        """One imagined step: the prior's sample instead of the posterior's; uniform as in sample."""
        deter = self.core(deter, stoch, action)
        return deter, self.sample(self.prior(deter), uniform)

    def obs_step(self, deter, stoch, action, embed_in, is_first, uniform=None):
        """embed_in = post_embed(e_t), (N, hidden); uniform: the posterior sample's noise (see sample)."""
        keep = (~is_first).float().unsqueeze(-1)  # (N, 1): a new episode starts from the zero state
        deter = self.core(deter * keep, stoch * keep, action * keep)  # (N, D)
        logits = self.logits(self.post_net(self.post_deter(deter) + embed_in))  # (N, S, C)
        return deter, self.sample(logits, uniform), logits

    def observe(self, embed, action, is_first):
        """Filter a batch of sequences. embed (B, T, E), action (B, T, A) = prevact, is_first (B, T)."""
        (B, T), dev = embed.shape[:2], embed.device
        deter, stoch = self.initial(B, dev)
        embed_in = self.post_embed(embed)  # (B, T, hidden)
        # Every step's sampling noise in one draw: one op instead of T, and no RNG inside a compiled step
        uniform = torch.rand(T, B, self.stoch, self.classes, device=dev)
        k, out = self.chunk or T, []  # one chunk of all T steps, unless --compile set a chunk length
        for t in range(0, T, k):
            c = slice(t, t + k)
            out.append(self.scan(deter, stoch, action[:, c], embed_in[:, c], is_first[:, c], uniform[c]))
            deter, stoch = out[-1][0][:, -1], out[-1][1][:, -1]
        deter, stoch, post = (torch.cat(x, 1) for x in zip(*out))
        return deter, stoch, post  # (B, T, D), (B, T, S*C), (B, T, S, C)

    def scan(self, deter, stoch, action, embed_in, is_first, uniform):
        """obs_step over the K steps of a chunk: action (B, K, A), embed_in (B, K, hidden), is_first (B, K),
        uniform (K, B, S, C) -> deter (B, K, D), stoch (B, K, S*C), posterior log-probs (B, K, S, C)."""
        out = []
        for t in range(action.shape[1]):  # the prior is computed afterwards in one batch: it only needs h_t
            deter, stoch, logits = self.obs_step(deter, stoch, action[:, t], embed_in[:, t], is_first[:, t], uniform[t])
            out.append((deter, stoch, logits))
        return tuple(torch.stack(x, 1) for x in zip(*out))


def categorical_kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the S groups; log-probs (..., S, C) -> (...)."""
    return (lp.exp() * (lp - lq)).sum((-2, -1))


class Decoder(nn.Module):
    """Model features -> the frame, mirroring the CNN encoder with transposed convs. Kept for every encoder,
    as [PVM] keeps DreamerV3's reconstruction loss also with a PVM."""

    def __init__(self, feat_dim: int, image_size: int, depth: int):
        super().__init__()
        stages, self.res = conv_stages(image_size)
        chans = cnn_channels(depth, stages)[::-1]  # ..., 4d, 2d, d
        self.fc = nn.Linear(feat_dim, chans[0] * self.res**2)
        mods = []
        for cin, cout in zip(chans, chans[1:] + [3]):
            mods += [ChannelNorm(cin), nn.SiLU(), nn.ConvTranspose2d(cin, cout, 4, 2, 1)]
        self.net = nn.Sequential(*mods)
        self.to(memory_format=torch.channels_last)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:  # (..., F) -> (..., h, w, 3), target frame/255 - 0.5
        x = self.fc(feat.reshape(-1, feat.shape[-1])).unflatten(-1, (-1, self.res, self.res))
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.net(x).permute(0, 2, 3, 1)  # channels-last memory: the permute to (N, h, w, 3) is free
        return x.reshape(*feat.shape[:-1], *x.shape[1:])


class WorldModel(nn.Module):
    def __init__(self, encoder: nn.Module, action_dim: int, args: Args):
        super().__init__()
        s = SIZES[args.size]
        self.encoder = encoder
        self.rssm = RSSM(encoder.out_dim, action_dim, unimix=args.unimix, **s)
        feat = s["deter"] + s["stoch"] * s["classes"]
        self.decoder = Decoder(feat, args.image_size, s["depth"])
        self.reward = head(feat, s["units"], 1, len(BINS), outscale=0.0)
        self.cont = head(feat, s["units"], 1, 1, outscale=1.0)
        self.register_buffer("bins", BINS.clone(), persistent=False)
        self.free_nats = args.free_nats

    def loss(self, batch: dict) -> tuple[dict, tuple]:
        """Losses as a dict of (B, T) tensors, and the posterior states that start imagination."""
        image = batch["image"]  # (B, T, h, w, 3) uint8
        if "feat" in batch:  # the frozen PVM prefix's cached output (see Replay): only the trained part runs
            embed = self.encoder.from_prefix(batch["feat"], image.shape[:2])  # (B, T, E)
        else:
            embed = self.encoder(image)  # (B, T, E)
        deter, stoch, post = self.rssm.observe(embed, batch["action"], batch["is_first"])
        prior = self.rssm.prior(deter)  # (B, T, S, C)
        feat = torch.cat([deter, stoch], -1)  # (B, T, F)
        target = image.float() / 255.0 - 0.5  # (B, T, h, w, 3)
        losses = {
            # summed over pixels, as [D3]
            "rec": F.mse_loss(self.decoder(feat).float(), target, reduction="none").sum((-3, -2, -1)),
            "rew": twohot_loss(self.reward(feat), batch["reward"], self.bins),
            "con": F.binary_cross_entropy_with_logits(
                self.cont(feat).squeeze(-1).float(), 1.0 - batch["is_terminal"].float(), reduction="none"),
            # KL balancing with free bits ([D3] eq. 5): the prior moves toward the posterior (dyn) faster than
            # the posterior toward the prior (rep); below free_nats neither is pushed further.
            # ABLATION POINT: the KL balance (--dyn-scale / --rep-scale) and free bits (--free-nats)
            "dyn": categorical_kl(post.detach(), prior).clamp(min=self.free_nats),  # stop-grad: trains prior only
            "rep": categorical_kl(post, prior.detach()).clamp(min=self.free_nats),  # stop-grad: trains posterior
        }
        assert all(v.shape == image.shape[:2] for v in losses.values()), {k: v.shape for k, v in losses.items()}
        return losses, (deter, stoch)


# ---------------------------------------------------------------------------------------------------------
# Actor-critic, trained on imagined rollouts ([D3] Sec. 3)
# ---------------------------------------------------------------------------------------------------------
def actor_moments(out: torch.Tensor, minstd=0.1, maxstd=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[D3]'s 'bounded_normal': mean squashed into [-1, 1] by tanh, std kept in [minstd, maxstd]."""
    mean, std = out.float().chunk(2, -1)
    return torch.tanh(mean), (maxstd - minstd) * torch.sigmoid(std + 2.0) + minstd


def actor_dist(out: torch.Tensor) -> torch.distributions.Distribution:
    # validate_args=False: tanh and sigmoid make every (mean, std) valid, and the check would read the values,
    # i.e. wait for the GPU, every time a distribution is built
    normal = torch.distributions.Normal(*actor_moments(out), validate_args=False)
    return torch.distributions.Independent(normal, 1, validate_args=False)


class Dreamer(nn.Module):
    def __init__(self, encoder: nn.Module, action_dim: int, args: Args):
        super().__init__()
        s = SIZES[args.size]
        self.wm = WorldModel(encoder, action_dim, args)
        feat = s["deter"] + s["stoch"] * s["classes"]
        self.actor = head(feat, s["units"], 3, 2 * action_dim, outscale=0.01)
        self.critic = head(feat, s["units"], 3, len(BINS), outscale=0.0)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)  # EMA copy, regularises the critic
        self.retnorm = ReturnNorm()
        self.args, self.action_dim = args, action_dim
        if args.compile:  # wrappers around the eager steps: same maths, same weights (state_dict is unchanged)
            rssm = self.wm.rssm  # each step gets its noise from outside, so compiled code draws no random numbers
            # training's scan: one graph per chunk of steps, whose weights' gradients add up inside it
            rssm.chunk, rssm.scan = args.compile_chunk, torch.compile(rssm.scan, fullgraph=True, dynamic=False)
            rssm.img_step = torch.compile(rssm.img_step, fullgraph=True, dynamic=False)
            self.policy_step = torch.compile(self.policy_step, fullgraph=True, dynamic=False)
            # acting, once per env step: the encoder (a ViT's ~200 small kernels per frame), the posterior step and
            # the actor in one graph, and the feature cache's frozen prefix of each new frame in another
            self.act_step = torch.compile(self.act_step, fullgraph=True, dynamic=False)
            self.cache_prefix = torch.compile(self.cache_prefix, fullgraph=True, dynamic=False)

    def imagine(self, deter, stoch, backprop: bool):
        """Roll the prior forward H steps from N start states with the current policy.
        The actor always runs with grad, so its outputs serve the policy loss without a second forward pass.
        backprop=False: the dynamics run without a graph, actions are plain samples (REINFORCE needs only
        their log-probs). backprop=True: reparameterised samples, so d(return)/d(action) flows back through
        the dynamics."""
        feats, raw_actions, actor_outs = [torch.cat([deter, stoch], -1)], [], []
        rssm, H, N = self.wm.rssm, self.args.imag_horizon, len(deter)
        # Every step's noise in one draw each (as observe): the actions' and the prior samples'
        normal = torch.randn(H, N, self.action_dim, device=deter.device)
        uniform = torch.rand(H, N, rssm.stoch, rssm.classes, device=deter.device)
        for t in range(H):
            out, raw = self.policy_step(feats[-1], normal[t], backprop)  # (N, 2A), (N, A)
            with torch.set_grad_enabled(backprop):
                deter, stoch = rssm.img_step(deter, stoch, raw.clamp(-1, 1), uniform[t])
            feats.append(torch.cat([deter, stoch], -1))
            raw_actions.append(raw)
            actor_outs.append(out)
        return torch.stack(feats), torch.stack(raw_actions), torch.stack(actor_outs)  # (H+1,N,F), (H,N,A), (H,N,2A)

    def policy_step(self, feat, normal, backprop: bool):
        """The actor's output on imagined features (N, F) and its action: actor_dist(out).rsample() with the
        given N(0, 1) noise (N, A), written out so that --compile can trace it. backprop=False: a plain sample
        (the same values, no gradient to the actor through it)."""
        out = self.actor(feat)
        mean, std = actor_moments(out)
        raw = mean + normal * std  # Normal.rsample
        return out, (raw if backprop else raw.detach())

    def act_step(self, x, deter, stoch, prev_action, is_first, uniform, cached: bool):
        """Acting's maths for N envs: frames (N, h, w, 3) uint8, or their cached prefix outputs (cached=True), and
        the carried state -> the filtered state and the actor's output (N, 2A). `act` wraps it."""
        wm = self.wm
        embed = wm.encoder.from_prefix(x, (len(x),)) if cached else wm.encoder(x)  # (N, E)
        deter, stoch, _ = wm.rssm.obs_step(deter, stoch, prev_action, wm.rssm.post_embed(embed), is_first, uniform)
        return deter, stoch, self.actor(torch.cat([deter, stoch], -1))

    def cache_prefix(self, frames):
        """The feature cache's entries of new frames (M, h, w, 3): the encoder's frozen part (see add_frames)."""
        return self.wm.encoder.prefix(frames)

    def ac_loss(self, deter, stoch) -> tuple[dict, dict]:
        """Actor and critic losses on one imagined batch ([D3] Sec. 3). Returns scalar losses and metrics.
        --actor-grad reinforce ([D3] latest, `ac_grads: False`): policy gradient on normalised advantages.
        --actor-grad dynamics ([D3] v1 for continuous actions): maximise the normalised lambda-return by
        backpropagating through the learned dynamics, reward, continue and critic. The world model is NOT
        updated by this loss: backward() below only accumulates into the actor's parameters.
        # ABLATION POINT: the actor's gradient estimator"""
        a, bins = self.args, self.wm.bins
        backprop = a.actor_grad == "dynamics"
        feats, raw, actor_out = self.imagine(deter, stoch, backprop)
        # One critic pass serves both losses: its values enter the returns (and, with backprop, the policy
        # gradient), its logits the value loss. train_step's backward(inputs=...) keeps each loss to its net.
        critic_logits = self.critic(feats)  # (H+1, N, K)
        with torch.set_grad_enabled(backprop):
            reward = twohot_mean(self.wm.reward(feats[1:]), bins)  # (H, N)
            cont = torch.sigmoid(self.wm.cont(feats).squeeze(-1).float())  # (H+1, N), the start state's included
            disc = (1 - 1 / a.horizon) * cont[1:]  # (H, N)
            value = twohot_mean(critic_logits if backprop else critic_logits.detach(), bins)  # (H+1, N)
            ret = lambda_return(reward, disc, value, a.lam)  # (H, N)
        with torch.no_grad():
            weight = imagination_weight(cont, 1 - 1 / a.horizon)  # (H, N); a terminal start weighs ~0
            scale = self.retnorm.update(ret)
            slow = twohot_mean(self.slow_critic(feats[:-1]), bins)  # (H, N)
        dist = actor_dist(actor_out)
        ent = dist.entropy()  # (H, N)
        if backprop:
            policy = -(ret / scale + a.actor_entropy * ent)  # pathwise gradient of the normalised return
        else:
            adv = ((ret - value[:-1]) / scale).detach()  # stop-grad: REINFORCE treats advantages as constants
            policy = -(dist.log_prob(raw) * adv + a.actor_entropy * ent)  # [D3] eq. 11
        logits = critic_logits[:-1]
        target = ret.detach()  # stop-grad: regress onto fixed lambda-returns
        value_loss = twohot_loss(logits, target, bins) + twohot_loss(logits, slow, bins)  # slowreg weight 1
        metrics = dict(ret=ret.mean(), adv_scale=scale, entropy=ent.mean(), imag_reward=reward.mean())
        return dict(policy=(weight * policy).mean(), value=(weight * value_loss).mean()), metrics


# ---------------------------------------------------------------------------------------------------------
# Optimisers and one training step
# ---------------------------------------------------------------------------------------------------------
def make_optimizers(agent: Dreamer, args: Args) -> dict:
    """Adam per module, over parameters that require grad only (nanoGPT's configure_optimizers). The PVM's
    trainable parameters get their own group at wm_lr * encoder_lr_scale ([PVM]).
    differs from paper: [D3] v1 Adam settings (eps 1e-8 / 1e-5) instead of the latest LaProp + AGC."""
    enc = agent.wm.encoder
    pvm_params = [p for p in enc.backbone.parameters() if p.requires_grad] if isinstance(enc, PVMEncoder) else []
    pvm_ids = {id(p) for p in pvm_params}
    wm_params = [p for p in agent.wm.parameters() if p.requires_grad and id(p) not in pvm_ids]
    groups = [dict(params=wm_params, lr=args.wm_lr)]
    if pvm_params:
        groups.append(dict(params=pvm_params, lr=args.wm_lr * args.encoder_lr_scale))
    # fused: one kernel per step over all parameters, on CUDA and on a CPU (foreach: a few per parameter on a
    # CPU, where it falls back to a loop over the tensors). A resumed run keeps the setting its checkpoint saved.
    adam = dict(fused=True)
    return dict(
        wm=torch.optim.Adam(groups, eps=1e-8, **adam),
        actor=torch.optim.Adam(agent.actor.parameters(), lr=args.actor_lr, eps=1e-5, **adam),
        critic=torch.optim.Adam(agent.critic.parameters(), lr=args.critic_lr, eps=1e-5, **adam),
    )


def encoder_summary(agent: Dreamer, args: Args) -> str:
    enc = agent.wm.encoder
    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    trainable = count(p for p in enc.parameters() if p.requires_grad)
    frozen = count(p for p in enc.parameters() if not p.requires_grad)
    name = "cnn (from scratch)" if args.pvm == "none" else (
        f"{args.pvm} '{pvm_source(args.pvm, args.pvm_id)}' mode={args.mode}"
        + (f" (last {args.finetune_blocks} of {len(enc.blocks)} blocks{' + final norm' * args.finetune_norm})"
           if args.mode == "partial" else "")
        + (f" (rank {args.lora_rank} on {len(enc.lora_targets)} {args.lora_targets} layers of "
           f"{'all' if args.lora_blocks == 'all' else f'the last {enc.k} of'} {len(enc.blocks)} blocks)"
           if args.mode == "lora" else "")
        + (f" + L2-SP {args.l2sp:g}" if args.l2sp else ""))
    return (f"encoder: {name}: {trainable / 1e6:.2f}M trainable / {frozen / 1e6:.2f}M frozen params; "
            f"whole agent {count(agent.parameters()) / 1e6:.2f}M")


def wm_loss_scales(args: Args) -> dict:
    """Weights of the world-model losses ([D3] `loss_scales`): reconstruction, reward, continue, KL terms.
    # ABLATION POINT: the loss scales (e.g. rec=0 drops reconstruction, as a PVM might allow)"""
    return dict(rec=1.0, rew=1.0, con=1.0, dyn=args.dyn_scale, rep=args.rep_scale)


def autocast(agent: Dreamer):
    """--precision bf16: bfloat16 autocast around the forward maths (the backward follows the forward's dtypes);
    off (a no-op) in fp32. Heads' outputs are cast back to fp32 where losses and distributions are formed."""
    device = agent.wm.bins.device
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(agent.args, device))


def train_step(agent: Dreamer, opt: dict, batch: dict) -> dict:
    """One world-model update on a replayed batch, then one actor-critic update in imagination."""
    with autocast(agent):
        wm_losses, (deter, stoch) = agent.wm.loss(batch)
    scales = wm_loss_scales(agent.args)
    assert set(wm_losses) == set(scales), (wm_losses.keys(), scales.keys())
    wm_loss = sum(scales[k] * v.mean() for k, v in wm_losses.items())
    if getattr(agent.wm.encoder, "l2sp", 0.0):  # --l2sp: pull the fine-tuned PVM towards its pre-training
        wm_losses["l2sp"] = agent.wm.encoder.l2sp_penalty()
        wm_loss = wm_loss + wm_losses["l2sp"]
    opt["wm"].zero_grad(set_to_none=True)
    wm_loss.backward()
    wm_norm = nn.utils.clip_grad_norm_([p for g in opt["wm"].param_groups for p in g["params"]], 1000.0, foreach=True)
    opt["wm"].step()

    # Imagination starts from every posterior state of the batch, detached from the world model.
    start = (deter.detach().flatten(0, 1), stoch.detach().flatten(0, 1))  # stop-grad: (N, D), (N, S*C)
    with autocast(agent):
        ac_losses, ac_metrics = agent.ac_loss(*start)
    opt["actor"].zero_grad(set_to_none=True)
    opt["critic"].zero_grad(set_to_none=True)
    # inputs=: each loss updates only its own network. With --actor-grad dynamics the policy loss reaches the
    # world model and the critic through the imagined states and the bootstrap values; those must not learn
    # from it (a critic trained to raise its own predictions inflates every return).
    ac_losses["policy"].backward(inputs=list(agent.actor.parameters()), retain_graph=True)  # shares the critic pass
    ac_losses["value"].backward(inputs=list(agent.critic.parameters()))
    actor_norm = nn.utils.clip_grad_norm_(agent.actor.parameters(), 100.0, foreach=True)
    critic_norm = nn.utils.clip_grad_norm_(agent.critic.parameters(), 100.0, foreach=True)
    opt["actor"].step()
    opt["critic"].step()
    with torch.no_grad():  # slow critic: EMA of the critic, rate 0.02 every update ([D3] `slowvalue`)
        torch._foreach_lerp_(list(agent.slow_critic.parameters()), list(agent.critic.parameters()),
                             agent.args.slow_critic_rate)

    metrics = {f"wm/loss_{k}": v.mean() for k, v in wm_losses.items()}
    metrics.update({"wm/loss": wm_loss, "wm/grad_norm": wm_norm, "ac/actor_grad_norm": actor_norm,
                    "ac/critic_grad_norm": critic_norm, "ac/loss_policy": ac_losses["policy"],
                    "ac/loss_value": ac_losses["value"]})
    metrics.update({f"ac/{k}": v for k, v in ac_metrics.items()})
    values = torch.stack([torch.as_tensor(v).detach().float() for v in metrics.values()]).tolist()  # one sync
    return dict(zip(metrics, values))


# ---------------------------------------------------------------------------------------------------------
# Acting: the env side of the loop, and the one evaluation that every reported return comes from
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def act(agent: Dreamer, obs: np.ndarray, state, is_first, explore: bool, prefix=None, uniform=None):
    """Filter a batch of frames (N, h, w, 3), one per env, into the latent states and pick actions (N, A).
    state = (deter, stoch, prevact), each (N, ...); is_first (N,). prefix: the frames' frozen-PVM-prefix outputs,
    already computed for the feature cache (see add_frames): the encoder's frozen part runs once per frame.
    uniform: the latent samples' noise, (N, S, C) (evaluation's per-episode streams; default: torch's)."""
    device, rssm = agent.wm.bins.device, agent.wm.rssm
    deter, stoch, prev_action = state
    first = torch.as_tensor(np.asarray(is_first, bool), device=device)
    uniform = (torch.rand(len(first), rssm.stoch, rssm.classes, device=device) if uniform is None
               else uniform.to(device))  # drawn outside act_step, so a compiled one draws no random numbers
    x = prefix if prefix is not None else torch.as_tensor(obs, device=device)
    with autocast(agent):
        deter, stoch, out = agent.act_step(x, deter, stoch, prev_action, first, uniform, prefix is not None)
    dist = actor_dist(out)
    action = (dist.sample() if explore else dist.mean).clamp(-1, 1)  # (N, A)
    return action.cpu().numpy(), (deter.float(), stoch.float(), action)


@torch.no_grad()
def add_frames(replay: Replay, agent: Dreamer, obs, action, reward, is_first, is_terminal, streams):
    """replay.add for a batch of frames (M, h, w, 3), frame j into stream streams[j], plus their feature-cache
    entries (one prefix call for all M) when the replay has a cache. Returns those entries (fp32, (M, ...)) or
    None: the frozen prefix never changes, so acting on these frames next reuses them (in fp32; only the
    replay's copy is rounded to fp16)."""
    prefix = None
    if "feat" in replay.data:
        with autocast(agent):
            prefix = agent.cache_prefix(torch.as_tensor(obs, device=agent.wm.bins.device)).float()  # (M, ...)
        feats = prefix.half().cpu().numpy()
    for j, stream in enumerate(streams):
        replay.add(obs[j], action[j], reward[j], is_first[j], is_terminal[j],
                   None if prefix is None else feats[j], stream=stream)
    return prefix


def initial_state(agent: Dreamer, n: int = 1):
    device = agent.wm.bins.device
    deter, stoch = agent.wm.rssm.initial(n, device)
    return deter, stoch, torch.zeros(n, agent.action_dim, device=device)


class Collector:
    """The loop's env side: steps N envs (envs.ParallelEnvs; a single env is taken as N = 1) with the exploring
    policy (or uniform-random actions), acting on all N frames at once, puts every frame into its env's replay
    stream and carries each env's recurrent state. An ended episode is reset lazily, at the next step: a
    checkpoint taken at an episode's end then holds the env's RNG from before that reset, so a run resumed from
    it continues exactly as the uninterrupted run would have."""

    def __init__(self, agent: Dreamer, env, replay: Replay, seed: int | None = None):
        """The first step starts every env's first episode, env i from reset(seed + i) (None: its generator)."""
        self.envs = env if isinstance(env, envs.ParallelEnvs) else envs.ParallelEnvs(env)
        self.first_seed = seed
        self.agent, self.replay, n = agent, replay, self.envs.num
        assert replay.streams == n, f"a replay of {replay.streams} streams for {n} envs"
        self.obs = np.zeros((n, *self.envs.observation_space.shape), np.uint8)
        self.done, self.is_first = np.ones(n, bool), np.ones(n, bool)
        self.ep_return, self.ep_len = np.zeros(n), np.zeros(n, np.int64)
        self.state, self.prefix = initial_state(agent, n), None

    def reset(self, seed: int | None = None, index=None):
        """Start a new episode in the envs of `index` (default: all), env i with seed + i (None: from its own
        generator). Row 0 of an episode: no action led to it (prevact 0), no reward, is_first."""
        index = np.arange(self.envs.num) if index is None else np.asarray(index)
        m, a = len(index), self.agent.action_dim
        frames = self.envs.reset(list(index), [None if seed is None else seed + int(i) for i in index])
        prefix = add_frames(self.replay, self.agent, frames, np.zeros((m, a)), np.zeros(m), np.ones(m, bool),
                            np.zeros(m, bool), index)
        self.obs[index] = frames
        if prefix is not None:
            if self.prefix is None:
                self.prefix = prefix.new_zeros((self.envs.num, *prefix.shape[1:]))
            self.prefix[index] = prefix
        for part, fresh in zip(self.state, initial_state(self.agent, m)):
            part[index] = fresh
        self.is_first[index], self.done[index], self.ep_return[index], self.ep_len[index] = True, False, 0.0, 0
        self.first_seed = None  # later episodes start from the envs' own generators

    def step(self, random_action: bool) -> list[tuple[int, float, int]]:
        """One agent step in every env -> the episodes it ended, as (env index, return, length)."""
        if self.done.any():
            self.reset(self.first_seed, index=np.flatnonzero(self.done))
        if random_action:
            action = self.envs.sample_actions()
        else:
            action, self.state = act(self.agent, self.obs, self.state, self.is_first, explore=True, prefix=self.prefix)
        obs, reward, terminated, truncated = self.envs.step(action)
        n = self.envs.num
        self.prefix = add_frames(self.replay, self.agent, obs, action, reward, np.zeros(n, bool), terminated, range(n))
        self.obs[:] = obs
        self.is_first[:], self.ep_return, self.ep_len = False, self.ep_return + reward, self.ep_len + 1
        self.done = terminated | truncated
        return [(int(i), float(self.ep_return[i]), int(self.ep_len[i])) for i in np.flatnonzero(self.done)]


EVAL_SEED = 20_000  # evaluation episode i starts from reset(seed=EVAL_SEED + i): not a training seed, the same
# starts for every agent, every checkpoint and every shift (evaluate.py uses this function and this constant).


def evaluate(agent: Dreamer | None, env, episodes: int, video_path: str = "", stop=None,
             on_episode=None) -> np.ndarray | None:
    """Returns of `episodes` evaluation episodes (see evaluate_episodes), or None if stop() ended them."""
    out = evaluate_episodes(agent, env, episodes, video_path, stop, on_episode)
    return None if out is None else out["returns"]


def evaluate_episodes(agent: Dreamer | None, env, episodes: int, video_path: str = "", stop=None,
                      on_episode=None, zero_action: bool = False) -> dict | None:
    """`episodes` episodes with the policy's mean action (agent=None: uniform random actions, the baseline of the
    drop metric; with zero_action, the all-zero action instead) -> {returns: (episodes,)}, plus, on tasks that
    have them (envs.goal_distances: reacher, pusher), final_dist (the distance left at the episode's end) and
    blind_dist (the blind bound of that start, measured at reset).
    env: one env, or envs.ParallelEnvs of M envs: M episodes then run at once, with one batched act per step; an
    env with no episode left to run is parked (reset unseeded, stepped with zero actions, ignored) until the
    others end. Episode i is reset with EVAL_SEED + i and draws its latent samples and random actions from its
    own generators, seeded with EVAL_SEED + i: a result depends neither on when it was measured nor on how many
    envs ran it, and a training run's streams are untouched. reset(seed=...) reseeds an env's own generator, so
    pass envs that are not collecting training data. stop(): checked every step; when it says True the
    evaluation is abandoned and None returned (a training run that is being stopped). on_episode(i): called as
    episode i starts (a progress display)."""
    penv = env if isinstance(env, envs.ParallelEnvs) else envs.ParallelEnvs(env)
    m, space = penv.num, penv.action_space
    returns, final, blind = np.zeros(episodes), np.full(episodes, np.nan), np.full(episodes, np.nan)
    slot = [None] * m  # slot[j]: the episode env j runs (None: parked)
    noise = [None] * m  # slot j's episode's generators: torch's (latent samples), the action space's (random policy)
    todo, frames = iter(range(episodes)), []
    obs = np.zeros((m, *penv.observation_space.shape), np.uint8)
    is_first = np.ones(m, bool)
    state = initial_state(agent, m) if agent is not None else None
    if agent is not None:
        shape = (agent.wm.rssm.stoch, agent.wm.rssm.classes)

    def start(index):  # the next episodes into the envs in `index`; an env with none left is parked
        for j in index:
            slot[j] = next(todo, None)
        if all(ep is None for ep in slot):
            return  # the evaluation is over: no env is stepped again, so none is reset
        obs[index] = penv.reset(index, [None if slot[j] is None else EVAL_SEED + slot[j] for j in index])
        is_first[index] = True
        for j, dist in zip(index, penv.goal_distances(index)):
            ep = slot[j]
            if ep is None:
                continue
            if on_episode is not None:
                on_episode(ep)
            acts = copy.deepcopy(space)
            acts.seed(EVAL_SEED + ep)
            noise[j] = (torch.Generator().manual_seed(EVAL_SEED + ep), acts)
            if dist is not None:
                blind[ep] = dist["blind"]

    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(EVAL_SEED)  # nothing should draw from it; if something does, it is deterministic
        start(list(range(m)))
        while any(ep is not None for ep in slot):
            if stop is not None and stop():
                return None
            if video_path and slot[0] == 0:  # episode 0 always runs on env 0
                frames.append(obs[0].copy())
            running = [j for j in range(m) if slot[j] is not None]
            actions = np.zeros((m, *space.shape), np.float32)
            if agent is not None:
                uniform = torch.stack([torch.rand(shape, generator=noise[j][0]) if slot[j] is not None
                                       else torch.full(shape, 0.5) for j in range(m)])  # (M, S, C)
                actions, state = act(agent, obs, state, is_first, explore=False, uniform=uniform)
            elif not zero_action:
                for j in running:
                    actions[j] = noise[j][1].sample()
            obs[:], reward, terminated, truncated = penv.step(actions)
            is_first[:] = False
            for j in running:
                returns[slot[j]] += float(reward[j])
            ended = [j for j in range(m) if terminated[j] or truncated[j]]
            if ended:
                for j, dist in zip(ended, penv.goal_distances(ended)):
                    if slot[j] is not None and dist is not None:
                        final[slot[j]] = dist["dist"]
                start(ended)
    if frames:
        import imageio

        Path(video_path).parent.mkdir(parents=True, exist_ok=True)
        imageio.mimsave(video_path, frames, fps=20, macro_block_size=1)
    out = dict(returns=returns)
    if not np.isnan(blind).all():  # a task with a goal (with none, every entry stays NaN)
        out.update(final_dist=final, blind_dist=blind)
    return out


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: what a resumed run needs (the file format, atomic writes and lookup live in runtime.py)
# ---------------------------------------------------------------------------------------------------------
# Flags a resumed run may change: how long it trains, how often it logs, evaluates and checkpoints, where its
# files go, which device runs it (at which --precision, compiled, checkpointed), and the feature cache (the
# same maths up to fp16 rounding). Every other flag defines the experiment (networks, optimisers, data,
# objective): a checkpoint continues only with its values.
RESUME_MAY_CHANGE = ("total_steps", "log_every", "eval_every", "eval_episodes", "capture_video", "checkpoint_every",
                     "keep_checkpoints", "checkpoint_replay", "device", "precision", "compile", "grad_checkpoint",
                     "torch_deterministic", "feature_cache", "feature_cache_gb", "logdir", "run_name", "resume",
                     "track", "wandb_project_name", "wandb_entity")


def checkpoint_state(agent: Dreamer, opt: dict, replay: Replay, env: envs.ParallelEnvs, progress: runtime.Progress,
                     args: Args) -> dict:
    """Everything a resumed run needs. The return normaliser and the slow critic are buffers/modules of the
    agent, so agent.state_dict() holds them; the envs' generators (one per env) give the next resets' starts."""
    return dict(args=asdict(args), **asdict(progress), agent=agent.state_dict(),
                opt={k: o.state_dict() for k, o in opt.items()}, rng=dict(runtime.rng_states(), env=env.rng_states()),
                replay=replay.state_dict() if args.checkpoint_replay else None)


def flag(name: str, value) -> str:
    """How a flag and its value are written on the command line (tyro's booleans are --x / --no-x)."""
    name = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {shlex.quote(str(value))}"


def load_checkpoint(path: Path, args: Args, fix_corrupt: bool = False) -> dict:
    """The state of --resume PATH (a file, or a run directory's newest intact checkpoint), if it was trained
    with the same flags as `args` (up to RESUME_MAY_CHANGE); otherwise one line naming the flags to rerun with."""
    ckpt, state = runtime.find_checkpoint(path, fix_corrupt)
    # A flag the writing version did not have meant its default then; and before --finetune-norm existed, a
    # partial run trained the final norm, so it continues only with it.
    saved = {**asdict(Args()), "finetune_norm": state["args"].get("pvm") != "none" and state["args"].get("mode") == "partial",
             **state["args"]}
    diff = {k: saved[k] for k in asdict(args) if k not in RESUME_MAY_CHANGE and saved.get(k) != getattr(args, k)}
    if diff:
        raise UsageError(f"checkpoint {ckpt} was trained with other settings; rerun with "
                         + " ".join(flag(k, v) for k, v in diff.items()))
    return state


def restore(state: dict, agent: Dreamer, opt: dict, replay: Replay, env: envs.ParallelEnvs, device) -> runtime.Progress:
    agent.load_state_dict(state["agent"])
    for k, o in opt.items():
        o.load_state_dict(state["opt"][k])
    if state["replay"] is not None and not replay.load_state_dict(state["replay"]):
        replay.fill_cache(agent.wm.encoder, device)  # saved without --feature-cache: compute it once
    rng = state["rng"]
    runtime.set_rng_states(rng)
    if isinstance(rng["env"], dict):  # written before parallel envs: one env's generators
        if "np_random" not in rng["env"]:  # ...and before envs.rng_state existed
            rng["env"] = dict(np_random=rng["env"], action_space=rng["action_space"])
        rng["env"] = [rng["env"]]
    env.set_rng_states(rng["env"])
    return runtime.Progress.from_state(state)


# ---------------------------------------------------------------------------------------------------------
# Starting a run: every check before anything is built, everything built before anything is written
# ---------------------------------------------------------------------------------------------------------
# Allowed values of the numeric flags, (lowest, highest) with None for no bound; floats must also be finite.
RANGES = dict(
    seed=(0, 2**32 - 1), total_steps=(1, None), learning_starts=(0, None), train_ratio=(0, None),
    batch_size=(1, None), batch_length=(1, None), replay_size=(1, None), checkpoint_every=(1, None),
    keep_checkpoints=(1, None), eval_every=(0, None), eval_episodes=(0, None), log_every=(1, None),
    action_repeat=(1, None), num_envs=(1, 256), imag_horizon=(1, None), finetune_blocks=(0, None),
    pvm_token_dim=(1, 1024), pvm_image_size=(1, 1024), encoder_lr_scale=(0, None), feature_cache_gb=(0, None), wm_lr=(0, None),
    actor_lr=(0, None), critic_lr=(0, None), horizon=(1, None), lam=(0, 1), actor_entropy=(0, None),
    slow_critic_rate=(0, 1), free_nats=(0, None), dyn_scale=(0, None), rep_scale=(0, None), unimix=(0, 1),
    lora_rank=(1, 4096), lora_alpha=(0, None), lora_dropout=(0, 0.99), l2sp=(0, None),
)


def check_args(args: Args):
    """Every check that needs no model, env or checkpoint, run before anything is built or written."""
    for name, choices in (("env", envs.ENV_NAMES), ("pvm", PVMS), ("mode", MODES), ("size", tuple(SIZES)),
                          ("actor_grad", ("reinforce", "dynamics")), ("lora_targets", get_args(LoraTargets)),
                          ("lora_blocks", get_args(LoraBlocks))):
        if getattr(args, name) not in choices:  # tyro checks Literals on the command line; Args(...) needs this
            raise UsageError(f"unknown --{name.replace('_', '-')} {getattr(args, name)!r}; choose one of: "
                             f"{', '.join(choices)}")
    for name, (lo, hi) in RANGES.items():
        v, opt = getattr(args, name), f"--{name.replace('_', '-')}"
        if isinstance(v, float) and not np.isfinite(v):
            raise UsageError(f"{opt} {v} must be a finite number")
        if hi is None and v < lo:
            raise UsageError(f"{opt} {v} must be {'at least 1' if lo == 1 else '0 or more'}")
        if hi is not None and not lo <= v <= hi:
            raise UsageError(f"{opt} {v} must be in {lo}..{hi}")
    if args.l2sp and not (args.pvm != "none" and args.mode in ("partial", "full")):
        raise UsageError(f"--l2sp applies to a PVM with --mode partial or full (the weights that move), not "
                         f"{'the CNN' if args.pvm == 'none' else f'--mode {args.mode}'}; drop --l2sp")
    if args.replay_size // args.num_envs < args.batch_length:
        raise UsageError(f"--replay-size {args.replay_size} holds no window of --batch-length {args.batch_length}"
                         + (f" per env (each of --num-envs {args.num_envs} gets 1/{args.num_envs} of it)"
                            if args.num_envs > 1 else ""))
    lo, hi = envs.IMAGE_SIZE_RANGE
    if not lo <= args.image_size <= hi:
        raise UsageError(f"--image-size {args.image_size} is outside what the renderers draw; use {lo}..{hi}")
    conv_stages(args.image_size)  # the CNN encoder/decoder's constraint
    frames_gb, memory_gb = args.replay_size * 3 * args.image_size**2 / 1e9, runtime.physical_memory() / 1e9
    if frames_gb > memory_gb:
        raise UsageError(f"--replay-size {args.replay_size} needs {frames_gb:.0f} GB for its frames, more than this "
                         f"machine's {memory_gb:.0f} GB of memory; lower --replay-size")
    gl = os.environ.get("MUJOCO_GL", "egl")
    if args.env in envs.MUJOCO_TASKS and gl not in envs.GL_BACKENDS:
        raise UsageError(f"MUJOCO_GL={gl} is not a rendering backend: use MUJOCO_GL=egl (GPU, or mesa on a CPU) "
                         "or MUJOCO_GL=osmesa; `bash setup.sh` installs both")
    if not args.resume:
        runtime.check_writable(Path(args.logdir), "--logdir")


def open_run(args: Args) -> tuple[Path, dict | None]:
    """The run directory and, with --resume, the checkpoint to continue from. Writes nothing (but renames
    corrupt checkpoints to *.corrupt). A new run may not reuse a directory that holds a run: that is either a
    finished run or one to continue with --resume, and mixing two runs' logs would corrupt both."""
    if args.resume:
        state = load_checkpoint(Path(args.resume), args, fix_corrupt=True)
        return runtime.run_dir_of(Path(args.resume)), state
    name = args.run_name or f"{args.env}__{encoder_label(args.pvm, args.mode)}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.logdir) / name
    if runtime.holds_run_data(run_dir):
        raise UsageError(f"{run_dir} already holds a run: continue it with --resume {run_dir} or pick another "
                         "--run-name")
    return run_dir, None


def make_run_env(args: Args):
    """One env of the run's task (evaluation's, and the training env when --num-envs is 1)."""
    return _env_or_usage_error(args, lambda: envs.make_env(args.env, image_size=args.image_size, seed=args.seed,
                                                           action_repeat=args.action_repeat))


def make_train_envs(args: Args) -> envs.ParallelEnvs:
    """The --num-envs training envs; env i is seeded with --seed + i (one env: make_run_env's)."""
    if args.num_envs == 1:
        return envs.ParallelEnvs(make_run_env(args))
    return _env_or_usage_error(args, lambda: envs.ParallelEnvs(
        name=args.env, num=args.num_envs, image_size=args.image_size, seed=args.seed, action_repeat=args.action_repeat))


def make_eval_envs(args: Args):
    """Evaluation's envs, never the training ones: with --num-envs N > 1, min(N, --eval-episodes) envs in their
    own processes, whose episodes run in parallel (evaluate_episodes); with one, make_run_env's env. Every eval
    env is built alike (evaluation seeds each episode's reset, not the env)."""
    m = min(args.num_envs, args.eval_episodes)
    if m <= 1:
        return make_run_env(args)
    make = functools.partial(envs.make_env, args.env, args.image_size, args.seed, args.action_repeat)
    return _env_or_usage_error(args, lambda: envs.ParallelEnvs(factories=[make] * m))


def _env_or_usage_error(args: Args, make):
    try:
        return make()
    except (ValueError, RuntimeError, ImportError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if args.env in envs.MUJOCO_TASKS and any(w in msg for w in ("EGL", "OSMesa", "OpenGL", "GLFW", "libGL")):
            msg += f" (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): try MUJOCO_GL=osmesa, or run `bash setup.sh`"
        elif isinstance(e, ImportError):
            raise  # a broken install, not a bad flag: keep the traceback
        raise UsageError(msg) from None


def first_update_warning(args: Args) -> str:
    """A warning when the flags leave no update to run (e.g. --total-steps below --batch-length), else ''."""
    start = max(args.learning_starts, args.batch_length - 1, 1)  # the replay holds a window from about here on
    every = args.batch_size * args.batch_length / args.train_ratio if args.train_ratio else float("inf")
    if args.total_steps - start + 1 >= every:
        return ""
    return (f"WARNING: this run trains NOTHING: updates start at step {start} (--learning-starts "
            f"{args.learning_starts}, and a --batch-length {args.batch_length} window in the replay), then one every "
            f"{every:g} steps (--batch-size x --batch-length / --train-ratio), and --total-steps {args.total_steps} "
            "ends first")


@dataclass
class Run:
    """What the loop works on: the agent, its optimisers and replay, the envs, the counters, and the run's
    directory with its lock, logger and checkpoints."""
    args: Args
    device: torch.device
    run_dir: Path
    agent: Dreamer
    opt: dict
    replay: Replay
    env: envs.ParallelEnvs  # the training envs
    eval_env: object  # evaluation's env or envs.ParallelEnvs (with one MetaDrive env: the training env itself)
    p: runtime.Progress
    lock: runtime.RunLock
    logger: runtime.Logger | None = None
    last_ckpt: int = -1  # step of the newest checkpoint

    def save(self):
        """A checkpoint of this moment, covering every row logged so far."""
        if self.logger is not None:
            self.logger.sync()
            self.p.rows = self.logger.rows
        state = checkpoint_state(self.agent, self.opt, self.replay, self.env, self.p, self.args)
        runtime.save_checkpoint(self.run_dir, state, self.args.keep_checkpoints)
        self.last_ckpt = self.p.step

    def close(self):
        for thing in (self.logger, self.env, self.eval_env if self.eval_env is not self.env.one else None, self.lock):
            if thing is not None:
                thing.close()


def start_run(args: Args) -> Run:
    """Checks, then construction, then the first writes: the run directory, its lock and the step-0
    checkpoint, so that from the first file on the run can be continued with --resume (and a run killed
    before that checkpoint was complete leaves nothing a fresh start would refuse to reuse)."""
    check_args(args)
    if args.track:
        runtime.check_wandb()  # no W&B install or credentials: one line, before the run writes anything
    device = runtime.resolve_device(args.device)
    args = for_device(args, device)  # the run records (and its checkpoints keep) what auto meant here
    if device.type == "cpu":
        runtime.keep_freed_memory()
    run_dir, state = open_run(args)
    runtime.seed_everything(args.seed, args.torch_deterministic)
    encoder = make_encoder(args)  # before the env: a bad PVM id or size then leaves no env to close
    env = make_train_envs(args)
    eval_env = env.one
    try:
        # Evaluation runs on its own env, as in [D3], so it never reseeds the training episodes' starts.
        # MetaDrive's engine is one per process: with one env, in this process, evaluation shares it and
        # eval_row puts its generators back (with N > 1 the training envs live in their own processes).
        if args.eval_episodes and (args.env not in envs.ONE_PER_PROCESS or args.num_envs > 1):
            eval_env = make_eval_envs(args)
        action_dim = env.action_space.shape[0]
        agent = Dreamer(encoder, action_dim, args).to(device)
        opt = make_optimizers(agent, args)
        replay = Replay(args.replay_size, env.observation_space.shape, action_dim, args.seed,
                        feature_cache_shape(agent.wm.encoder, args), streams=args.num_envs)
        p = restore(state, agent, opt, replay, env, device) if state else runtime.Progress(
            next_log=args.log_every, next_eval=args.eval_every or args.total_steps, next_ckpt=args.checkpoint_every)
        runtime.make_run_dir(run_dir, "--logdir")  # every check has passed: the first write of the run
        lock = runtime.RunLock(run_dir)  # no second process may write this run while this one does
    except BaseException:
        env.close()
        if eval_env is not None and eval_env is not env.one:
            eval_env.close()
        raise
    run = Run(args, device, run_dir, agent, opt, replay, env, eval_env, p, lock, last_ckpt=p.step)
    try:
        if state is None:
            run.save()  # step 0: from here on the run can always be continued with --resume
        track = dict(project=args.wandb_project_name, entity=args.wandb_entity,
                     config=dict(asdict(args), encoder=encoder_summary(agent, args))) if args.track else None
        run.logger = runtime.Logger(run_dir, p if state else None, track)
    except BaseException:
        run.close()
        raise
    if run.logger.rows == 0:  # nothing logged yet (or nothing the checkpoint covers): the run's description
        run.logger.text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
        run.logger.text("encoder", encoder_summary(agent, args))
    print(encoder_summary(agent, args))
    print(f"device {device}: --precision {args.precision}, --grad-checkpoint {args.grad_checkpoint}"
          + (", --compile" if args.compile else ""))
    if args.pvm != "none" and args.pvm_random_init:
        print("WARNING: the PVM is RANDOMLY INITIALISED (--pvm-random-init): NOT pre-trained; results from this "
              "run say nothing about pre-trained features.")
    if warning := first_update_warning(args):
        print(warning, file=sys.stderr)
    return run


# ---------------------------------------------------------------------------------------------------------
# Main loop: collect -> replay -> train at --train-ratio, with logging, evaluation and checkpoints
# ---------------------------------------------------------------------------------------------------------
def to_torch(batch: dict, device) -> dict:
    """A replayed batch on the device. To a GPU through pinned (page-locked) host memory with non_blocking
    copies, so the copy overlaps the work queued before it; on a CPU the arrays are used in place."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
    return {k: torch.from_numpy(np.ascontiguousarray(v)).pin_memory().to(device, non_blocking=True)
            for k, v in batch.items()}


def eval_video(run_dir: Path, step: int) -> Path:
    return run_dir / "videos" / f"eval_{step}.mp4"


def eval_row(agent: Dreamer | None, env: envs.ParallelEnvs, eval_env, args: Args, run_dir: Path, step: int,
             stop=None, on_episode=None) -> dict | None:
    """One evaluation during training (agent=None: the random policy), on eval_env; None if stop() ended it.
    env: the training envs. Where eval_env IS the training env (one MetaDrive env: one engine per process) its
    generators are put back afterwards, so the training episodes still do not depend on --eval-every."""
    saved = envs.rng_state(eval_env) if eval_env is env.one else None
    video = str(eval_video(run_dir, step)) if args.capture_video and agent is not None else ""
    out = evaluate_episodes(agent, eval_env, args.eval_episodes, video, stop, on_episode)
    if saved is not None:
        envs.set_rng_state(eval_env, saved)
    if out is None:
        return None
    who = "" if agent is not None else "random_"
    row = {f"eval/{who}return_mean": float(out["returns"].mean()), f"eval/{who}return_std": float(out["returns"].std())}
    if "final_dist" in out:  # seeing vs guessing (reacher, pusher): the distance left, beside the blind bound
        row[f"eval/{who}final_dist_mean"] = float(out["final_dist"].mean())
        row["eval/blind_dist_mean"] = float(out["blind_dist"].mean())
    return row


def train(args: Args) -> dict:
    """A whole run. The stop handler comes first, so a SIGTERM at any moment (even while the models are being
    built) ends in a checkpoint and a clean exit; see runtime.StopRequest."""
    with runtime.StopRequest() as stop:
        run = start_run(args)
        with closing(run):
            return train_loop(run, stop)


def train_loop(run: Run, stop: runtime.StopRequest) -> dict:
    from tqdm import tqdm

    args, p, agent, replay, logger = run.args, run.p, run.agent, run.replay, run.logger
    batch_steps = args.batch_size * args.batch_length
    pbar = tqdm(total=args.total_steps, initial=p.step, unit="step", mininterval=2.0, dynamic_ncols=True)

    def evaluation(policy: Dreamer | None, what: str, step: int) -> dict | None:  # shown on the progress bar
        show = lambda i: pbar.set_postfix_str(f"evaluating {what}: episode {i + 1}/{args.eval_episodes}")  # noqa: E731
        return eval_row(policy, run.env, run.eval_env, args, run.run_dir, step, lambda: bool(stop), show)

    def film(step: int) -> dict | None:  # the evaluation video of this step, for --track's W&B run
        path = eval_video(run.run_dir, step)
        return {"eval/video": path} if args.capture_video and path.exists() else None

    def train_owed():  # the updates owed at --train-ratio, one at a time so that a stop waits for one at most
        while p.updates_due >= 1 and not stop:
            metrics = train_step(agent, run.opt, to_torch(replay.sample(args.batch_size, args.batch_length), run.device))
            runtime.check_finite(metrics, p, run.last_ckpt)  # "never silently train on NaNs"
            for k, v in metrics.items():
                p.train_metrics.setdefault(k, []).append(v)
            p.updates, p.updates_due = p.updates + 1, p.updates_due - 1

    with pbar:
        if not p.baselines:  # step 0: random actions and the untrained agent, by the same evaluation code
            random_row = evaluation(None, "the random policy", 0) if args.eval_episodes else {}
            agent_row = evaluation(agent, "the untrained agent", 0) if args.eval_episodes and not stop else {}
            if not stop:
                if args.eval_episodes:
                    logger.log(0, {**random_row, **agent_row}, film(0))
                p.baselines = True
                run.save()  # step 0 again, now covering the baselines: a kill from here on never repeats them
        # A resumed run starts a fresh episode, also from a checkpoint taken mid-episode (at a --checkpoint-every
        # mark or on SIGTERM): the simulator's state is not saved, and is_first tells the world model of the cut.
        # The env's RNG is, so from a checkpoint at an episode's end the resumed run IS the uninterrupted one.
        # That episode starts at the first step, after the updates the checkpoint owed (as it would have).
        collector = Collector(agent, run.env, replay, seed=args.seed if p.step == 0 else None)
        start_time, start_step = time.time(), p.step
        while not stop:
            # A checkpoint is taken after a step's collection and before its updates: a resumed run pays first
            # what the stopped one owed, and continues exactly where it left off.
            train_owed()
            if stop or p.step >= args.total_steps:
                break
            # One step of every env: N agent steps, numbered env by env (env i's is step0 + i + 1).
            ended = collector.step(random_action=p.step < args.learning_starts)
            step0, p.step = p.step, p.step + args.num_envs
            pbar.update(args.num_envs)
            if replay.windows(args.batch_length).sum() > 0:  # each env step owes train_ratio / (B*T) updates
                p.updates_due += sum(s >= args.learning_starts for s in range(step0 + 1, p.step + 1)) \
                    * args.train_ratio / batch_steps

            for j, (env_index, ep_return, ep_len) in enumerate(ended):  # ---- episode ends: a row each
                step, last = step0 + env_index + 1, j == len(ended) - 1  # losses and evaluation join the last row
                sps = (p.step - start_step) / (time.time() - start_time)
                row = {"charts/episodic_return": ep_return, "charts/episodic_length": ep_len,
                       "charts/env_index": env_index, "charts/sps": sps, "charts/updates": p.updates}
                if last and p.step >= p.next_log and p.train_metrics:
                    row.update({k: float(np.mean(v)) for k, v in p.train_metrics.items()})
                    p.train_metrics, p.next_log = {}, p.next_log + args.log_every
                if last and args.eval_episodes and args.eval_every and p.step >= p.next_eval and not stop:
                    if (evaluated := evaluation(agent, "the agent", step)) is not None:  # else: due at a later end
                        row.update(evaluated)
                        p.next_eval, p.last_eval = runtime.next_mark(p.step, args.eval_every), step
                logger.log(step, row, film(step) if p.last_eval == step else None)
                pbar.set_postfix(sps=f"{sps:.1f}", ret=f"{ep_return:.1f}", upd=p.updates, refresh=False)
            if p.step >= p.next_ckpt and not stop:  # after the row of this step: the checkpoint covers it
                p.next_ckpt = runtime.next_mark(p.step, args.checkpoint_every)
                run.save()
        # ---- end of training: a final evaluation and checkpoint, unless this step already has them
        if not stop and args.eval_episodes and p.last_eval != p.step:
            if (evaluated := evaluation(agent, "the agent", p.step)) is not None:
                logger.log(p.step, evaluated, film(p.step))
                p.last_eval = p.step
        if stop or run.last_ckpt != p.step or logger.rows != p.rows:
            run.save()
    if stop:
        print(f"stopped by {stop.signal} at step {p.step}, checkpoint saved: continue with --resume {run.run_dir}")
        return dict(run_dir=str(run.run_dir), step=p.step, updates=p.updates, stopped=stop.signal)
    print(runtime.summarize(run.run_dir))
    print(f"done: {p.step} steps, {p.updates} updates; run in {run.run_dir}\n"
          f"under visual shifts: python evaluate.py {run.run_dir}")
    return dict(run_dir=str(run.run_dir), step=p.step, updates=p.updates)


def main(argv=None):
    args = runtime.parse_cli(Args, argv, description=__doc__.split("\n\n")[0])
    with runtime.one_line_errors():
        return train(args)


if __name__ == "__main__":
    main()
