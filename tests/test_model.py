"""VQVAE2: shapes, gradients, encode/decode, codebook buffers, arguments, overfitting."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mrivq.config import Config, config_from_dict, load_config, validate
from mrivq.engine.checkpoint import model_from_checkpoint
from mrivq.metrics import code_counts, ssim_per_image
from mrivq.nn import VQVAE2, NormResBlock, VQVAE2Output

TINY = {"channel": 8, "n_res_block": 1, "n_res_channel": 4, "embed_dim": 4, "n_embed": 16}


def tiny_model(**overrides) -> VQVAE2:
    torch.manual_seed(0)
    return VQVAE2(**{**TINY, **overrides})


def quantizer_buffers(model: VQVAE2) -> dict[str, torch.Tensor]:
    return {
        name: value.clone()
        for name, value in model.named_buffers()
        if name.startswith(("quantize_top.", "quantize_bottom."))
    }


def blurred_ellipses(n_images: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth structured test images ``(n, 1, H, W)`` in [0, 1]: three blurred ellipses each."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij"
    )
    images = torch.zeros(n_images, 1, height, width)
    for image in images:
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=generator) - 0.5).tolist()
            ay, ax = (0.2 + 0.5 * torch.rand(2, generator=generator)).tolist()
            value = 0.3 + 0.7 * torch.rand((), generator=generator).item()
            inside = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1
            image[0] = torch.where(inside, image[0].clamp(min=value), image[0])
    kernel_1d = torch.exp(-torch.arange(-3, 4.0) ** 2 / (2 * 1.5**2))
    kernel_1d /= kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :])[None, None]
    return F.conv2d(F.pad(images, (3, 3, 3, 3), mode="replicate"), kernel).clamp(0, 1)


@pytest.mark.parametrize(
    ("height", "width"), [(256, 128), (256, 144), (64, 32), (60, 37)]
)
def test_tiny_model_output_shapes_follow_the_input_size(height, width):
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, height, width))
    assert isinstance(out, VQVAE2Output)
    top = (-(-height // 8), -(-width // 8))  # ceil: sides are padded to multiples of 8
    assert out.reconstruction.shape == (2, 1, height, width)
    assert out.commitment_loss.shape == ()
    assert out.codes_top.shape == (2, *top) and out.codes_top.dtype == torch.int64
    assert out.codes_bottom.shape == (2, 2 * top[0], 2 * top[1])
    assert out.codes_bottom.dtype == torch.int64


def test_default_model_maps_a_hipmri_slice_to_32x16_top_and_64x32_bottom_codes():
    model = VQVAE2().eval()
    assert model.quantize_top.n_embed == 64 and model.quantize_top.embed_dim == 64
    assert model.quantize_bottom.n_embed == 64 and model.quantize_bottom.embed_dim == 64
    with torch.no_grad():
        out = model(torch.rand(1, 1, 256, 128))
    assert out.reconstruction.shape == (1, 1, 256, 128)
    assert out.codes_top.shape == (1, 32, 16)
    assert out.codes_bottom.shape == (1, 64, 32)


def test_wrong_number_of_channels_is_rejected_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        tiny_model()(torch.rand(2, 3, 32, 32))


def test_one_backward_pass_reaches_every_parameter():
    model = tiny_model().train()
    x = torch.rand(2, 1, 32, 32)
    out = model(x)
    (F.mse_loss(out.reconstruction, x) + 0.25 * out.commitment_loss).backward()
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_commitment_loss_is_the_sum_of_both_levels():
    model = tiny_model().eval()
    losses = []
    for quantizer in (model.quantize_top, model.quantize_bottom):
        quantizer.register_forward_hook(lambda _m, _i, out: losses.append(out.commitment_loss))
    out = model(torch.rand(2, 1, 32, 32))
    assert len(losses) == 2
    assert torch.equal(out.commitment_loss, losses[0] + losses[1])
    assert out.commitment_loss.dtype == torch.float32


@pytest.mark.parametrize("block", ["relu", "norm"])
@pytest.mark.parametrize(("height", "width"), [(64, 32), (60, 37)])
def test_decoding_the_encoded_codes_equals_the_forward_reconstruction_in_eval(
    height, width, block
):
    model = tiny_model(block=block)
    model.train()(torch.rand(4, 1, 64, 32))  # initialise the codebooks from data
    model.eval()
    x = torch.rand(3, 1, height, width)
    with torch.no_grad():
        out = model(x)
        codes_top, codes_bottom = model.encode(x)
        decoded = model.decode_codes(codes_top, codes_bottom, output_size=(height, width))
    assert torch.equal(codes_top, out.codes_top)
    assert torch.equal(codes_bottom, out.codes_bottom)
    assert torch.equal(decoded, out.reconstruction)


@pytest.mark.parametrize("bottom_dropout", [0.0, 0.999999])
def test_bottom_dropout_decodes_training_slices_from_their_top_codes_alone(bottom_dropout):
    model = tiny_model(init_from_data=False, restart_dead_codes=False, bottom_dropout=bottom_dropout).train()
    before = copy.deepcopy(model)  # the codebooks as the forward pass looks codes up in them
    x = torch.rand(3, 1, 32, 32)
    out = model(x)
    with torch.no_grad():
        quant_t = before.quantize_top.embed_codes(out.codes_top)
        quant_b = before.quantize_bottom.embed_codes(out.codes_bottom)
        top_only = before._decode_quantized(quant_t, torch.zeros_like(quant_b))
        both = before._decode_quantized(quant_t, quant_b)
    assert torch.allclose(out.reconstruction, top_only if bottom_dropout else both, atol=1e-6)
    assert not torch.allclose(top_only, both, atol=1e-3)
    model.eval()  # never in evaluation: validation, encode and decode use both levels
    with torch.no_grad():
        assert torch.equal(model(x).reconstruction, model.decode_codes(*model.encode(x)))


def test_decode_codes_without_output_size_returns_eight_times_the_top_codes():
    model = tiny_model().eval()
    codes_top = torch.randint(0, 16, (2, 4, 3))
    codes_bottom = torch.randint(0, 16, (2, 8, 6))
    assert model.decode_codes(codes_top, codes_bottom).shape == (2, 1, 32, 24)


def test_eval_mode_leaves_every_quantizer_buffer_bit_identical():
    model = tiny_model()
    model.train()(torch.rand(4, 1, 32, 32))
    before = quantizer_buffers(model)
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 1, 32, 32) * 3)
            model.encode(torch.rand(4, 1, 32, 32))
    after = quantizer_buffers(model)
    assert before.keys() == after.keys() and len(after) == 10
    for name in before:
        assert torch.equal(after[name], before[name]), name


def test_encode_never_updates_the_codebooks_even_in_training_mode():
    model = tiny_model().train()
    before = quantizer_buffers(model)
    model.encode(torch.rand(2, 1, 32, 32))
    for name, value in quantizer_buffers(model).items():
        assert torch.equal(value, before[name]), name


def test_training_step_initialises_both_codebooks_and_the_flags_are_saved():
    model = tiny_model().train()
    assert not model.quantize_top.initialised and not model.quantize_bottom.initialised
    model(torch.rand(2, 1, 32, 32))
    state = model.state_dict()
    assert state["quantize_top.initialised"] and state["quantize_bottom.initialised"]
    restored = VQVAE2(**TINY)
    restored.load_state_dict(state)
    assert restored.quantize_top.initialised and restored.quantize_bottom.initialised


def signature(model: VQVAE2) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize(
    ("argument", "value"),
    [("in_channel", 2), ("channel", 12), ("n_res_block", 2), ("n_res_channel", 6),
     ("embed_dim", 6), ("n_embed", 24)],
)
def test_every_architecture_argument_changes_the_network(argument, value):
    changed = VQVAE2(**{**TINY, argument: value})
    assert signature(changed) != signature(VQVAE2(**TINY))
    out = changed.eval()(torch.rand(1, changed.in_channel, 32, 32))
    assert out.reconstruction.shape == (1, changed.in_channel, 32, 32)
    if argument in ("embed_dim", "n_embed"):
        for quantizer in (changed.quantize_top, changed.quantize_bottom):
            assert getattr(quantizer, argument) == value


@pytest.mark.parametrize(
    ("argument", "value"),
    [("decay", 0.5), ("eps", 1e-3), ("init_from_data", False), ("restart_dead_codes", False),
     ("dead_code_threshold", 2.5)],
)
def test_every_codebook_argument_reaches_both_quantizers(argument, value):
    model = VQVAE2(**{**TINY, argument: value})
    for quantizer in (model.quantize_top, model.quantize_bottom):
        assert getattr(quantizer, argument) == value


def test_decay_zero_makes_cluster_sizes_the_last_batch_counts_at_both_levels():
    model = tiny_model(decay=0.0, restart_dead_codes=False).train()
    out = model(torch.rand(2, 1, 32, 32))
    assert torch.equal(model.quantize_top.cluster_size, code_counts(out.codes_top, 16).float())
    assert torch.equal(
        model.quantize_bottom.cluster_size, code_counts(out.codes_bottom, 16).float()
    )


def test_default_decay_keeps_most_of_the_previous_cluster_sizes():
    model = tiny_model(restart_dead_codes=False).train()  # cluster sizes start at 1.0
    out = model(torch.rand(2, 1, 32, 32))
    expected = 0.99 + 0.01 * code_counts(out.codes_top, 16).float()
    assert torch.allclose(model.quantize_top.cluster_size, expected)


def test_bfloat16_autocast_with_channels_last_keeps_codebook_statistics_float32():
    model = tiny_model().train().to(memory_format=torch.channels_last)
    x = torch.rand(2, 1, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.reconstruction.float().mean().backward()
    assert out.commitment_loss.dtype == torch.float32
    assert out.reconstruction.shape == (2, 1, 32, 32)
    for name, value in quantizer_buffers(model).items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, name
            assert torch.isfinite(value).all(), name


def test_tiny_model_overfits_one_batch_of_smooth_images_to_ssim_above_0_9():
    images = blurred_ellipses(4, 64, 32)
    torch.manual_seed(0)
    model = VQVAE2(channel=16, n_res_block=1, n_res_channel=8, embed_dim=16, n_embed=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(400):
        out = model(images)
        loss = F.mse_loss(out.reconstruction, images) + 0.25 * out.commitment_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        ssim = ssim_per_image(model(images).reconstruction, images)
    assert ssim.mean() > 0.9, ssim


@pytest.mark.parametrize(("channels", "hidden"), [(16, 8), (12, 5)])
def test_norm_block_keeps_the_shape_and_starts_as_the_identity(channels, hidden):
    torch.manual_seed(0)
    block = NormResBlock(channels, hidden)  # 12 channels: GroupNorm falls back to 12 groups
    x = torch.randn(2, channels, 8, 6)
    y = block(x)
    assert y.shape == x.shape
    assert torch.equal(y, x)
    block.conv[-1].weight.data.normal_()  # once trained, the branch contributes
    assert not torch.allclose(block(x), x)


def test_tiny_norm_block_model_trains_every_parameter_after_one_step():
    model = tiny_model(block="norm").train()
    assert any(isinstance(m, NormResBlock) for m in model.modules())
    x = torch.rand(2, 1, 32, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the zero-initialised last convs pass gradients on from the second step
        optimizer.zero_grad()
        out = model(x)
        (F.mse_loss(out.reconstruction, x) + 0.25 * out.commitment_loss).backward()
        optimizer.step()
    assert out.reconstruction.shape == x.shape
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_unknown_block_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="norm"):
        tiny_model(block="dense")


def test_report_preset_gives_the_report_model_and_an_explicit_key_wins():
    report = validate({"model": {"preset": "report"}}).model
    assert (report.channel, report.n_res_block, report.n_res_channel) == (128, 2, 32)
    assert (report.embed_dim, report.n_embed, report.decay) == (64, 512, 0.99)
    assert report.block == "relu" and report.restart_from == "random"
    assert validate({}).model.restart_from == "worst"  # today's default: the preset keeps the report's
    mixed = validate({"model": {"preset": "report", "channel": 64, "block": "norm"}}).model
    assert (mixed.channel, mixed.block, mixed.n_res_channel) == (64, "norm", 32)
    assert "preset" not in validate({"model": {"preset": "report"}}).to_dict()["model"]


def test_a_stored_config_without_block_loads_as_the_report_block():
    stored = Config().to_dict()
    stored["model"].update(channel=8, n_res_block=1, n_res_channel=4, embed_dim=4, n_embed=16)
    del stored["model"]["block"]  # as written before model.block existed
    loaded = config_from_dict(stored).model
    assert loaded.block == "relu" and "block" in loaded.model_fields_set  # not today's default
    assert "block" not in stored["model"]  # the caller's dict is left as it was
    weights = VQVAE2(**TINY, block="relu").state_dict()
    model = model_from_checkpoint({"config": stored, "model": weights})
    assert any(type(m).__name__ == "ResBlock" for m in model.modules())
    assert not any(isinstance(m, NormResBlock) for m in model.modules())


def test_a_stored_config_written_before_the_lookup_key_keeps_euclidean_lookup():
    stored = Config().to_dict()
    for key in ("lookup", "restart_from", "kmeans_iters", "bottom_dropout"):
        del stored["model"][key]  # as written before these keys existed
    loaded = config_from_dict(stored).model
    assert (loaded.lookup, loaded.restart_from, loaded.kmeans_iters, loaded.bottom_dropout) == \
        ("euclidean", "random", 0, 0.0)
    assert config_from_dict({**stored, "model": {**stored["model"], "lookup": "cosine"}}).model.lookup == "cosine"


def test_the_old_block_name_report_reads_as_relu():
    """``model.block: report`` named a document users do not have; configs and checkpoints that
    say it still load, as the same block."""
    stored = Config().to_dict()
    stored["model"].update(channel=8, n_res_block=1, n_res_channel=4, embed_dim=4, n_embed=16, block="report")
    assert config_from_dict(stored).model.block == "relu"
    assert load_config(None, ["model.block=report"]).model.block == "relu"
