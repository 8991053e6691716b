"""Tests of regularised fine-tuning (beyond the paper): --mode lora (peft adapters) and --l2sp. Offline, CPU,
on tiny randomly initialised ViTs of the real DINOv2 / CLIP architectures."""
import argparse
import json

import numpy as np
import pytest
import torch

import evaluate as ev
import probe
import pvm_dreamer as pd
import runtime
from test_pvm_dreamer import fake_batch, main_in_process, read_rows, tiny_args, tiny_pvm, wm_losses_and_grads

BLOCKS = {"dinov2": "encoder.layer", "clip": "vision_model.encoder.layers"}


def block_of(pvm: str, name: str) -> int | None:
    prefix = BLOCKS[pvm] + "."
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


# ---------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pvm", ["dinov2", "clip"])
@pytest.mark.parametrize("targets,blocks", [("qv", "last-k"), ("attn", "last-k"), ("attn-mlp", "all")])
def test_lora_trains_every_adapter_and_no_pretrained_weight(pvm, targets, blocks):
    # encoder_lr_scale 1: the adapters move visibly in three steps (B moves in step 1, A once B is non-zero).
    args, agent = tiny_pvm(pvm, "lora", k=2, lora_targets=targets, lora_blocks=blocks, encoder_lr_scale=1.0)
    enc = agent.wm.encoder
    depth = len(enc.blocks)
    first = 0 if blocks == "all" else depth - 2
    before = {n: p.detach().clone() for n, p in enc.backbone.named_parameters()}
    opt = pd.make_optimizers(agent, args)
    for seed in range(3):
        pd.train_step(agent, opt, fake_batch(seed=seed))
    adapters = [n for n in before if ".lora_" in n]
    assert adapters, "no adapter was injected"
    for name, p in enc.backbone.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (".lora_" in name), f"{name} changed={changed}"
        assert p.requires_grad == (".lora_" in name)
    # The adapters sit exactly where the flags put them: the chosen blocks, the chosen layer kinds.
    layers = {n.split(".lora_")[0] for n in adapters}
    assert {block_of(pvm, n) for n in layers} == set(range(first, depth))
    leaves = {n.split(".")[-1] for n in layers}
    if targets == "qv":
        assert leaves == ({"query", "value"} if pvm == "dinov2" else {"q_proj", "v_proj"})
    elif targets == "attn":
        assert all("attention" in n or "attn" in n for n in layers) and len(leaves) == 4  # q, k, v, out
    else:
        assert any("mlp" in n or "intermediate" in n for n in layers)
    # r x (in + out) per adapted layer
    r, width = args.lora_rank, enc.backbone.config.hidden_size
    assert all(p.shape[0] == r or p.shape[1] == r for n, p in enc.backbone.named_parameters() if ".lora_" in n)
    if targets == "qv":
        assert sum(p.numel() for n, p in enc.backbone.named_parameters() if ".lora_" in n) == \
            (depth - first) * 2 * r * 2 * width
    # The optimiser's PVM group is exactly the adapters, at wm_lr * encoder_lr_scale.
    group = opt["wm"].param_groups[1]
    assert {id(p) for p in group["params"]} == {id(p) for n, p in enc.backbone.named_parameters() if ".lora_" in n}
    assert group["lr"] == pytest.approx(args.wm_lr * args.encoder_lr_scale)


@pytest.mark.parametrize("pvm", ["dinov2", "clip"])
def test_lora_starts_as_the_pretrained_model_and_then_departs(pvm):
    _, frozen = tiny_pvm(pvm, "frozen")
    _, lora = tiny_pvm(pvm, "lora", k=2)
    obs = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        base, adapted = frozen.wm.encoder.features(obs), lora.wm.encoder.features(obs)
        torch.testing.assert_close(adapted, base, rtol=0, atol=1e-6)  # B = 0: the adapters add exactly nothing
        for n, p in lora.wm.encoder.backbone.named_parameters():
            if ".lora_B" in n:
                p.normal_(0, 0.5)  # ... and they are on the forward path: a non-zero B changes the output
        assert (lora.wm.encoder.features(obs) - base).abs().max() > 1e-3


def test_lora_dropout_runs_only_in_training_mode():
    _, agent = tiny_pvm("dinov2", "lora", k=2, lora_dropout=0.5)
    enc = agent.wm.encoder
    assert enc.lora_dropouts and not enc.backbone.training  # the ViT's own dropout stays off
    enc.train()
    assert all(m.training for m in enc.lora_dropouts)
    enc.eval()
    assert not any(m.training for m in enc.lora_dropouts)


@pytest.mark.parametrize("blocks", ["last-k", "all"])
def test_lora_feature_cache_caches_the_frozen_prefix(blocks):
    args, agent = tiny_pvm("clip", "lora", k=2, lora_blocks=blocks)
    enc = agent.wm.encoder
    assert enc.trained_blocks == (2 if blocks == "last-k" else len(enc.blocks))
    assert pd.feature_cache_shape(enc, args) == enc.prefix_shape() == (1 + 16, 32)
    for n, p in enc.backbone.named_parameters():
        if ".lora_B" in n:
            torch.nn.init.normal_(p, 0, 0.1)  # a trained adapter, so that its gradient reaches A too
    batch = fake_batch()
    with torch.no_grad():
        feat = enc.prefix(batch["image"].flatten(0, 1)).half()
    ref_losses, ref_grads = wm_losses_and_grads(agent, batch)
    losses, grads = wm_losses_and_grads(agent, {**batch, "feat": feat.reshape(2, 8, *feat.shape[1:])})
    for k in ref_losses:
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=2e-3, atol=2e-3, msg=k)
    assert grads.keys() == ref_grads.keys() and any(".lora_A" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=2e-2, atol=1e-3 * ref_grads[n].abs().max().item() + 1e-6,
                                   msg=n)


def test_lora_bad_flags_are_one_line():
    with pytest.raises(pd.UsageError, match="finetune-blocks 9"):
        tiny_pvm("dinov2", "lora", k=9)
    for bad, match in ((dict(lora_rank=0), "--lora-rank 0"), (dict(lora_dropout=1.0), "--lora-dropout"),
                       (dict(lora_targets="mlp"), "unknown --lora-targets"), (dict(l2sp=-1.0), "--l2sp -1")):
        with pytest.raises(pd.UsageError, match=match):
            pd.check_args(tiny_args(pvm="dinov2", mode="partial", **bad))


# ---------------------------------------------------------------------------------------------------------
# L2-SP
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pvm,mode", [("dinov2", "partial"), ("clip", "full")])
def test_l2sp_is_zero_at_start_grows_with_training_and_pulls_back(pvm, mode):
    weight = 0.5
    args, agent = tiny_pvm(pvm, mode, k=2, l2sp=weight, encoder_lr_scale=1.0)
    enc = agent.wm.encoder
    trainable = {n for n, p in enc.backbone.named_parameters() if p.requires_grad}
    assert set(enc.l2sp_names) == trainable and trainable
    assert enc.l2sp_penalty().item() == 0.0
    opt = pd.make_optimizers(agent, args)
    m = pd.train_step(agent, opt, fake_batch())
    assert m["wm/loss_l2sp"] == 0.0
    for seed in range(1, 4):
        m = pd.train_step(agent, opt, fake_batch(seed=seed))
    params = dict(enc.backbone.named_parameters())
    anchor = {n: getattr(enc.anchor, n.replace(".", "__")) for n in enc.l2sp_names}
    want = weight / 2 * sum((params[n] - anchor[n]).pow(2).sum() for n in anchor).item()
    assert m["wm/loss_l2sp"] > 0 and enc.l2sp_penalty().item() == pytest.approx(want, rel=1e-5)
    # The penalty's gradient is a * (theta - theta_0): a descent step on it moves every weight back.
    agent.zero_grad(set_to_none=True)
    enc.l2sp_penalty().backward()
    dist = sum((params[n] - anchor[n]).pow(2).sum() for n in anchor).item()
    for n in anchor:
        torch.testing.assert_close(params[n].grad, weight * (params[n] - anchor[n]).detach())
    with torch.no_grad():
        for n in anchor:
            params[n] -= 0.1 * params[n].grad
    assert sum((params[n] - anchor[n]).pow(2).sum() for n in anchor).item() < dist
    # The anchor is the pre-trained weights, not whatever a fresh build gets: it travels in the state dict.
    _, other = tiny_pvm(pvm, mode, k=2, l2sp=weight)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(agent.state_dict())
    assert other.wm.encoder.l2sp_penalty().item() == pytest.approx(enc.l2sp_penalty().item(), rel=1e-6)


def test_l2sp_needs_weights_that_move():
    for kw in (dict(pvm="none"), dict(pvm="dinov2", mode="frozen"), dict(pvm="dinov2", mode="lora")):
        with pytest.raises(pd.UsageError, match="--l2sp applies to"):
            pd.check_args(tiny_args(l2sp=0.1, **kw))
    pd.check_args(tiny_args(pvm="dinov2", mode="full", l2sp=0.1))


# ---------------------------------------------------------------------------------------------------------
# A LoRA run: trains, logs its parameter counts, resumes, and evaluate.py / probe.py load its adapters
# ---------------------------------------------------------------------------------------------------------
LORA_RUN = ["--env", "pointmass", "--size", "tiny", "--image-size", "32", "--pvm", "dinov2", "--mode", "lora",
            "--pvm-id", "tiny", "--pvm-random-init", "--pvm-image-size", "32", "--finetune-blocks", "2",
            "--encoder-lr-scale", "1", "--batch-size", "2", "--batch-length", "8", "--learning-starts", "20",
            "--train-ratio", "8", "--eval-episodes", "1", "--eval-every", "0", "--log-every", "10",
            "--checkpoint-every", "20"]


def test_a_lora_run_resumes_and_its_adapters_reach_evaluate_and_probe(tmp_path, capsys):
    flags = [*LORA_RUN, "--logdir", str(tmp_path), "--run-name", "r"]
    code, out, err = main_in_process([*flags, "--total-steps", "40"], capsys)
    assert code == 0, err
    assert "mode=lora (rank 8 on 4 qv layers of the last 2 of 6 blocks)" in out and "trainable" in out
    assert "device cpu: --precision fp32, --grad-checkpoint off" in out  # what auto means on a CPU
    run_dir = tmp_path / "r"
    state = pd.load_checkpoint(run_dir, runtime.parse_cli(pd.Args, [*flags, "--total-steps", "40"]))
    assert (state["args"]["precision"], state["args"]["grad_checkpoint"]) == ("fp32", "off")  # recorded, not "auto"
    saved = state["agent"]
    lora_keys = [k for k in saved if ".lora_" in k]
    assert len(lora_keys) == 8 and state["updates"] > 0
    assert any(saved[k].abs().sum() > 0 for k in lora_keys if ".lora_B" in k)  # they trained
    code, out, err = main_in_process([*flags, "--total-steps", "60", "--resume", str(run_dir)], capsys)
    assert code == 0, err
    resumed = pd.load_checkpoint(run_dir, runtime.parse_cli(pd.Args, [*flags, "--total-steps", "60"]))
    assert resumed["step"] == 60 and resumed["updates"] > state["updates"]
    assert any(not torch.equal(resumed["agent"][k], saved[k]) for k in lora_keys)  # training went on from them
    base = [k for k in saved if k.startswith("wm.encoder.backbone.") and ".lora_" not in k]
    assert all(torch.equal(resumed["agent"][k], saved[k]) for k in base)  # the pre-trained weights never moved
    assert any(r.get("eval/return_mean") is not None for r in read_rows(run_dir))
    # evaluate.py and probe.py rebuild the adapted encoder from the checkpoint's flags.
    agent, args, _, _ = ev.load_agent(run_dir, "cpu")
    assert args.mode == "lora"
    got = agent.state_dict()
    assert all(torch.equal(got[k], resumed["agent"][k]) for k in lora_keys)
    a = argparse.Namespace(checkpoint=str(run_dir), device="cpu", pvm="", env="pointmass", image_size=32)
    enc, pvm, random_init = probe.build_encoder(a)
    assert pvm == "dinov2" and random_init and any(".lora_" in n for n, _ in enc.backbone.named_parameters())
    json.dumps(enc.lora_targets)  # plain names
    assert np.isfinite(enc.cls_attention(torch.zeros(1, 32, 32, 3, dtype=torch.uint8)).numpy()).all()


# ---------------------------------------------------------------------------------------------------------
# --grad-checkpoint: activation checkpointing of the ViT blocks that train
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pvm, mode", [("dinov2", "partial"), ("dinov2", "full"), ("clip", "lora")])
def test_grad_checkpoint_changes_no_number_and_keeps_fewer_activations(pvm, mode):
    """Same weights, same batch, fp32: the world-model losses and every gradient are those of the run without
    checkpointing (to 1e-5), with per-block checkpoints (on) and with groups of them checkpointed again (nested),
    while the tensors kept for the backward pass (counted with saved_tensors_hooks: what a backward pass holds in
    memory) are fewer bytes, and fewer again when nested (one group input instead of the 2 trained blocks')."""
    out = {}
    for ckpt in ("off", "on", "nested"):
        _, agent = tiny_pvm(pvm, mode, k=2, grad_checkpoint=ckpt)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out[ckpt] = wm_losses_and_grads(agent, fake_batch())
        out[ckpt] += (saved[0],)
    (l0, g0, bytes0) = out["off"]
    for ckpt in ("on", "nested"):
        l1, g1, _ = out[ckpt]
        for k in l0:
            torch.testing.assert_close(l1[k], l0[k], rtol=1e-5, atol=1e-6, msg=f"{ckpt} {k}")
        assert g0.keys() == g1.keys() and any(k.startswith("encoder.backbone") for k in g0)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6, msg=f"{ckpt} {k}")
    assert out["nested"][2] < out["on"][2] < bytes0, {k: v[2] for k, v in out.items()}


def test_auto_precision_and_checkpointing_follow_the_device_and_the_mode(monkeypatch):
    """--precision auto: bf16 on a CUDA GPU with bf16, fp32 elsewhere; --grad-checkpoint auto: on where a ViT
    trains on CUDA, off for the CNN, a frozen ViT and on a CPU. Explicit values are kept, and a checkpoint's old
    boolean --grad-checkpoint still reads."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    decide = lambda dev, **kw: (lambda a: (a.precision, a.grad_checkpoint))(pd.for_device(pd.Args(**kw), dev))  # noqa: E731
    assert decide(cpu, pvm="dinov2", mode="full") == ("fp32", "off")
    for mode in ("partial", "full", "lora"):
        assert decide(cuda, pvm="dinov2", mode=mode) == ("bf16", "on")
    assert decide(cuda, pvm="dinov2", mode="frozen") == ("bf16", "off") == decide(cuda, pvm="none")
    assert decide(cuda, pvm="clip", mode="full", precision="fp32", grad_checkpoint="off") == ("fp32", "off")
    assert decide(cpu, pvm="clip", mode="full", precision="bf16", grad_checkpoint="on") == ("bf16", "on")
    assert decide(cpu, grad_checkpoint=True)[1] == "on" and decide(cuda, grad_checkpoint=False)[1] == "off"
    assert decide(cuda, pvm="dinov2", mode="full", grad_checkpoint="nested")[1] == "nested"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert decide(cuda, pvm="dinov2", mode="partial") == ("fp32", "on")
    # what the encoder is built with: auto on this CPU means no checkpointing
    assert pd.make_encoder(tiny_args(pvm="dinov2", mode="full")).grad_checkpoint == "off"
    assert pd.make_encoder(tiny_args(pvm="dinov2", mode="full", grad_checkpoint="on")).grad_checkpoint == "on"
