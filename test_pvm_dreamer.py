"""Tests of the method (pvm_dreamer.py): math, replay, world model, actor-critic, PVM encoders and their modes,
the feature cache, and a CI-sized learning check. Offline, CPU, tiny models. Run machinery and the scripts are
tested in test_runs.py, envs and shifts in test_envs.py, LoRA and L2-SP in test_finetune.py, the ViT families in
test_families.py; `pytest -q` runs them all in about nine minutes."""
import json
import shutil
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
import pvm_dreamer as pd

REPO = Path(__file__).resolve().parent
TINY = dict(size="tiny", image_size=32, pvm_image_size=32, pvm_id="tiny", pvm_random_init=True)


def tiny_args(**kw) -> pd.Args:
    return pd.Args(**{**TINY, "batch_size": 2, "batch_length": 8, **kw})


def main_in_process(argv, capsys):
    """pd.main in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    try:
        pd.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def read_rows(run_dir):
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------------------------
def test_symlog_symexp_roundtrip():
    x = torch.tensor([-1e6, -10.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 10.0, 1e6])
    torch.testing.assert_close(pd.symexp(pd.symlog(x)), x, rtol=1e-5, atol=1e-6)
    assert pd.symlog(torch.tensor(1e6)) < 14  # squashes large values


def test_twohot_roundtrip_and_loss():
    bins = pd.BINS
    y = torch.tensor([-19.99, -3.3, -0.01, 0.0, 0.123, 7.77, 20.0])
    code = pd.twohot(y, bins)
    assert code.shape == (7, 255)
    torch.testing.assert_close(code.sum(-1), torch.ones(7))
    assert ((code > 0).sum(-1) <= 2).all()
    torch.testing.assert_close((code * bins).sum(-1), y, atol=1e-5, rtol=0)
    # A head whose logits are the log of the two-hot code predicts the target back in raw units.
    target = torch.tensor([-250.0, -1.5, 0.0, 3.0, 1234.0])
    logits = torch.log(pd.twohot(pd.symlog(target), bins) + 1e-12)
    torch.testing.assert_close(pd.twohot_mean(logits, bins), target, rtol=1e-3, atol=1e-3)
    # The loss is lowest for the right target.
    assert pd.twohot_loss(logits, target, bins).sum() < pd.twohot_loss(logits, target + 5, bins).sum()


def test_lambda_return_limits():
    reward = torch.tensor([[1.0], [2.0], [3.0]])  # (H=3, N=1)
    disc = torch.full((3, 1), 0.5)
    value = torch.tensor([[10.0], [20.0], [30.0], [40.0]])
    # lam = 1: discounted Monte-Carlo return bootstrapped from the last value.
    mc = pd.lambda_return(reward, disc, value, 1.0)
    assert mc[0].item() == pytest.approx(1 + 0.5 * (2 + 0.5 * (3 + 0.5 * 40)))
    # lam = 0: one-step TD targets.
    td = pd.lambda_return(reward, disc, value, 0.0)
    torch.testing.assert_close(td[:, 0], torch.tensor([1 + 0.5 * 20, 2 + 0.5 * 30, 3 + 0.5 * 40]))


def test_return_norm_never_amplifies_and_tracks_range():
    norm = pd.ReturnNorm(rate=1.0)  # rate 1: no averaging, so the scale equals this batch's range
    assert norm.update(torch.linspace(0, 0.5, 101)).item() == 1.0  # range 0.475 < 1: scale stays 1
    assert norm.update(torch.linspace(0, 100, 101)).item() == pytest.approx(90.0, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------------------
def test_replay_windows_are_contiguous_and_start_an_episode():
    rb = pd.Replay(capacity=50, image_shape=(4, 4, 3), action_dim=2, seed=0)
    for t in range(130):  # wraps around twice; reward holds the global step index
        rb.add(np.full((4, 4, 3), t % 256, np.uint8), np.array([t, -t]), float(t), t % 17 == 0, False)
    assert len(rb) == 50
    batch = rb.sample(64, 10)
    assert batch["image"].shape == (64, 10, 4, 4, 3) and batch["image"].dtype == np.uint8
    assert batch["action"].shape == (64, 10, 2) and batch["reward"].shape == (64, 10)
    assert batch["is_first"][:, 0].all()
    # Windows never cross the write head: each one is 10 consecutive steps from the newest 50.
    np.testing.assert_array_equal(np.diff(batch["reward"], axis=1), 1)
    assert batch["reward"].min() >= 80 and batch["reward"].max() <= 129
    # state_dict round trip keeps the data and the sampler's RNG.
    rb2 = pd.Replay(capacity=50, image_shape=(4, 4, 3), action_dim=2, seed=123)
    rb2.load_state_dict(rb.state_dict())
    a, b = rb.sample(4, 10), rb2.sample(4, 10)
    np.testing.assert_array_equal(a["reward"], b["reward"])


def test_replay_streams_never_mix_and_one_stream_is_the_single_ring():
    """N parallel envs write N streams; a window stays inside one stream (never runs from one env's frames into
    another's) and inside its newest rows; windows are uniform over all windows held; one stream draws exactly
    what the single ring did (offset = rng.integers(0, n - T + 1) from the oldest row)."""
    rb = pd.Replay(capacity=90, image_shape=(2, 2, 3), action_dim=1, seed=0, streams=3)  # 30 rows per stream
    added = {0: 70, 1: 30, 2: 12}  # stream 0 wrapped twice, stream 1 just full, stream 2 partly filled
    for stream, n in added.items():
        for t in range(n):  # reward = 1000 * stream + t: which env and which step a row came from
            rb.add(np.zeros((2, 2, 3), np.uint8), [t], 1000.0 * stream + t, t == 0, False, stream=stream)
    assert rb.lengths().tolist() == [30, 30, 12] and len(rb) == 72
    assert rb.windows(10).tolist() == [21, 21, 3]
    batch = rb.sample(4000, 10)
    stream = batch["reward"][:, 0] // 1000
    assert (batch["reward"] // 1000 == stream[:, None]).all()  # one stream per window
    np.testing.assert_array_equal(np.diff(batch["reward"], axis=1), 1)  # consecutive rows of it
    t0 = batch["reward"][:, 0] % 1000
    assert (t0[stream == 0] >= 40).all() and (t0[stream == 0] <= 60).all()  # never across stream 0's write head
    assert batch["is_first"][:, 0].all()
    np.testing.assert_allclose(np.bincount(stream.astype(int)) / 4000, np.array([21, 21, 3]) / 45, atol=0.03)
    with pytest.raises(AssertionError, match="no window of 40"):
        rb.sample(1, 40)
    # Round trip, and a checkpoint's stream count must match.
    rb2 = pd.Replay(capacity=90, image_shape=(2, 2, 3), action_dim=1, seed=5, streams=3)
    rb2.load_state_dict(rb.state_dict())
    np.testing.assert_array_equal(rb.sample(8, 10)["reward"], rb2.sample(8, 10)["reward"])
    with pytest.raises(AssertionError, match="3 streams"):
        pd.Replay(90, (2, 2, 3), 1, seed=0, streams=2).load_state_dict(rb.state_dict())
    # One stream: the single ring's draws, and a checkpoint written before streams existed still loads.
    one = pd.Replay(capacity=50, image_shape=(2, 2, 3), action_dim=1, seed=7)
    for t in range(80):
        one.add(np.zeros((2, 2, 3), np.uint8), [t], float(t), False, False)
    rng = np.random.default_rng(7)
    want = 30 + rng.integers(0, 50 - 10 + 1, 16)[:, None] + np.arange(10)  # oldest row holds step 30
    np.testing.assert_array_equal(one.sample(16, 10)["reward"], want)
    old = dict(idx=int(one.idx[0]), full=True, rng=one.rng.bit_generator.state,
               data={k: v[0].copy() for k, v in one.data.items()})  # the pre-streams format: one ring
    again = pd.Replay(capacity=50, image_shape=(2, 2, 3), action_dim=1, seed=1)
    again.load_state_dict(old)
    np.testing.assert_array_equal(again.sample(4, 10)["reward"], one.sample(4, 10)["reward"])


# ---------------------------------------------------------------------------------------------------------
# World model
# ---------------------------------------------------------------------------------------------------------
def fake_batch(B=2, T=8, size=32, A=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(image=torch.randint(0, 256, (B, T, size, size, 3), generator=g, dtype=torch.uint8),
                action=torch.rand(B, T, A, generator=g) * 2 - 1, reward=torch.randn(B, T, generator=g),
                is_first=torch.zeros(B, T, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True),
                is_terminal=torch.zeros(B, T, dtype=torch.bool))


def test_rssm_and_heads_shapes():
    torch.manual_seed(0)
    args = tiny_args()
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    s = pd.SIZES["tiny"]
    S, C, D = s["stoch"], s["classes"], s["deter"]
    batch = fake_batch()
    losses, (deter, stoch) = agent.wm.loss(batch)
    assert set(losses) == set(pd.wm_loss_scales(args))
    assert all(v.shape == (2, 8) for v in losses.values())
    assert deter.shape == (2, 8, D) and stoch.shape == (2, 8, S * C)
    # Latents are one-hot per group in the forward pass.
    torch.testing.assert_close(stoch.unflatten(-1, (S, C)).sum(-1), torch.ones(2, 8, S))
    assert agent.wm.decoder(torch.cat([deter, stoch], -1)).shape == (2, 8, 32, 32, 3)
    for backprop in (False, True):
        feats, raw, out = agent.imagine(deter.detach().flatten(0, 1), stoch.detach().flatten(0, 1), backprop)
        assert feats.shape == (16, 16, D + S * C) and raw.shape == (15, 16, 2) and out.shape == (15, 16, 4)
        assert out.requires_grad  # the actor's outputs keep their graph for the policy loss
        assert feats.requires_grad == backprop
    # Zero-initialised reward and value outputs predict exactly 0 at the start ([D3]).
    assert pd.twohot_mean(agent.wm.reward(feats), agent.wm.bins).abs().max() < 1e-5


def test_dynamics_see_the_size_of_an_action():
    # A 2-D action and half of it must embed differently (a Linear without bias before the norm maps both to
    # the same vector, and the world model could not learn how far an action moves the agent).
    torch.manual_seed(0)
    args = tiny_args()
    rssm = pd.Dreamer(pd.make_encoder(args), 2, args).wm.rssm
    a = torch.tensor([[0.8, -0.4]])
    assert not torch.allclose(rssm.in_action(a), rssm.in_action(0.5 * a), atol=1e-3)
    deter, stoch = rssm.initial(1, "cpu")
    assert not torch.allclose(rssm.core(deter, stoch, a), rssm.core(deter, stoch, 0.5 * a), atol=1e-4)


def test_rssm_resets_on_is_first():
    torch.manual_seed(0)
    args = tiny_args()
    wm = pd.Dreamer(pd.make_encoder(args), 2, args).wm
    embed = torch.randn(2, 6, wm.encoder.out_dim)  # the two rows have different histories
    is_first = torch.zeros(2, 6, dtype=torch.bool)
    is_first[:, 0] = is_first[:, 3] = True
    deter, _, _ = wm.rssm.observe(embed, torch.rand(2, 6, 2), is_first)
    assert not torch.allclose(deter[0, 2], deter[1, 2])
    torch.testing.assert_close(deter[0, 3], deter[1, 3])  # the reset at t=3 forgets the history


def test_kl_free_bits_and_balancing_gradients():
    torch.manual_seed(0)
    args = tiny_args(free_nats=0.0)
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    # One step (T=1): the prior's input h_1 does not depend on any posterior sample, so the posterior head can
    # only get gradient from the KL terms directly.
    losses, _ = agent.wm.loss(fake_batch(T=1))
    prior_w = agent.wm.rssm.prior_net[-1].bias  # h_1 = 0 after a reset: only the bias shapes that prior
    post_w = agent.wm.rssm.post_net[-1].weight
    g_dyn = torch.autograd.grad(losses["dyn"].mean(), [prior_w, post_w], retain_graph=True, allow_unused=True)
    g_rep = torch.autograd.grad(losses["rep"].mean(), [prior_w, post_w], allow_unused=True)
    assert g_dyn[0].abs().sum() > 0 and (g_dyn[1] is None or g_dyn[1].abs().sum() == 0)  # dyn trains the prior
    assert g_rep[1].abs().sum() > 0 and (g_rep[0] is None or g_rep[0].abs().sum() == 0)  # rep the posterior
    # With free bits of 1e6 nats both KL terms are clipped constants: no gradient at all.
    agent.wm.free_nats = 1e6
    losses, _ = agent.wm.loss(fake_batch())
    assert losses["rep"].eq(1e6).all()
    g = torch.autograd.grad((losses["rep"] + losses["dyn"]).sum(), [prior_w, post_w], allow_unused=True)
    assert all(x is None or x.abs().sum() == 0 for x in g)


def test_training_lowers_world_model_loss_on_fixed_batch():
    torch.manual_seed(0)
    args = tiny_args(wm_lr=1e-3)
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    opt = pd.make_optimizers(agent, args)
    batch = fake_batch(seed=3)
    first = pd.train_step(agent, opt, batch)["wm/loss"]
    for _ in range(30):
        last = pd.train_step(agent, opt, batch)["wm/loss"]
    assert last < 0.8 * first, (first, last)


class GreyTask(gym.Env):
    """A constant grey 16x16 frame; 10 steps an episode. Subclasses say what an action earns."""

    observation_space = gym.spaces.Box(0, 255, (16, 16, 3), np.uint8)
    grey = np.full((16, 16, 3), 128, np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.grey.copy(), {}


class AimAtTarget(GreyTask):
    """Reward -|a - (0.6, -0.6)|_1 for each action, 10 steps an episode. The reward
    for arriving at frame t depends only on the action that led there, so a policy improves only if the world
    model carries that action into its state and reward head, and the actor learns from imagined rewards."""

    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    target = np.array([0.6, -0.6])

    def step(self, action):
        self.t += 1
        reward = -float(np.abs(np.asarray(action) - self.target).sum())
        return self.grey.copy(), reward, False, self.t >= 10, {}


def test_training_raises_the_return(tmp_path, capsys, monkeypatch):
    """The whole loop learns, in CI time: after 1500 steps the evaluation return beats the random policy's by a
    wide margin (random: about -14; the untrained policy's mean action 0: -12; the best: 0). The world model
    needs ~700 updates before its reward depends on the action (the zero-initialised reward head first learns
    the mean); measured: eval -4.2 at step 1000, -0.3 at 1500."""
    def make_env(args):
        env = envs.PixelEnv(AimAtTarget(), lambda frame: frame, lambda: None, 16, 1)
        env.action_space.seed(args.seed)
        return env
    monkeypatch.setattr(pd, "make_run_env", make_env)
    code, _, err = main_in_process(
        ["--size", "tiny", "--image-size", "16", "--batch-size", "8", "--batch-length", "8", "--train-ratio", "64",
         "--learning-starts", "100", "--total-steps", "1200", "--eval-every", "600", "--eval-episodes", "3",
         "--log-every", "300", "--wm-lr", "1e-3", "--actor-lr", "1e-3", "--critic-lr", "1e-3", "--horizon", "10",
         "--imag-horizon", "5",
         "--logdir", str(tmp_path), "--run-name", "aim", "--device", "cpu"], capsys)
    assert code == 0, err
    rows = read_rows(tmp_path / "aim")
    evals = [r["eval/return_mean"] for r in rows if "eval/return_mean" in r]
    random_return = next(r["eval/random_return_mean"] for r in rows if "eval/random_return_mean" in r)
    wm = [r["wm/loss"] for r in rows if "wm/loss" in r]
    assert wm[-1] < 0.5 * wm[0], wm
    assert evals[-1] > random_return + 9 and evals[-1] > evals[0] + 6, (random_return, evals)


def test_reconstruction_gradient_reaches_the_posterior_through_the_latent_sample():
    """The decoder reads the sampled latent z_t; its straight-through gradient must reach the posterior
    network (and the encoder) — a stop-grad there leaves the representation trained by the KL terms alone."""
    torch.manual_seed(0)
    args = tiny_args()
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    losses, _ = agent.wm.loss(fake_batch(T=1))  # one step: z_0 is the only way from the posterior to the decoder
    losses["rec"].mean().backward()
    post = agent.wm.rssm.post_net[-1].weight.grad
    assert post is not None and post.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.wm.encoder.parameters())


class ConstantLogits(torch.nn.Module):
    """Stands in for a head: the same logits for every input, (..., F) -> (..., K)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, feats):
        return self.logits.expand(*feats.shape[:-1], -1)


def test_imagined_returns_stop_where_the_episode_ends():
    """Imagined returns discount by gamma * P(continue): with reward 1 at every step and every imagined state
    terminal, each lambda-return is exactly the next reward, 1, with no bootstrap from later steps."""
    torch.manual_seed(0)
    args = tiny_args()
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    _, (deter, stoch) = agent.wm.loss(fake_batch())
    one = torch.log(pd.twohot(pd.symlog(torch.tensor(1.0)), pd.BINS) + 1e-12)  # a reward head predicting 1
    agent.wm.reward, agent.wm.cont = ConstantLogits(one), ConstantLogits(torch.tensor([-30.0]))
    with torch.no_grad():
        agent.critic[-1].bias.copy_(torch.log(pd.twohot(pd.symlog(torch.tensor(5.0)), pd.BINS) + 1e-12))
    metrics = agent.ac_loss(deter.flatten(0, 1), stoch.flatten(0, 1))[1]
    assert metrics["imag_reward"].item() == pytest.approx(1.0, rel=1e-3)
    assert metrics["ret"].item() == pytest.approx(1.0, rel=1e-3)  # not 1 + gamma * (value 5 ...)


def test_slow_critic_follows_the_critic_and_regularises_it():
    """[D3]'s slow critic: an EMA of the critic (rate --slow-critic-rate per update) whose predictions the
    critic is also regressed onto, so moving the slow critic changes the value loss."""
    torch.manual_seed(0)
    args = tiny_args()
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    opt = pd.make_optimizers(agent, args)
    with torch.no_grad():  # start the slow critic away from the critic, so the EMA step is visible
        for p in agent.slow_critic.parameters():
            p.add_(0.1)
    slow_before = [p.detach().clone() for p in agent.slow_critic.parameters()]
    pd.train_step(agent, opt, fake_batch())
    for old, new, fast in zip(slow_before, agent.slow_critic.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(new, old + args.slow_critic_rate * (fast - old))
    _, (deter, stoch) = agent.wm.loss(fake_batch())
    start = deter.detach().flatten(0, 1), stoch.detach().flatten(0, 1)
    value = {}
    with torch.no_grad():  # a critic sure of 0 (zero-initialised, it is uniform and every target costs the same)
        agent.critic[-1].bias.copy_(torch.log(pd.twohot(pd.symlog(torch.tensor(0.0)), pd.BINS) + 1e-3))
    for target in (None, 10.0):  # the slow critic as it is, and one that predicts 10 everywhere
        if target is not None:
            with torch.no_grad():
                agent.slow_critic[-1].weight.zero_()
                agent.slow_critic[-1].bias.copy_(torch.log(pd.twohot(pd.symlog(torch.tensor(target)), pd.BINS) + 1e-12))
        torch.manual_seed(1)
        value[target] = agent.ac_loss(*start)[0]["value"].item()
    assert value[10.0] > value[None] + 0.2, value


def test_continue_target_is_one_minus_terminal():
    """The continue head is trained toward 1 - is_terminal: a head that predicts "continues" everywhere is
    cheap on running steps and expensive exactly on the terminal one."""
    torch.manual_seed(0)
    args = tiny_args()
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    with torch.no_grad():
        agent.wm.cont[-1].weight.zero_()
        agent.wm.cont[-1].bias.fill_(10.0)  # P(continue) = sigmoid(10)
    batch = fake_batch()
    batch["is_terminal"][0, 3] = True
    con = agent.wm.loss(batch)[0]["con"]  # (B, T)
    assert con[0, 3] > 9.9 and con.flatten()[torch.arange(con.numel()) != 3].max() < 1e-3, con


class Cliff(GreyTask):
    """An action a[0] < 0 steps off the cliff: the episode terminates (a black frame, reward 0); otherwise
    reward 1 until the time limit. Random actions end most episodes early."""

    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def step(self, action):
        self.t += 1
        if action[0] < 0:
            return np.zeros_like(self.grey), 0.0, True, False, {}
        return self.grey.copy(), 1.0, False, self.t >= 10, {}


def test_continue_head_learns_where_episodes_end():
    """On a task with real terminations, the trained continue head predicts the end where it happens (on the
    posterior of the terminal frame) and where it will happen (in imagination, after a step off the cliff),
    and imagined discounts follow: stepping off weighs the rest of the rollout ~0."""
    torch.manual_seed(0)
    args = tiny_args(image_size=16, batch_size=8, batch_length=8, wm_lr=1e-3)
    env = envs.PixelEnv(Cliff(), lambda frame: frame, lambda: None, 16, 1)
    env.action_space.seed(0)
    agent = pd.Dreamer(pd.make_encoder(args), 1, args)
    opt = pd.make_optimizers(agent, args)
    replay = pd.Replay(2000, (16, 16, 3), 1, seed=0)
    collector = pd.Collector(agent, env, replay)
    collector.reset(seed=0)
    for _ in range(600):
        collector.step(random_action=True)
    for _ in range(150):
        pd.train_step(agent, opt, pd.to_torch(replay.sample(8, 8), "cpu"))
    batch = pd.to_torch(replay.sample(64, 8), "cpu")
    with torch.no_grad():
        _, (deter, stoch) = agent.wm.loss(batch)
        feat = torch.cat([deter, stoch], -1)
        p_cont = torch.sigmoid(agent.wm.cont(feat).squeeze(-1))  # (B, T)
        term = batch["is_terminal"]
        assert term.any() and (~term).any()
        assert p_cont[term].mean() < 0.2 and p_cont[~term].mean() > 0.8, (p_cont[term], p_cont[~term].mean())
        start = deter[~term], stoch[~term]  # (N, D), (N, S*C): states where the episode still runs
        imagined = {}
        for a in (-1.0, 1.0):
            d, z = agent.wm.rssm.img_step(*start, torch.full((len(start[0]), 1), a))
            imagined[a] = torch.sigmoid(agent.wm.cont(torch.cat([d, z], -1)).squeeze(-1)).mean().item()
    assert imagined[-1.0] < 0.2 < 0.8 < imagined[1.0], imagined


def test_world_model_learns_to_draw_the_reacher_target(seed=0):
    """The CI-sized check that the agent sees what it must on a MuJoCo task: a tiny world model trained by the
    real update (train_step) on random-action Reacher frames at 32x32 draws the target where it is in held-out
    episodes (probe.part_drawn: 1 = exactly, 0 = as if left out), well above its control (another episode's
    reconstruction, the target elsewhere). The world model first learns the floor and the arm and only then the
    target; measured (score / control, seeds 0, 1, 2): 0.20 / 0.20, 0.30 / 0.30, 0.45 / 0.45 untrained; 0.12 / 0.12
    at 200 updates; 0.80 / 0.01, 0.67 / 0.02, 0.76 / 0.02 at 600. The README's 12000-step Reacher agents score
    0.92 and 0.90 (controls 0.05, 0.04)."""
    import probe

    torch.manual_seed(seed)
    args = tiny_args(batch_size=16, batch_length=16, wm_lr=1e-3, seed=seed)
    env = envs.make_env("reacher", 32, seed=seed)
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    opt = pd.make_optimizers(agent, args)
    replay = pd.Replay(2000, (32, 32, 3), 2, seed=seed)
    collector = pd.Collector(agent, env, replay, seed=seed)
    for _ in range(1000):  # 40 episodes: 40 target positions
        collector.step(random_action=True)
    env.close()
    frames, actions, masks, blanks = probe.collect_episodes("reacher", 6, 32, args.action_repeat)
    drawn = lambda: probe.part_drawn(probe.reconstruct(agent, frames, actions), frames, masks, blanks)  # noqa: E731
    before = drawn()
    for _ in range(600):
        pd.train_step(agent, opt, pd.to_torch(replay.sample(16, 16), "cpu"))
    after = drawn()
    assert after["score"] > 0.45 and after["score"] > after["control"] + 0.25, (before, after)
    assert after["score"] > before["score"] + 0.2, (before, after)  # the untrained grey decoder scores ~0.2


def test_latent_categoricals_keep_the_unimix_floor():
    """Every class of every latent keeps probability >= unimix / C, however extreme the logits."""
    torch.manual_seed(0)
    args = tiny_args()
    rssm = pd.Dreamer(pd.make_encoder(args), 2, args).wm.rssm
    S, C = rssm.stoch, rssm.classes
    for scale in (1.0, 30.0, 1e4):
        raw = torch.randn(64, S * C) * scale
        raw[0] = 0.0
        raw[1, 0] = 1e30  # one class takes everything
        probs = rssm.logits(raw).exp()  # (64, S, C)
        assert probs.shape == (64, S, C)
        torch.testing.assert_close(probs.sum(-1), torch.ones(64, S))
        assert probs.min() >= args.unimix / C * (1 - 1e-5), probs.min()
    assert probs[1, 0, 0] == pytest.approx(1 - args.unimix + args.unimix / C, rel=1e-5)


@pytest.mark.parametrize("actor_grad", ["reinforce", "dynamics"])
def test_actor_loss_trains_only_the_actor(actor_grad, monkeypatch):
    """The policy loss may backpropagate through the world model and the critic's bootstrap values
    (--actor-grad dynamics), but only the actor may learn from it."""
    torch.manual_seed(0)
    args = tiny_args(actor_grad=actor_grad)
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    opt = pd.make_optimizers(agent, args)
    ac_loss = agent.ac_loss

    def policy_only(deter, stoch):
        losses, metrics = ac_loss(deter, stoch)
        return dict(policy=losses["policy"], value=0.0 * losses["value"]), metrics
    monkeypatch.setattr(agent, "ac_loss", policy_only)
    critic = [p.detach().clone() for p in agent.critic.parameters()]
    actor = [p.detach().clone() for p in agent.actor.parameters()]
    pd.train_step(agent, opt, fake_batch())
    assert all(torch.equal(a, b) for a, b in zip(critic, agent.critic.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(actor, agent.actor.parameters()))


def test_imagination_weight_is_the_discounted_probability_of_still_running():
    torch.manual_seed(0)
    H, N, gamma = 5, 4, 0.9
    cont = torch.rand(H + 1, N)
    cont[:, 1] = 1.0  # never ends: gamma^t
    cont[0, 2] = 0.0  # a terminal start: weighs nothing at any step
    w = pd.imagination_weight(cont, gamma)
    assert w.shape == (H, N)
    for t in range(H):  # w_t = c_0 * prod_{i=1..t} gamma * c_i
        torch.testing.assert_close(w[t], cont[0] * torch.prod(gamma * cont[1:t + 1], 0))
    torch.testing.assert_close(w[:, 1], gamma ** torch.arange(H, dtype=torch.float32))
    assert (w[:, 2] == 0).all() and (w[:, 0] > 0).all()


class ContinueLogits(torch.nn.Module):
    """Stands in for the continue head in imagination: state 0 (the posterior start) of the starts in `terminal`
    is predicted terminal, every other state continues."""

    def __init__(self, terminal):
        super().__init__()
        self.terminal = terminal

    def forward(self, feats):  # (H+1, N, F) -> (H+1, N, 1)
        logits = torch.full((*feats.shape[:-1], 1), 30.0)
        logits[0, self.terminal] = -30.0
        return logits


def test_terminal_starts_carry_no_actor_critic_loss():
    """[D3] weights imagined steps by cumprod(discount * continue) including the start state's continue: an
    imagination that starts from a terminal state (the episode is over) must not train the actor or critic."""
    torch.manual_seed(0)
    args = tiny_args()
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    wm_losses, (deter, stoch) = agent.wm.loss(fake_batch())
    start = deter.detach().flatten(0, 1), stoch.detach().flatten(0, 1)
    n = start[0].shape[0]
    losses = {}
    for name, terminal in (("none", torch.zeros(n, dtype=torch.bool)), ("all", torch.ones(n, dtype=torch.bool)),
                           ("half", torch.arange(n) % 2 == 0)):
        agent.wm.cont = ContinueLogits(terminal)  # this test's own agent: nothing to restore
        torch.manual_seed(1)
        losses[name] = {k: v.item() for k, v in agent.ac_loss(*start)[0].items()}
    for k in ("policy", "value"):
        assert abs(losses["none"][k]) > 1e-5 and abs(losses["all"][k]) < 1e-6 * abs(losses["none"][k]), (k, losses)
        assert losses["half"][k] == pytest.approx(losses["none"][k] / 2, rel=0.3), (k, losses)


# ---------------------------------------------------------------------------------------------------------
# PVM encoders: forward pass, preprocessing, and which parameters each mode trains
# ---------------------------------------------------------------------------------------------------------
def tiny_pvm(pvm, mode, k=2, **kw):
    torch.manual_seed(0)
    args = tiny_args(pvm=pvm, mode=mode, finetune_blocks=k, **kw)
    return args, pd.Dreamer(pd.make_encoder(args), 2, args)


@pytest.mark.parametrize("pvm", ["dinov2", "clip"])
def test_pvm_features_match_transformers_forward(pvm):
    _, agent = tiny_pvm(pvm, "full")
    enc = agent.wm.encoder
    obs = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        ours = enc.features(obs)
        out = enc.backbone(pixel_values=enc.preprocess(obs))
    if pvm == "dinov2":  # patch tokens of the final-norm output, CLS dropped
        assert ours.shape == (3, 16, 32)
        torch.testing.assert_close(ours, out.last_hidden_state[:, 1:])
    else:  # pooled output
        assert ours.shape == (3, 32)
        torch.testing.assert_close(ours, out.pooler_output)
    assert enc(obs[None]).shape == (1, 3, enc.out_dim)


@pytest.mark.parametrize("pvm", ["dinov2", "clip"])
@pytest.mark.parametrize("mode", ["frozen", "partial", "partial+norm", "full"])
def test_pvm_modes_train_exactly_the_intended_parameters(pvm, mode):
    """partial trains the last k blocks only, as [PVM] (its final layernorm stays frozen); --finetune-norm adds
    the final norm."""
    mode, norm = mode.split("+")[0], mode.endswith("+norm")
    args, agent = tiny_pvm(pvm, mode, k=2, finetune_norm=norm)
    enc = agent.wm.encoder
    before = {n: p.detach().clone() for n, p in enc.backbone.named_parameters()}
    opt = pd.make_optimizers(agent, args)
    pd.train_step(agent, opt, fake_batch())
    depth = len(enc.blocks)
    prefix = "encoder.layer" if pvm == "dinov2" else "vision_model.encoder.layers"
    final = "layernorm" if pvm == "dinov2" else "vision_model.post_layernorm"
    for name, p in enc.backbone.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if mode == "frozen":
            expected = False
        elif mode == "full":
            expected = "mask_token" not in name  # DINOv2's mask token serves masked-image modelling only
        else:
            block = int(name[len(prefix) + 1:].split(".")[0]) if name.startswith(prefix + ".") else None
            expected = (block is not None and block >= depth - 2) or (norm and name.startswith(final))
        assert changed == expected, f"{mode}: {name} changed={changed}"
        if not expected:  # gradient never reaches a frozen part
            assert p.grad is None, name
    # The optimiser's PVM group runs at wm_lr * encoder_lr_scale and holds exactly the trainable params.
    groups = opt["wm"].param_groups
    trainable = [p for p in enc.backbone.parameters() if p.requires_grad]
    if mode == "frozen":
        assert len(groups) == 1 and not trainable
    else:
        assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(args.wm_lr * args.encoder_lr_scale)
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in trainable}
    # The projection head always trains.
    assert all(p.requires_grad for p in enc.proj.parameters())


def test_frozen_pvm_builds_no_graph():
    _, agent = tiny_pvm("dinov2", "frozen")
    enc = agent.wm.encoder
    feats = enc.features(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    assert not feats.requires_grad and feats.grad_fn is None


def test_pvm_preprocessing_matches_hf_image_processors():
    from PIL import Image
    from transformers import BitImageProcessor, CLIPImageProcessor

    # A smooth test image: bicubic resampling differs by implementation mostly at sharp edges.
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    img = (np.stack([np.sin(3 * xx), np.cos(2 * yy), xx * yy], -1) * 0.5 + 0.5) * 255
    img = img.astype(np.uint8)
    hf = {
        "dinov2": BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                    resample=Image.BICUBIC, image_mean=[0.485, 0.456, 0.406],
                                    image_std=[0.229, 0.224, 0.225], do_convert_rgb=True),
        "clip": CLIPImageProcessor(),  # defaults are openai/clip-vit-base-patch32's
    }
    for pvm in ("dinov2", "clip"):
        args = tiny_args(pvm=pvm, pvm_image_size=224, pvm_id="tiny")
        args.pvm_image_size = 224
        backbone = pd.load_pvm(pvm, "tiny", True)
        enc = pd.PVMEncoder(backbone, pvm, "frozen", 1, 224, 64, 4)
        ours = enc.preprocess(torch.from_numpy(img)[None])[0].numpy()
        theirs = hf[pvm](images=Image.fromarray(img), return_tensors="np")["pixel_values"][0]
        assert ours.shape == theirs.shape == (3, 224, 224)
        assert np.abs(ours - theirs).mean() < 0.02, (pvm, np.abs(ours - theirs).mean())


def test_missing_pvm_weights_fail_fast_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    t = time.time()
    with pytest.raises(pd.UsageError) as e:
        pd.load_pvm("dinov2", "facebook/dinov2-small", random_init=False)
    assert time.time() - t < 10
    msg = str(e.value)
    assert "\n" not in msg and "HF_HOME" in msg and "--pvm-id" in msg
    # A local directory that does not exist, or holds no model, is named as such (not blamed on the network).
    with pytest.raises(pd.UsageError, match="is no directory"):
        pd.load_pvm("dinov2", "/nonexistent/dinov2-small", random_init=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(pd.UsageError, match="must hold config.json"):
        pd.load_pvm("dinov2", str(tmp_path / "empty"), random_init=False)
    with pytest.raises(pd.UsageError, match="not cached"):  # not a valid repo id: no HFValidationError traceback
        pd.load_pvm("dinov2", "no//such id", random_init=False)


def test_bad_sizes_are_rejected():
    with pytest.raises(pd.UsageError, match="image-size 50"):
        pd.conv_stages(50)
    assert pd.conv_stages(64) == (4, 4) and pd.conv_stages(224) == (5, 7)
    with pytest.raises(pd.UsageError, match="finetune-blocks 7"):
        tiny_pvm("dinov2", "partial", k=7)
    with pytest.raises(pd.UsageError, match="patch size"):
        pd.make_encoder(tiny_args(pvm="clip", pvm_image_size=36))



# ---------------------------------------------------------------------------------------------------------
# Speed: the frozen-feature cache (bench.py and sweep.py are tested below it)
# ---------------------------------------------------------------------------------------------------------
def cached_batch(enc, batch):
    """The batch as the replay serves it with --feature-cache: plus the frozen prefix's output in fp16."""
    B, T = batch["image"].shape[:2]
    with torch.no_grad():
        feat = enc.prefix(batch["image"].flatten(0, 1)).half()
    return {**batch, "feat": feat.reshape(B, T, *feat.shape[1:])}


def wm_losses_and_grads(agent, batch):
    torch.manual_seed(1)  # the same latent samples in both runs
    agent.zero_grad(set_to_none=True)
    losses, _ = agent.wm.loss(batch)
    sum(v.mean() for v in losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in agent.wm.named_parameters() if p.requires_grad and p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("pvm", ["dinov2", "clip"])
@pytest.mark.parametrize("mode", ["frozen", "partial"])
def test_feature_cache_gives_the_same_losses_and_gradients(pvm, mode):
    _, agent = tiny_pvm(pvm, mode, k=2)
    batch = fake_batch()
    ref_losses, ref_grads = wm_losses_and_grads(agent, batch)
    losses, grads = wm_losses_and_grads(agent, cached_batch(agent.wm.encoder, batch))
    for k in ref_losses:
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=2e-3, atol=2e-3, msg=k)
    # Every trainable parameter (projection head and, in partial mode, the last blocks) gets the same gradient.
    assert grads.keys() == ref_grads.keys() and any("encoder.proj" in n for n in grads)
    assert any(".layer" in n or "layers" in n for n in grads) == (mode == "partial")
    for n in grads:  # atol 1e-6: attention key biases get a gradient of exactly 0 in theory, ~1e-11 in fp32
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=2e-2, atol=1e-3 * ref_grads[n].abs().max().item() + 1e-6, msg=n)


def count_backbone_calls(enc) -> list:
    calls = []
    for m in [enc.backbone.embeddings if enc.pvm == "dinov2" else enc.backbone.vision_model.embeddings, *enc.blocks]:
        m.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_frozen_cache_never_runs_the_backbone_in_an_update():
    args, agent = tiny_pvm("dinov2", "frozen")
    opt = pd.make_optimizers(agent, args)
    batch = fake_batch()
    cached = cached_batch(agent.wm.encoder, batch)
    calls = count_backbone_calls(agent.wm.encoder)
    proj_before = [p.detach().clone() for p in agent.wm.encoder.proj.parameters()]
    pd.train_step(agent, opt, cached)
    assert not calls  # not a single embedding or block forward
    assert any(not torch.equal(a, b) for a, b in zip(proj_before, agent.wm.encoder.proj.parameters()))  # head trains
    pd.train_step(agent, opt, batch)
    assert len(calls) == 1 + len(agent.wm.encoder.blocks)  # the hooks do count: without the cache it runs


def test_feature_cache_replay_checkpoint_budget_and_acting(capsys):
    args, agent = tiny_pvm("dinov2", "partial")
    enc = agent.wm.encoder
    shape = pd.feature_cache_shape(enc, args)
    assert shape == (1 + 16, 32) == enc.prefix_shape()  # CLS + 4x4 patches of the 32-wide tiny ViT
    assert pd.feature_cache_shape(enc, tiny_args(pvm="dinov2", mode="partial", feature_cache=False)) is None
    assert pd.feature_cache_shape(pd.CNNEncoder(32, 4), tiny_args()) is None
    assert "FEATURE CACHE OFF" not in capsys.readouterr().out
    big = tiny_args(pvm="dinov2", mode="partial", replay_size=10**6, feature_cache_gb=0.5)  # 1.09 GB > 0.5
    assert pd.feature_cache_shape(enc, big) is None and "FEATURE CACHE OFF" in capsys.readouterr().out
    rb = pd.Replay(20, (32, 32, 3), 2, seed=0, feat_shape=shape)
    frames = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8).numpy()
    state = pd.initial_state(agent)
    for t, obs in enumerate(frames):
        prefix = pd.add_frames(rb, agent, obs[None], np.zeros((1, 2)), [0.0], [t == 0], [False], [0])
        # Acting on the cached prefix is acting on the frame (torch.manual_seed: the same latent sample).
        torch.manual_seed(t)
        a1, _ = pd.act(agent, obs[None], state, [t == 0], explore=False, prefix=prefix)
        torch.manual_seed(t)
        a2, state = pd.act(agent, obs[None], state, [t == 0], explore=False)
        np.testing.assert_allclose(a1, a2, atol=1e-5)
    with torch.no_grad():
        want = enc.prefix(torch.as_tensor(frames)).half().numpy()
    np.testing.assert_array_equal(rb.data["feat"][0, :12], want)  # stream 0
    assert rb.sample(3, 5)["feat"].shape == (3, 5, *shape)
    # The checkpointed replay holds the cache; a replay without a cache drops it; the reverse refills it.
    saved = rb.state_dict()
    assert "feat" in saved["data"]
    plain = pd.Replay(20, (32, 32, 3), 2, seed=0)
    assert plain.load_state_dict(saved) and "feat" not in plain.data
    cached = pd.Replay(20, (32, 32, 3), 2, seed=0, feat_shape=shape)
    assert not cached.load_state_dict(plain.state_dict())
    cached.fill_cache(enc, "cpu", chunk=5)
    np.testing.assert_array_equal(cached.data["feat"][0, :12], want)


# ---------------------------------------------------------------------------------------------------------
# --precision bf16 (torch's CPU autocast here; on CUDA the same code path runs with CUDA's autocast)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pvm", ["none", "dinov2"])
# a norm fed bf16 activations with fp32 weights falls back to its unfused kernel (and warns): none may
@pytest.mark.filterwarnings("error:Mismatch dtype between input and weight")
def test_bf16_autocast_keeps_fp32_weights_and_stays_close_to_fp32(pvm):
    """From the same weights and batch, a bf16 update's losses are within a few % of the fp32 update's (bf16
    keeps 8 bits of mantissa), every weight and gradient stays fp32, and the fp32 maths is untouched by the
    autocast code (precision='fp32' runs it disabled). Acting under bf16 gives actions close to fp32's."""
    out = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        args = tiny_args(pvm=pvm, mode="partial", finetune_blocks=1, precision=precision, batch_length=8)
        agent = pd.Dreamer(pd.make_encoder(args), 2, args)
        opt = pd.make_optimizers(agent, args)
        torch.manual_seed(1)
        metrics = pd.train_step(agent, opt, fake_batch())
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        trained = [p for p in agent.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in agent.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trained)
        assert sum(p.grad is not None for p in trained) > 0.9 * len(trained)
        torch.manual_seed(2)
        frames = fake_batch()["image"][:, 0].numpy()  # two envs' frames
        action, (deter, _, _) = pd.act(agent, frames, pd.initial_state(agent, 2), [True, True], explore=False)
        assert deter.dtype == torch.float32  # the carried state stays fp32
        out[precision] = metrics, action
    (m32, a32), (m16, a16) = out["fp32"], out["bf16"]
    for k in ("wm/loss_rec", "wm/loss_rew", "wm/loss_dyn", "wm/loss", "ac/loss_value"):
        assert m16[k] == pytest.approx(m32[k], rel=0.05), k
    assert m16["wm/loss"] != m32["wm/loss"]  # bf16 really ran
    np.testing.assert_allclose(a16, a32, atol=0.05)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
@pytest.mark.parametrize("actor_grad, precision", [("reinforce", "fp32"), ("dynamics", "fp32"), ("reinforce", "bf16")])
def test_compiled_cell_gives_the_eager_losses(actor_grad, precision):
    """--compile wraps RSSM.obs_step, RSSM.scan (chunks of --compile-chunk steps), RSSM.img_step and
    Dreamer.policy_step in torch.compile (inductor, here its CPU C++ backend): two updates from the same weights and batches give the eager losses and weights to 1e-5
    relative (each step's noise comes from outside, so compiled code draws none), with the policy's plain
    samples (reinforce) and its reparameterised ones (dynamics), and the eager steps stay what the state_dict and
    the reader see. Under bf16 autocast (a GPU's default) the compiled steps run too, within 1% (inductor fuses
    and rounds the bf16 maths in its own order)."""
    out = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        args = tiny_args(compile=compiled, compile_chunk=3, batch_length=4, imag_horizon=3, actor_grad=actor_grad,
                         precision=precision)  # chunks of 3 + 1 steps: the scan's state carries across them
        agent = pd.Dreamer(pd.make_encoder(args), 2, args)
        assert ("policy_step" in vars(agent)) == compiled  # the compiled wrapper shadows the method
        opt = pd.make_optimizers(agent, args)
        for i in range(2):
            torch.manual_seed(1 + i)
            metrics = pd.train_step(agent, opt, fake_batch(T=4, seed=i))
        out[compiled] = metrics, agent.state_dict()
    (eager, sd_eager), (comp, sd_comp) = out[False], out[True]
    assert sd_eager.keys() == sd_comp.keys()
    rel = 1e-5 if precision == "fp32" else 1e-2
    for k in ("wm/loss", "wm/loss_rec", "wm/loss_dyn", "ac/loss_value", "ac/loss_policy", "ac/ret"):
        assert comp[k] == pytest.approx(eager[k], rel=rel, abs=1e-7 if precision == "fp32" else 1e-3), k
    names = [n for n in sd_eager if n.startswith(("actor.", "critic."))]  # updated through the policy step
    assert len(names) >= 8, names
    for name in names if precision == "fp32" else ():
        torch.testing.assert_close(sd_comp[name], sd_eager[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
@pytest.mark.parametrize("pvm, mode", [("none", "full"), ("dinov2", "full"), ("dinov2", "partial"), ("clip", "lora")])
def test_compiled_acting_gives_the_eager_actions(pvm, mode):
    """--compile wraps acting's Dreamer.act_step (encoder, posterior step, actor) and the feature cache's
    Dreamer.cache_prefix: from the same weights, frames and noise, three env steps of `act` give the eager
    latent states and actions to 1e-5, with the frames (CNN, full ViT) or their cached prefix (partial, LoRA) as
    input."""
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 2, 32, 32, 3), generator=g, dtype=torch.uint8)  # 3 steps of 2 envs
    uniform = torch.rand(3, 2, pd.SIZES["tiny"]["stoch"], pd.SIZES["tiny"]["classes"], generator=g)
    out = {}
    for compiled in (False, True):
        args, agent = tiny_pvm(pvm, mode, compile=compiled)
        assert ("act_step" in vars(agent)) == compiled and ("cache_prefix" in vars(agent)) == compiled
        cached = pd.feature_cache_shape(agent.wm.encoder, args) is not None
        assert cached == (mode != "full")
        state, steps = pd.initial_state(agent, 2), []
        for t in range(3):
            prefix = agent.cache_prefix(frames[t]).float() if cached else None
            action, state = pd.act(agent, frames[t].numpy(), state, [t == 0] * 2, explore=False, prefix=prefix,
                                   uniform=uniform[t])
            steps.append((action, *state[:2]))
        out[compiled] = steps
    for (a0, d0, s0), (a1, d1, s1) in zip(out[False], out[True]):
        np.testing.assert_allclose(a1, a0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d1, d0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s1, s0)  # one-hot samples: the same classes drawn
    assert not np.allclose(out[False][0][0], out[False][2][0])  # the steps really differ
