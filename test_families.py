"""Tests of the ViT families (pvm_dreamer.FAMILIES): DINOv2 with and without registers, CLIP, SigLIP, ViT and
ViT-MAE, each as a tiny randomly initialised model of the real transformers class. Shapes and features against
the model's own forward, which parameters each mode trains, the feature cache, preprocessing parity with the
family's own image processor (read back from a saved preprocessor_config.json), loading from a local directory,
and the one-line errors for a model of another family or an unsupported one. Offline, CPU."""
import numpy as np
import pytest
import torch
from PIL import Image

import pvm_dreamer as pd
from test_pvm_dreamer import fake_batch, main_in_process, read_rows, tiny_args

# (--pvm, --pvm-id): every family, and DINOv2's with-registers variant.
MODELS = [("dinov2", "tiny"), ("dinov2", "tiny-registers"), ("clip", "tiny"), ("siglip", "tiny"), ("vit", "tiny"),
          ("mae", "tiny")]
IDS = [f"{p}-{i}" for p, i in MODELS]


def build(pvm, pvm_id, mode="frozen", k=2, **kw):
    torch.manual_seed(0)
    args = tiny_args(pvm=pvm, pvm_id=pvm_id, mode=mode, finetune_blocks=k, **kw)
    return args, pd.Dreamer(pd.make_encoder(args), 2, args)


def model_kw(enc, n):
    """What the family's own forward needs to see our input: MAE's identity noise (masking off), and position
    embeddings interpolated when our size differs from the config's (not here: both 32)."""
    return {k: v for k, v in enc._model_kw(n, "cpu").items() if k == "noise"}


def test_the_family_table_is_the_pvm_choice():
    assert pd.PVMS == ("none", *pd.FAMILIES) and pd.PVM_DEFAULT_IDS["dinov2"] == "facebook/dinov2-small"
    for name, fam in pd.FAMILIES.items():  # every default checkpoint builds offline with --pvm-random-init
        arch = pd.PVM_ARCHS[fam.default_id]
        assert arch.get("model_type", next(iter(fam.models))) in fam.models, name


@pytest.mark.parametrize("pvm,pvm_id", MODELS, ids=IDS)
def test_features_are_the_models_own_outputs(pvm, pvm_id):
    """auto features follow [PVM]'s rule: patch tokens (no CLS, no registers) for DINOv2 / MAE / ViT, the pooled
    output for CLIP / SigLIP, and each equals what the transformers model itself returns."""
    _, agent = build(pvm, pvm_id, "full")
    enc, obs = agent.wm.encoder, torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    registers = 4 if pvm_id == "tiny-registers" else 0
    assert enc.skip == (0 if pvm == "siglip" else 1) + registers
    with torch.no_grad():
        ours = enc.features(obs)
        out = enc.backbone(pixel_values=enc.preprocess(obs), **model_kw(enc, 3))
    if pvm in ("clip", "siglip"):
        assert enc.features_kind == "pooled" and ours.shape == (3, 32)
        torch.testing.assert_close(ours, out.pooler_output)  # CLIP: post-norm CLS; SigLIP: attention pooling
    else:
        assert enc.features_kind == "patches" and ours.shape == (3, 16, 32)  # 32/8 = 4x4 patches
        torch.testing.assert_close(ours, out.last_hidden_state[:, enc.skip:])
    assert enc(obs[None]).shape == (1, 3, enc.out_dim)


@pytest.mark.parametrize("pvm,pvm_id", MODELS, ids=IDS)
def test_the_features_flag_overrides_the_rule(pvm, pvm_id):
    _, agent = build(pvm, pvm_id, pvm_features="patches")
    enc, obs = agent.wm.encoder, torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert enc.features(obs).shape == (2, 16, 32) and enc.prefix_shape() == (16, 32)
    with torch.no_grad():  # the final-norm patch tokens (CLIP's model applies its final norm to the CLS only)
        tokens = enc.backbone(pixel_values=enc.preprocess(obs), **model_kw(enc, 2)).last_hidden_state
        tokens = enc.final_norm(tokens) if pvm == "clip" else tokens
        torch.testing.assert_close(enc.features(obs), tokens[:, enc.skip:])
    _, agent = build(pvm, pvm_id, pvm_features="pooled")
    enc = agent.wm.encoder
    assert enc.features(obs).shape == (2, 32) and enc.prefix_shape() == (32,)
    with torch.no_grad():
        out = enc.backbone(pixel_values=enc.preprocess(obs), **model_kw(enc, 2))
    # the final-norm CLS token (SigLIP: its pooling head), which is CLIP's pooled output too
    pooled = out.pooler_output if pvm in ("clip", "siglip") else out.last_hidden_state[:, 0]
    torch.testing.assert_close(enc.features(obs), pooled)


def test_mae_keeps_every_patch_in_place():
    """MAE's encoder drops 75% of the patches at random by default; here none is dropped or moved: the features
    are the same on every call and follow a change of one patch to that patch's own token."""
    _, agent = build("mae", "tiny")
    enc = agent.wm.encoder
    assert enc.backbone.config.mask_ratio == 0.0
    obs = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        a, b = enc.features(obs), enc.features(obs)
        assert a.shape == (1, 16, 32)
        torch.testing.assert_close(a, b)
        # MAE's own forward without noise shuffles at random: two calls differ (what we avoid).
        raw = [enc.backbone(pixel_values=enc.preprocess(obs)).last_hidden_state for _ in range(2)]
        assert raw[0].shape[1] == 17 and not torch.allclose(raw[0], raw[1])


def trainable_rule(enc, name, mode, k):
    """Which backbone parameter trains in `mode`, by path: the family's blocks and final norm (+ SigLIP's
    pooling head under pooled features); never DINOv2's mask token nor MAE's fixed sin-cos embeddings."""
    root = enc.fam.root + "." if enc.fam.root else ""
    blocks = root + enc.fam.blocks + "."
    if "mask_token" in name or name == root + "embeddings.position_embeddings" and enc.pvm == "mae":
        return False
    if mode == "frozen":
        return False
    if mode == "full":
        return True
    if mode == "lora":
        return ".lora_" in name
    block = int(name[len(blocks):].split(".")[0]) if name.startswith(blocks) else None
    return block is not None and block >= len(enc.blocks) - k


@pytest.mark.parametrize("mode", ["frozen", "partial", "full", "lora"])
@pytest.mark.parametrize("pvm,pvm_id", MODELS, ids=IDS)
def test_each_mode_trains_exactly_the_intended_parameters(pvm, pvm_id, mode):
    # encoder_lr_scale 1 and three steps: LoRA's B moves in step 1, A once B is non-zero.
    args, agent = build(pvm, pvm_id, mode, encoder_lr_scale=1.0)
    enc = agent.wm.encoder
    before = {n: p.detach().clone() for n, p in enc.backbone.named_parameters()}
    opt = pd.make_optimizers(agent, args)
    for seed in range(3):
        pd.train_step(agent, opt, fake_batch(seed=seed))
    n_trained = 0
    for name, p in enc.backbone.named_parameters():
        expected = trainable_rule(enc, name, mode, 2)
        changed = not torch.equal(before[name], p.detach())
        assert p.requires_grad == expected, f"{mode}: {name} requires_grad={p.requires_grad}"
        assert changed == expected, f"{mode}: {name} changed={changed}"
        n_trained += expected
    assert (n_trained > 0) == (mode != "frozen")
    if mode == "lora":  # adapters on the query/value projections of the last 2 blocks only
        assert len(enc.lora_targets) == 4 and all(".lora_" not in n for n in before if n.startswith("embeddings"))


def test_siglip_partial_norm_trains_the_pooling_head():
    _, agent = build("siglip", "tiny", "partial", finetune_norm=True)
    enc = agent.wm.encoder
    assert all(p.requires_grad for p in enc.pool_head.parameters())
    assert all(p.requires_grad for p in enc.final_norm.parameters())
    _, agent = build("siglip", "tiny", "full", pvm_features="patches")  # the head is then never reached
    assert not any(p.requires_grad for p in agent.wm.encoder.pool_head.parameters())


@pytest.mark.parametrize("mode", ["frozen", "partial"])
@pytest.mark.parametrize("pvm,pvm_id", [m for m in MODELS if m[0] != "dinov2" or m[1] == "tiny-registers"],
                         ids=[i for i, m in zip(IDS, MODELS) if m[0] != "dinov2" or m[1] == "tiny-registers"])
def test_feature_cache_gives_the_same_embeddings(pvm, pvm_id, mode):
    """The feature cache stores `prefix` (frozen: the features; partial: the tokens before the last k blocks,
    registers included) and the trained part runs from it: the same embedding up to fp16 storage."""
    args, agent = build(pvm, pvm_id, mode)
    enc, obs = agent.wm.encoder, torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    shape = pd.feature_cache_shape(enc, args)
    assert shape == enc.prefix_shape()
    cached = enc.prefix(obs.reshape(-1, 32, 32, 3)).half().reshape(2, 3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(enc.from_prefix(cached, (2, 3)), enc(obs), atol=2e-2, rtol=0)


@pytest.mark.parametrize("pvm,pvm_id", MODELS, ids=IDS)
def test_attention_maps_for_the_probe(pvm, pvm_id):
    """probe.py's maps: the CLS token's attention to the patches (registers excluded), or, for SigLIP, its
    pooling head's query attention (which spreads over the patches alone, so it sums to 1)."""
    _, agent = build(pvm, pvm_id)
    att = agent.wm.encoder.cls_attention(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    assert att.shape == (2, 2, 4, 4) and (att >= 0).all()
    total = att.sum((-1, -2))
    if pvm == "siglip":
        torch.testing.assert_close(total, torch.ones_like(total))
    else:
        assert (total < 1).all()  # the rest goes to the CLS token (and registers)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing: each family's own image processor, saved and read back as a model directory holds it
# ---------------------------------------------------------------------------------------------------------
def hf_processors():
    from transformers import BitImageProcessor, CLIPImageProcessor, SiglipImageProcessor, ViTImageProcessor

    imagenet = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return {  # the default checkpoints' preprocessor_config.json, as published with their weights
        "dinov2": BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                    resample=Image.BICUBIC, do_center_crop=True, **imagenet),
        "clip": CLIPImageProcessor(),  # its defaults are openai/clip-vit-base-patch32's
        "siglip": SiglipImageProcessor(),  # google/siglip-base-patch16-224's: 224x224, bicubic, mean/std 0.5
        "vit": ViTImageProcessor(),  # google/vit-base-patch16-224-in21k's: 224x224, bilinear, mean/std 0.5
        "mae": ViTImageProcessor(resample=Image.BICUBIC, **imagenet),  # facebook/vit-mae-base's
    }


def smooth_image(size=64):
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)  # bicubic resampling differs by implementation at sharp edges
    img = (np.stack([np.sin(3 * xx), np.cos(2 * yy), xx * yy], -1) * 0.5 + 0.5) * 255
    return img.astype(np.uint8)


def save_model_dir(path, pvm, pvm_id="tiny", processor=None):
    """A local model directory as `huggingface-cli download` leaves it: config.json, weights, and (optionally)
    preprocessor_config.json."""
    model = pd.load_pvm(pvm, pvm_id, True)
    model.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    return model


@pytest.mark.parametrize("pvm", list(pd.FAMILIES))
def test_preprocessing_matches_the_familys_image_processor(pvm, tmp_path):
    proc = hf_processors()[pvm]
    save_model_dir(tmp_path, pvm, processor=proc)
    prep = pd.pvm_preprocessing(pvm, str(tmp_path), random_init=True)
    assert prep == pd.FAMILIES[pvm].preprocessing  # the built-in fallback is the published config
    enc = pd.PVMEncoder(pd.load_pvm(pvm, str(tmp_path), True), pvm, "frozen", 1, 224, 64, 4, preprocessing=prep)
    img = smooth_image()
    ours = enc.preprocess(torch.from_numpy(img)[None])[0].numpy()
    theirs = proc(images=Image.fromarray(img), return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert np.abs(ours - theirs).mean() < 0.02, (pvm, np.abs(ours - theirs).mean())


def test_preprocessing_is_read_from_the_config_not_assumed(tmp_path):
    """A checkpoint whose processor differs from its family's default (a 192 crop of 256, other statistics,
    bilinear) is preprocessed its own way; a directory without the file falls back and says so."""
    from transformers import BitImageProcessor

    proc = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 192, "width": 192},
                             resample=Image.BILINEAR, image_mean=[0.2, 0.3, 0.4], image_std=[0.5, 0.6, 0.7])
    save_model_dir(tmp_path / "odd", "dinov2", processor=proc)
    prep = pd.pvm_preprocessing("dinov2", str(tmp_path / "odd"), random_init=False)
    assert prep == dict(resize=256, crop=192, resample="bilinear", mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))
    enc = pd.PVMEncoder(pd.load_pvm("dinov2", str(tmp_path / "odd"), False), "dinov2", "frozen", 1, 192, 64, 4,
                        preprocessing=prep)
    img = smooth_image()
    ours = enc.preprocess(torch.from_numpy(img)[None])[0].numpy()
    theirs = proc(images=Image.fromarray(img), return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 192, 192) and np.abs(ours - theirs).mean() < 0.02
    save_model_dir(tmp_path / "bare", "vit")
    assert pd.pvm_preprocessing("vit", str(tmp_path / "bare"), random_init=False) == pd.FAMILIES["vit"].preprocessing


# ---------------------------------------------------------------------------------------------------------
# Loading: real from_pretrained from a local directory, and the one-line errors
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pvm,pvm_id", MODELS, ids=IDS)
def test_weights_load_from_a_local_directory(pvm, pvm_id, tmp_path):
    saved = save_model_dir(tmp_path, pvm, pvm_id)
    loaded = pd.load_pvm(pvm, str(tmp_path), random_init=False)
    assert type(loaded) is type(saved)
    want = saved.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_a_model_of_another_family_or_an_unsupported_one_is_one_line(tmp_path):
    save_model_dir(tmp_path / "vit", "vit")
    for random_init in (True, False):
        with pytest.raises(pd.UsageError) as e:
            pd.load_pvm("dinov2", str(tmp_path / "vit"), random_init)
        assert "\n" not in str(e.value) and "pass --pvm vit" in str(e.value)
    from transformers import SwinConfig

    SwinConfig().save_pretrained(tmp_path / "swin")  # a vision model transformers loads, but no plain ViT
    with pytest.raises(pd.UsageError) as e:
        pd.load_pvm("vit", str(tmp_path / "swin"), random_init=False)
    msg = str(e.value)
    assert "\n" not in msg and "'swin'" in msg and "cannot take apart" in msg
    assert all(t in msg for t in ("dinov2_with_registers", "siglip", "vit_mae"))  # names what is supported


def test_a_new_family_trains_end_to_end(tmp_path, capsys):
    """SigLIP (no CLS token: pooled features from its attention-pooling head) through the whole loop, partial
    fine-tuning with the feature cache, and its encoder line in the log."""
    code, out, err = main_in_process(
        ["--env", "pointmass", "--size", "tiny", "--image-size", "32", "--pvm", "siglip", "--pvm-id", "tiny",
         "--pvm-random-init", "--pvm-image-size", "32", "--mode", "partial", "--finetune-blocks", "2",
         "--total-steps", "120", "--learning-starts", "60", "--train-ratio", "64", "--batch-size", "4",
         "--batch-length", "8", "--eval-every", "0", "--log-every", "30", "--logdir", str(tmp_path),
         "--run-name", "r"], capsys)
    assert code == 0, err[-2000:]
    assert "encoder: siglip 'tiny' mode=partial (last 2 of 6 blocks)" in out
    losses = [r["wm/loss"] for r in read_rows(tmp_path / "r") if "wm/loss" in r]
    assert losses and all(np.isfinite(losses))
