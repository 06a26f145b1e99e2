"""The video tokenizers: shapes, the decoder input path, the fast decoder, checkpoints, training on real frames."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLE_DATA

from rlvrw import ops
from rlvrw.models import CompressiveTokenizer, FrameTokenizer, checkpoints
from rlvrw.models.tokenizer import decoder_frames_per_batch
from rlvrw.models.tokenizer_train import TrainConfig, clamp_where_saturated, load_frames, reconstruction_psnr, \
    train_tokenizer, unstable_code_loss

BAIR = EXAMPLE_DATA / "video" / "bair_sample.npz"
SMALL = dict(channels=(32, 64, 64), num_groups=16, latent_channels=16)  # 64x64 frames -> 16x16 ids
SMALL_COMPRESSIVE = dict(frame_size=(64, 64), **SMALL, attention_max_side=16)  # 16x16 context, 4x4 per future frame


@pytest.fixture(scope="module")
def frame_tokenizer():
    torch.manual_seed(0)
    return FrameTokenizer(**SMALL).eval()


# ---- shapes ----------------------------------------------------------------------------------------------------------


def test_frame_tokenizer_shapes(frame_tokenizer):
    frames = torch.rand(2, 3, 3, 64, 64)
    ids = frame_tokenizer.encode(frames)
    assert ids.shape == (2, 3, 16, 16) and ids.dtype == torch.int64
    assert 0 <= ids.min() and ids.max() < 4375
    out = frame_tokenizer.decode(ids)
    assert out.shape == frames.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert torch.equal(frame_tokenizer.encode(frames[0]), ids[0])  # (N, 3, H, W) works alike


def test_paper_sizes_are_the_default():
    """256x320 -> 16x20 = 320 ids with the paper's plan; the compressive one: 32x40 context, 8x10 per future frame.
    Shapes only (meta tensors): building the weights of both would take seconds for nothing."""
    with torch.device("meta"):
        frame = FrameTokenizer()
        compressive = CompressiveTokenizer()
        latents = frame.encoder.conv_in.weight.new_empty(1, 3, 256, 320)
        assert frame.encoder(latents).shape == (1, 64, 16, 20)
    assert frame.downsample_factor == 16 and frame.codebook_size == 4375
    assert [s.resnets[0].conv1.out_channels for s in frame.encoder.stages] == [128, 256, 256, 512, 768]
    assert frame.quant_in.out_channels == 5 and frame.quant_out.in_channels == 5
    assert compressive.context_grid == (32, 40) and compressive.future_grid == (8, 10)
    assert list(compressive.future_encoder.cross_attentions) == ["2", "3"]  # the 32x40 stages
    assert list(compressive.future_decoder.cross_attentions) == ["mid"]


def test_compressive_tokenizer_shapes():
    tokenizer = CompressiveTokenizer(**SMALL_COMPRESSIVE).eval()
    context, future = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 3, 64, 64)
    context_ids, future_ids = tokenizer.encode(context, future)
    assert context_ids.shape == (2, 16, 16) and future_ids.shape == (2, 3, 4, 4)
    context_out, future_out = tokenizer.decode(context_ids, future_ids)
    assert context_out.shape == context.shape and future_out.shape == future.shape
    assert 0 <= future_out.min() and future_out.max() <= 1


def test_compressive_future_frames_attend_to_their_own_context():
    """Future frames of clip b see context b only: decoding one clip alone gives what it gave in a batch."""
    torch.manual_seed(1)
    tokenizer = CompressiveTokenizer(**SMALL_COMPRESSIVE).eval()
    blocks = [*tokenizer.future_encoder.cross_attentions.values(), *tokenizer.future_decoder.cross_attentions.values()]
    for block in blocks:
        torch.nn.init.normal_(block.kv_pos, std=0.5)  # positions matter, as after training
    context, future = torch.rand(3, 3, 64, 64), torch.rand(3, 2, 3, 64, 64)
    context_ids, future_ids = tokenizer.encode(context, future)
    assert torch.equal(tokenizer.encode(context[1:2], future[1:2])[1], future_ids[1:2])
    _, together = tokenizer.decode(context_ids, future_ids)
    _, alone = tokenizer.decode(context_ids[1:2], future_ids[1:2])
    torch.testing.assert_close(alone, together[1:2], atol=1e-5, rtol=0)
    # and the context does matter
    _, other = tokenizer.decode(context_ids[[0, 0, 2]], future_ids)
    assert (other[1] - together[1]).abs().max() > 1e-3


def test_bad_input_raises_value_error(frame_tokenizer):
    with pytest.raises(ValueError, match="frames"):
        frame_tokenizer.encode(torch.rand(2, 3, 62, 64))  # not a multiple of 4
    with pytest.raises(ValueError, match="frames"):
        frame_tokenizer.encode(torch.randint(0, 255, (2, 3, 64, 64)))
    with pytest.raises(ValueError, match="ids"):
        frame_tokenizer.decode(torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="num_groups"):
        FrameTokenizer(channels=(32, 48), num_groups=32)
    with pytest.raises(ValueError, match="frame_size"):
        CompressiveTokenizer(frame_size=(64, 60), channels=(32, 64, 64), num_groups=16)
    with pytest.raises(ValueError, match="frames_per_batch"):
        frame_tokenizer.decode_fast(torch.zeros(1, 16, 16, dtype=torch.long), frames_per_batch=0)


# ---- the decoder's input path and its fast path ----------------------------------------------------------------------


def test_fsq_dequantize_is_codes_then_the_conv(frame_tokenizer):
    ids = torch.randint(0, 4375, (3, 16, 16))
    plain = frame_tokenizer.dequantize(ids)  # codes -> 1x1 conv, NCHW
    gathered = ops.fsq_dequantize(ids, frame_tokenizer.levels, frame_tokenizer.quant_out.weight,
                                  frame_tokenizer.quant_out.bias)
    torch.testing.assert_close(gathered.permute(0, 3, 1, 2), plain, atol=1e-6, rtol=1e-5)


def test_encode_then_codes_round_trip(frame_tokenizer):
    """The ids encode returns are those of the codes FSQ produced (codes -> ids -> codes is exact)."""
    frames = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        z = frame_tokenizer.quant_in(frame_tokenizer.encoder(frames)).movedim(1, -1)
    codes, _ = ops.fsq_quantize(z, frame_tokenizer.levels)
    assert torch.equal(ops.fsq_codes_to_indices(codes, frame_tokenizer.levels).long(), frame_tokenizer.encode(frames))


@pytest.mark.parametrize("frames_per_batch", [None, 3])
def test_fast_decode_matches_plain_decode(frame_tokenizer, frames_per_batch):
    """Within bf16 tolerance: no further from the float32 decode than the plain decoder cast to bf16 is."""
    ids = torch.randint(0, 4375, (2, 4, 16, 16))
    plain = frame_tokenizer.decode(ids)
    fast = frame_tokenizer.decode_fast(ids, frames_per_batch=frames_per_batch)
    assert fast.shape == plain.shape and fast.dtype == torch.float32
    bf16 = FrameTokenizer(**SMALL).eval()
    bf16.load_state_dict(frame_tokenizer.state_dict())
    bf16_error = (bf16.to(torch.bfloat16).decode(ids).float() - plain).abs()
    error = (fast - plain).abs()
    assert error.max() <= 1.5 * bf16_error.max() and error.mean() <= 1.5 * bf16_error.mean()
    assert error.mean() < 5e-3  # of a [0, 1] pixel
    torch.testing.assert_close(frame_tokenizer.decode_fast(ids, dtype=torch.float32), plain, atol=1e-4, rtol=0)


def test_compressive_fast_decode_matches_plain_decode():
    torch.manual_seed(0)
    tokenizer = CompressiveTokenizer(**SMALL_COMPRESSIVE).eval()
    context_ids, future_ids = torch.randint(0, 4375, (3, 16, 16)), torch.randint(0, 4375, (3, 2, 4, 4))
    plain = tokenizer.decode(context_ids, future_ids)
    fast = tokenizer.decode_fast(context_ids, future_ids, clips_per_batch=2)
    bf16 = CompressiveTokenizer(**SMALL_COMPRESSIVE).eval()
    bf16.load_state_dict(tokenizer.state_dict())
    bf16_out = bf16.to(torch.bfloat16).decode(context_ids, future_ids)
    for f, p, b in zip(fast, plain, bf16_out):
        assert f.shape == p.shape and f.dtype == torch.float32
        error, bf16_error = (f - p).abs(), (b.float() - p).abs()
        assert error.max() <= 1.5 * bf16_error.max() and error.mean() <= 1.5 * bf16_error.mean()
    float32 = tokenizer.decode_fast(context_ids, future_ids, dtype=torch.float32)
    for f, p in zip(float32, plain):
        torch.testing.assert_close(f, p, atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_fast_decode_on_gpu_stays_on_device_and_matches(monkeypatch):
    torch.manual_seed(0)
    tokenizer = FrameTokenizer().cuda().eval()
    ids = torch.randint(0, 4375, (8, 16, 20), device="cuda")
    plain = tokenizer.decode(ids)
    fast = tokenizer.decode_fast(ids)  # also warms the dequantization table's cache
    assert fast.device.type == "cuda" and fast.shape == (8, 3, 256, 320)
    assert (fast - plain).abs().mean() < 5e-3
    assert decoder_frames_per_batch(tokenizer.channels, (16, 20), torch.device("cuda"), torch.bfloat16) >= 8
    # with the ids' range check off, nothing waits for the host: no synchronizing call at all
    monkeypatch.setattr("rlvrw.ops._checks._value_checks", False)  # ops.set_value_checks(False), undone after
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokenizer.decode_fast(ids, frames_per_batch=3)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- checkpoints -----------------------------------------------------------------------------------------------------


def test_own_checkpoint_round_trip(tmp_path, frame_tokenizer):
    path = checkpoints.save_tokenizer(frame_tokenizer, tmp_path / "tok.safetensors", {"note": "test"})
    assert not [p for p in tmp_path.iterdir() if p.name != "tok.safetensors"]  # no temporary file left
    loaded = checkpoints.load_tokenizer(path)
    assert isinstance(loaded, FrameTokenizer) and loaded.config == frame_tokenizer.config
    ids = torch.randint(0, 4375, (1, 16, 16))
    assert torch.equal(loaded.decode(ids), frame_tokenizer.decode(ids))


def test_own_checkpoint_without_safetensors(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "safetensors_available", lambda: False)
    tokenizer = CompressiveTokenizer(**SMALL_COMPRESSIVE)
    path = checkpoints.save_tokenizer(tokenizer, tmp_path / "tok.pt")
    loaded = checkpoints.load_tokenizer(path)
    assert isinstance(loaded, CompressiveTokenizer) and loaded.config == tokenizer.config
    for name, value in tokenizer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def diffusers_vae_shapes(prefix, channels, layers, latent, decoder):
    """Names and shapes of a diffusers ``Encoder`` / ``Decoder`` (the reference tokenizer's CNNEncoder / CNNDecoder),
    written out from diffusers' block layout: ``down_blocks.i`` with ``layers`` resnets and a ``downsamplers.0.conv``
    but in the last; ``up_blocks.i`` widest first with ``layers + 1`` resnets and ``upsamplers.0.conv`` but in the
    last; ``conv_shortcut`` where a resnet changes width; ``mid_block`` with two resnets and one attention."""
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cin, cout, 1)

    def mid(c):
        resnet(f"{prefix}.mid_block.resnets.0", c, c), resnet(f"{prefix}.mid_block.resnets.1", c, c)
        norm(f"{prefix}.mid_block.attentions.0.group_norm", c)
        for p in ("to_q", "to_k", "to_v", "to_out.0"):
            name = f"{prefix}.mid_block.attentions.0.{p}"
            shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c, c), (c,)

    if not decoder:
        conv(f"{prefix}.conv_in", 3, channels[0], 3)
        for i, c in enumerate(channels):
            for j in range(layers):
                resnet(f"{prefix}.down_blocks.{i}.resnets.{j}", channels[max(i - 1, 0)] if j == 0 else c, c)
            if i < len(channels) - 1:
                conv(f"{prefix}.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
        mid(channels[-1])
        norm(f"{prefix}.conv_norm_out", channels[-1]), conv(f"{prefix}.conv_out", channels[-1], latent, 3)
    else:
        rev = list(reversed(channels))
        conv(f"{prefix}.conv_in", latent, rev[0], 3)
        mid(rev[0])
        for i, c in enumerate(rev):
            for j in range(layers + 1):
                resnet(f"{prefix}.up_blocks.{i}.resnets.{j}", rev[max(i - 1, 0)] if j == 0 else c, c)
            if i < len(rev) - 1:
                conv(f"{prefix}.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
        norm(f"{prefix}.conv_norm_out", channels[0]), conv(f"{prefix}.conv_out", channels[0], 3, 3)
    return shapes


def write_reference_dir(path, config, shapes):
    gen = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=gen) * 0.05 for name, shape in shapes.items()}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if checkpoints.safetensors_available():
        from safetensors.torch import save_file

        save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(state, path / "diffusion_pytorch_model.bin")
    return state


def test_loads_reference_frame_tokenizer_layout(tmp_path):
    """A CNNFSQModel256-style directory (config.json + weights with diffusers names) loads, every tensor in place."""
    channels, layers, latent = (32, 64, 64), 2, 16
    shapes = {**diffusers_vae_shapes("encoder", channels, layers, latent, decoder=False),
              **diffusers_vae_shapes("decoder", channels, layers, latent, decoder=True),
              "quant_linear.weight": (5, latent, 1, 1), "quant_linear.bias": (5,),
              "post_quant_linear.weight": (latent, 5, 1, 1), "post_quant_linear.bias": (latent,)}
    config = {"_class_name": "CNNFSQModel256", "block_out_channels": list(channels), "layers_per_block": layers,
              "latent_channels": latent, "norm_num_groups": 16, "fsq_levels": 12, "act_fn": "silu"}
    state = write_reference_dir(tmp_path / "tokenizer", config, shapes)
    model = checkpoints.load_pretrained_frame_tokenizer(tmp_path)
    assert model.levels == (7, 5, 5, 5, 5)
    own = model.state_dict()
    assert len(own) == len(state)
    assert torch.equal(own["encoder.stages.1.resnets.0.shortcut.weight"],
                       state["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"])
    assert torch.equal(own["decoder.mid.attention.attention.to_out.weight"],
                       state["decoder.mid_block.attentions.0.to_out.0.weight"])
    assert torch.equal(own["decoder.stages.1.resample.conv.bias"], state["decoder.up_blocks.1.upsamplers.0.conv.bias"])
    assert torch.equal(own["quant_out.weight"], state["post_quant_linear.weight"])


def test_reference_layout_mismatch_names_the_parameters(tmp_path):
    shapes = {**diffusers_vae_shapes("encoder", (32, 64), 2, 16, decoder=False),
              **diffusers_vae_shapes("decoder", (32, 64), 2, 16, decoder=True)}
    config = {"block_out_channels": [32, 64], "latent_channels": 16, "norm_num_groups": 16}
    write_reference_dir(tmp_path, config, shapes)  # no quant_linear / post_quant_linear
    with pytest.raises(ValueError, match="missing 4: quant_in.bias"):
        checkpoints.load_pretrained_frame_tokenizer(tmp_path)


def test_missing_reference_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download thuml/rt1-frame-tokenizer"):
        checkpoints.load_pretrained_frame_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="thuml/rt1-compressive-tokenizer"):
        checkpoints.load_pretrained_compressive_tokenizer(tmp_path)


def test_loads_reference_compressive_tokenizer_layout(tmp_path):
    """iVideoGPT CompressiveVQModel layout: cross_att_blocks (nn.MultiheadAttention, packed in_proj) in order."""
    channels, layers, latent, p = (32, 64, 64), 2, 16, 4
    shapes = {}
    for prefix, decoder in (("encoder", False), ("cond_encoder", False), ("decoder", True), ("cond_decoder", True)):
        shapes.update(diffusers_vae_shapes(prefix, channels, layers, latent, decoder))
    # encoder stages at 32x32, 16x16, 16x16: attention at the two 16x16 ones; decoder: after the 16x16 mid block
    for prefix, blocks in (("cond_encoder", [(64, 256), (64, 256)]), ("cond_decoder", [(64, 256)])):
        for k, (c, positions) in enumerate(blocks):
            name = f"{prefix}.cross_att_blocks.{k}"
            for n in ("q_norm", "kv_norm"):
                shapes[f"{name}.{n}.weight"] = shapes[f"{name}.{n}.bias"] = (c,)
            shapes[f"{name}.q_pos_emb"] = shapes[f"{name}.kv_pos_emb"] = (positions, c)
            shapes[f"{name}.att.in_proj_weight"], shapes[f"{name}.att.in_proj_bias"] = (3 * c, c), (3 * c,)
            shapes[f"{name}.att.out_proj.weight"], shapes[f"{name}.att.out_proj.bias"] = (c, c), (c,)
    shapes.update({"quant_conv.weight": (5, latent, 1, 1), "quant_conv.bias": (5,),
                   "post_quant_conv.weight": (latent, 5, 1, 1), "post_quant_conv.bias": (latent,),
                   "quant_linear.weight": (5, latent * p * p), "quant_linear.bias": (5,),
                   "post_quant_linear.weight": (latent * p * p, 5), "post_quant_linear.bias": (latent * p * p,)})
    config = {"block_out_channels": list(channels), "layers_per_block": layers, "latent_channels": latent,
              "norm_num_groups": 16, "fsq_levels": [7, 5, 5, 5, 5], "patch_size": p, "max_att_resolution": 16,
              "context_length": 1}
    state = write_reference_dir(tmp_path, config, shapes)
    model = checkpoints.load_pretrained_compressive_tokenizer(tmp_path, frame_size=(64, 64))
    own = model.state_dict()
    packed = state["cond_encoder.cross_att_blocks.1.att.in_proj_weight"]
    assert torch.equal(own["future_encoder.cross_attentions.2.attention.to_k.weight"], packed[64:128])
    assert torch.equal(own["future_decoder.cross_attentions.mid.kv_pos"],
                       state["cond_decoder.cross_att_blocks.0.kv_pos_emb"])
    assert torch.equal(own["future_quant_out.weight"], state["post_quant_linear.weight"])


def test_reference_layout_matches_diffusers_numerically():
    """Where diffusers is installed: its randomly initialised VAE Encoder / Decoder, loaded through the name mapping,
    compute what ours compute."""
    vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    torch.manual_seed(0)
    channels = (32, 64, 64)
    kwargs = dict(block_out_channels=channels, layers_per_block=2, norm_num_groups=16)
    encoder = vae.Encoder(in_channels=3, out_channels=16, down_block_types=("DownEncoderBlock2D",) * 3,
                          double_z=False, **kwargs).eval()
    decoder = vae.Decoder(in_channels=16, out_channels=3, up_block_types=("UpDecoderBlock2D",) * 3, **kwargs).eval()
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    for name, shape in (("quant_linear", (5, 16, 1, 1)), ("post_quant_linear", (16, 5, 1, 1))):
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.randn(shape), torch.randn(shape[0])
    model = checkpoints.load_reference_state_dict(FrameTokenizer(**SMALL), state).eval()
    frames, latents = torch.rand(2, 3, 64, 64), torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(frames), encoder(frames), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.decoder(latents), decoder(latents), atol=1e-4, rtol=1e-4)


# ---- training on real frames -----------------------------------------------------------------------------------------


def test_overfits_a_handful_of_real_frames():
    """A small tokenizer learns 4 real BAIR frames (at 32x32, to fit a CPU minute with room to spare) far past the blur
    baseline: each 4x4 block's mean colour, upsampled, i.e. 48 floats where the tokenizer keeps one id."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core machine shared with other jobs: one thread is faster than two fighting
    try:
        torch.manual_seed(0)
        frames = load_frames(BAIR, size=(32, 32))[:4]
        model = FrameTokenizer(channels=(16, 32, 32), layers_per_block=1, num_groups=8, latent_channels=16)
        config = TrainConfig(steps=300, batch_size=4, lr=3e-3, warmup_steps=20, log_every=300)
        history = train_tokenizer(model, frames, config, log=None)
        result = reconstruction_psnr(model, frames)
    finally:
        torch.set_num_threads(threads)
    assert history[-1]["seconds"] < 60
    assert result["psnr"] > result["blur_psnr"] + 5.0, result


def test_compressive_tokenizer_learns_real_clips():
    """A small compressive tokenizer trained on clips of 8 real BAIR frames (context first) codes each future frame in
    2x2 ids far better than the blur that keeps one number per id, and no worse than copying the context frame."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        frames = load_frames(BAIR, size=(32, 32))[:8]
        clips = torch.arange(8)[None]  # one clip: frame 0 is the context, frames 1..7 are coded against it
        model = CompressiveTokenizer(frame_size=(32, 32), channels=(16, 32, 32), layers_per_block=1, num_groups=8,
                                     latent_channels=16, patch_size=4, attention_max_side=8)
        config = TrainConfig(steps=200, batch_size=2, lr=3e-3, warmup_steps=20, future_frames=3, log_every=200)
        history = train_tokenizer(model, frames, config, log=None, clips=clips)
        result = reconstruction_psnr(model, frames, clips)
    finally:
        torch.set_num_threads(threads)
    assert history[-1]["seconds"] < 60
    assert result["clips"] == 1
    assert result["psnr"] > result["blur_psnr"] + 5.0, result
    assert result["psnr"] > result["copy_context_psnr"], result
    assert result["context_psnr"] > result["blur_psnr"], result


def test_compressive_batches_are_a_clips_context_then_distinct_future_frames():
    """Frames whose colour is their index: every group of 1 + future_frames frames the loss sees is a clip's context
    frame followed by distinct future frames of that same clip."""
    frames = torch.arange(12, dtype=torch.uint8)[:, None, None, None].expand(12, 3, 8, 8).contiguous()
    clips = torch.stack([torch.arange(0, 6), torch.arange(6, 12)])
    seen = []

    def perceptual(pred, target):
        seen.append(((target[:, 0, 0, 0] + 1) / 2 * 255).round().long())
        return (pred - target).abs().flatten(1).mean(1)

    model = CompressiveTokenizer(frame_size=(8, 8), channels=(8, 8), layers_per_block=1, num_groups=4,
                                 latent_channels=4, patch_size=2, attention_max_side=4)
    train_tokenizer(model, frames, TrainConfig(steps=5, batch_size=3, future_frames=2, warmup_steps=1), perceptual,
                    log=None, clips=clips)
    assert len(seen) == 5
    for step in seen:
        for group in step.view(3, 3).tolist():
            context, future = group[0], group[1:]
            assert context in (0, 6) and len(set(future)) == 2
            assert all(context < f < context + 6 for f in future), group


def test_compressive_training_bad_inputs():
    frames = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    model = CompressiveTokenizer(frame_size=(8, 8), channels=(8, 8), layers_per_block=1, num_groups=4,
                                 latent_channels=4, patch_size=2, attention_max_side=4)
    clips = torch.arange(6)[None]
    with pytest.raises(ValueError, match="clips must be given for a CompressiveTokenizer"):
        train_tokenizer(model, frames, TrainConfig(steps=1), log=None)
    with pytest.raises(ValueError, match="clips must be given for a CompressiveTokenizer, and only for it"):
        train_tokenizer(FrameTokenizer(channels=(8, 8), layers_per_block=1, num_groups=4, latent_channels=4), frames,
                        TrainConfig(steps=1), log=None, clips=clips)
    with pytest.raises(ValueError, match=r"clips must index frames' 6 frames, got indices in \[1, 6\]"):
        train_tokenizer(model, frames, TrainConfig(steps=1), log=None, clips=clips + 1)
    with pytest.raises(ValueError, match="clips must be int64"):
        train_tokenizer(model, frames, TrainConfig(steps=1), log=None, clips=clips[:, :1])
    with pytest.raises(ValueError, match=r"future_frames \(6\) must be at most the clips' 5 future frames"):
        train_tokenizer(model, frames, TrainConfig(steps=1, future_frames=6), log=None, clips=clips)
    with pytest.raises(ValueError, match="consistency_weight must be 0 for a CompressiveTokenizer"):
        train_tokenizer(model, frames, TrainConfig(steps=1, batch_size=2, consistency_weight=1.0), log=None,
                        clips=clips)
    with pytest.raises(ValueError, match="future_frames must be an int >= 0"):
        TrainConfig(future_frames=-1)


def test_the_loss_sees_the_clamped_frame_where_the_clamp_is_right():
    """Overshooting a target at 0 or 1 is free (the decoded frame is clamped); overshooting anything else is not."""
    target = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 1.0])
    recon = torch.tensor([1.3, 0.9, -0.2, 0.1, 1.2, -0.1, 1.4, -0.3], dtype=torch.float64, requires_grad=True)
    seen = clamp_where_saturated(recon, target)
    assert seen.tolist() == pytest.approx([1.0, 0.9, 0.0, 0.1, 1.2, -0.1, 1.4, -0.3])
    (seen - target).abs().sum().backward()
    assert recon.grad.tolist() == [0.0, -1.0, 0.0, 1.0, 1.0, -1.0, 1.0, -1.0]


def test_unstable_code_loss_counts_unchanged_patches_only():
    """2 pairs of 4x4 frames coded as 2x2 grids of 2-dim codes: patch (0, 0) changes in pair 0, nothing in pair 1."""
    frames = torch.zeros(4, 3, 4, 4)
    frames[2, 0, 1, 1] = 1.0  # frame 2 pairs with frame 0: its top-left 2x2 patch differs
    codes = torch.zeros(4, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        codes[2, :, 0, 0] = 0.5  # a different code, but where the patch changed: free
        codes[2, 0, 1, 1] = 0.25  # unchanged patch, different code: counted
        codes[3, 1, 0, 1] = -0.5  # unchanged patch, different code: counted
    loss = unstable_code_loss(codes, frames, pairs=2)
    assert loss.item() == pytest.approx((0.25 + 0.5) / 7)  # 3 + 4 unchanged patches
    loss.backward()
    assert codes.grad[2, :, 0, 0].abs().sum() == 0 and codes.grad[2, 0, 1, 1] > 0 and codes.grad[3, 1, 0, 1] < 0
    same_codes = torch.zeros(4, 2, 2, 2)
    assert unstable_code_loss(same_codes, frames, pairs=2).item() == 0.0


def test_consistency_training_pairs_consecutive_frames():
    torch.manual_seed(0)
    frames = (torch.rand(6, 3, 16, 16) * 255).to(torch.uint8)
    frames[1::2] = frames[::2]  # every other frame repeats the one before: all of its patches are unchanged
    model = FrameTokenizer(channels=(8, 8), layers_per_block=1, num_groups=4, latent_channels=4)
    history = train_tokenizer(model, frames, TrainConfig(steps=2, batch_size=4, consistency_weight=1.0,
                                                         log_every=1), log=None)
    assert all("consistency" in entry and entry["consistency"] >= 0 for entry in history)
    with pytest.raises(ValueError, match="batch_size must be even"):
        TrainConfig(batch_size=3, consistency_weight=1.0)
    with pytest.raises(ValueError, match="at least 2 frames"):
        train_tokenizer(model, frames[:1], TrainConfig(steps=1, batch_size=2, consistency_weight=1.0), log=None)


def test_perceptual_loss_is_any_callable():
    torch.manual_seed(0)
    frames = (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)  # the patch GAN needs 32x32 or more
    calls = []

    def perceptual(pred, target):
        calls.append((pred.min().item(), target.max().item()))
        return (pred - target).pow(2).flatten(1).mean(1)

    model = FrameTokenizer(channels=(8, 8), layers_per_block=1, num_groups=4, latent_channels=4)
    train_tokenizer(model, frames, TrainConfig(steps=3, batch_size=2, gan_weight=0.5, gan_start=1), perceptual,
                    log=None)
    assert len(calls) == 3
    assert all(-1.0 <= t <= 1.0 for _, t in calls)  # targets handed over in [-1, 1]


def test_cli_trains_and_writes_a_checkpoint(tmp_path):
    out = tmp_path / "tok.ckpt"
    cmd = [sys.executable, "-m", "rlvrw", "tokenizer", "--frames", str(BAIR), "--size", "32", "32",
           "--channels", "8", "16", "--latent-channels", "4", "--num-groups", "4", "--layers-per-block", "1",
           "--steps", "4", "--batch-size", "2", "--warmup-steps", "1", "--eval-frames", "2", "--lpips", "none",
           "--out", str(out)]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "blur baseline" in result.stdout and "held_out" in result.stdout
    assert checkpoints.load_tokenizer(out).config["channels"] == [8, 16]
