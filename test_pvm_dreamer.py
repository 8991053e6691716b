"""Tests for pvm-dreamer. Offline, CPU, tiny models; `pytest -q` runs them all in a few minutes."""
import functools
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
import pvm_dreamer as pd
import runtime
import shifts

REPO = Path(__file__).resolve().parent
TINY = dict(size="tiny", image_size=32, pvm_image_size=32, pvm_id="tiny", pvm_random_init=True)


def tiny_args(**kw) -> pd.Args:
    return pd.Args(**{**TINY, "batch_size": 2, "batch_length": 8, **kw})


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


class AimAtTarget(gym.Env):
    """A constant grey frame; reward -|a - (0.6, -0.6)|_1 for each action, 10 steps an episode. The reward
    for arriving at frame t depends only on the action that led there, so a policy improves only if the world
    model carries that action into its state and reward head, and the actor learns from imagined rewards."""

    observation_space = gym.spaces.Box(0, 255, (16, 16, 3), np.uint8)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    target = np.array([0.6, -0.6])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.full((16, 16, 3), 128, np.uint8), {}

    def step(self, action):
        self.t += 1
        reward = -float(np.abs(np.asarray(action) - self.target).sum())
        return np.full((16, 16, 3), 128, np.uint8), reward, False, self.t >= 10, {}


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


class Cliff(gym.Env):
    """A grey frame; an action a[0] < 0 steps off the cliff: the episode terminates (a black frame, reward 0);
    otherwise reward 1, and a time limit of 10 steps. Random actions end most episodes early."""

    observation_space = gym.spaces.Box(0, 255, (16, 16, 3), np.uint8)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.full((16, 16, 3), 128, np.uint8), {}

    def step(self, action):
        self.t += 1
        if action[0] < 0:
            return np.zeros((16, 16, 3), np.uint8), 0.0, True, False, {}
        return np.full((16, 16, 3), 128, np.uint8), 1.0, False, self.t >= 10, {}


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


@pytest.mark.parametrize("name", shifts.MUJOCO)
@pytest.mark.parametrize("shift", ["color", "light", "camera", "distractors", "placement"])
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


def read_rows(run_dir):
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
    args = pd.Args(env="reacher", pvm=pvm, mode=mode, finetune_blocks=2, **TINY)
    state = pd.load_checkpoint(run_dir, args)
    assert state["step"] == 200 and state["updates"] > 0
    agent = pd.Dreamer(pd.make_encoder(args), 2, args)
    agent.load_state_dict(state["agent"])  # every tensor matches the freshly built model


def test_resume_continues_at_the_saved_step(tmp_path):
    run_cli([*E2E, "--run-name", "r"], tmp_path)
    run_dir = tmp_path / "r"
    first = pd.load_checkpoint(run_dir, pd.Args(env="reacher", **TINY))
    rows_before = read_rows(run_dir)
    proc = run_cli([*E2E, "--total-steps", "300", "--resume", str(run_dir)], tmp_path)
    state = pd.load_checkpoint(run_dir, pd.Args(env="reacher", **TINY))
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
    assert conds == [("random", "none", "none"), ("agent", "none", "none"), ("agent", "color", "hard"),
                     ("agent", "table", "hard")]
    assert all(r["step"] == 120 and r["seed"] == 1 and r["pvm"] == "none" and len(r["returns"]) == 1 for r in rows)
    with open(tiny_run / "shift_eval.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == ev.CSV_COLUMNS and len(table) == 4 and table[0]["policy"] == "random"
    md = (tiny_run / "shift_eval.md").read_text()
    assert "| cnn | color | hard |" in md and "| cnn | table | hard |" in md
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


@pytest.mark.parametrize("flags,needle", [(["--shifts", "fog"], "camera"), (["--severities", "extreme"], "medium"),
                                          (["--episodes", "0"], "at least 1")])
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


def test_one_evaluation_path_training_and_evaluate_py_agree(tmp_path, capsys):
    """The evaluation logged at the end of training and evaluate.py's in-distribution row score the same
    checkpoint on the same starts with the same function: the same returns, to the last digit. (pointmass has
    no shifts, so evaluate.py evaluates in distribution only, as --shifts none would.)"""
    pd.main(["--env", "pointmass", "--size", "tiny", "--image-size", "32", "--total-steps", "60", "--learning-starts",
             "30", "--batch-size", "2", "--batch-length", "8", "--eval-episodes", "2", "--logdir", str(tmp_path),
             "--run-name", "r"])
    logged = [r for r in read_rows(tmp_path / "r") if "eval/return_mean" in r]
    random_logged = next(r for r in read_rows(tmp_path / "r") if "eval/random_return_mean" in r)
    ev.main([str(tmp_path / "r"), "--episodes", "2"])
    assert "pointmass has no visual shifts" in capsys.readouterr().out
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


# --- runs that survive: crash-safe checkpoints, resume, pre-emption, NaN stop, one-line errors for bad input ---
SURVIVE = ["--env", "pointmass", "--size", "tiny", "--image-size", "32", "--batch-size", "2", "--batch-length", "8",
           "--learning-starts", "20", "--train-ratio", "4", "--eval-episodes", "1", "--eval-every", "50",
           "--log-every", "10", "--checkpoint-every", "15", "--keep-checkpoints", "2"]
PVM_TINY = ["--pvm-id", "tiny", "--pvm-random-init", "--pvm-image-size", "32"]


def main_in_process(argv, capsys):
    """pd.main in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    try:
        pd.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


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
    assert pd.load_checkpoint(run_dir, pd.Args(env="pointmass", size="tiny", image_size=32))["step"] == stopped
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
    assert proc.wait(timeout=100) == 130 and time.time() - t < 60  # the save alone would have taken 120 s
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
    a, b = states["eval"]["replay"]["data"], states["none"]["replay"]["data"]
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
    row = pd.eval_row(agent, env, env, args, tmp_path, 0)
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
        prefix = pd.add_frame(rb, agent, obs, np.zeros(2), 0.0, t == 0, False)
        # Acting on the cached prefix is acting on the frame (torch.manual_seed: the same latent sample).
        torch.manual_seed(t)
        a1, _ = pd.act(agent, obs, state, t == 0, explore=False, prefix=prefix)
        torch.manual_seed(t)
        a2, state = pd.act(agent, obs, state, t == 0, explore=False)
        np.testing.assert_allclose(a1, a2, atol=1e-5)
    with torch.no_grad():
        want = enc.prefix(torch.as_tensor(frames)).half().numpy()
    np.testing.assert_array_equal(rb.data["feat"][:12], want)
    assert rb.sample(3, 5)["feat"].shape == (3, 5, *shape)
    # The checkpointed replay holds the cache; a replay without a cache drops it; the reverse refills it.
    saved = rb.state_dict()
    assert "feat" in saved["data"]
    plain = pd.Replay(20, (32, 32, 3), 2, seed=0)
    assert plain.load_state_dict(saved) and "feat" not in plain.data
    cached = pd.Replay(20, (32, 32, 3), 2, seed=0, feat_shape=shape)
    assert not cached.load_state_dict(plain.state_dict())
    cached.fill_cache(enc, "cpu", chunk=5)
    np.testing.assert_array_equal(cached.data["feat"][:12], want)


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
    bad = subprocess.run([sys.executable, str(REPO / "bench.py"), "--only", "vgg"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "vgg" in bad.stderr


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
        args = pd.Args(env="pointmass", pvm=pvm, mode=mode, seed=int(name[-1]), **TINY)
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
