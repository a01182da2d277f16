"""The transformer prior's integer copy: its logits follow the float prior's, are the same
teacher-forced and one position at a time, and a raster-coded file decodes to the same codes
whatever floating-point results, threads, batches or device the decoder has."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from prior_helpers import OneUlp

from mrivq.compression import driver
from mrivq.compression.portable.transformer import (
    exact_matmul,
    transformer_copy,
    transformer_copy_problem,
)
from mrivq.nn.transformer_prior import TransformerPrior


def trained_transformer(seed: int = 0) -> tuple[TransformerPrior, torch.Tensor, torch.Tensor]:
    """A tiny transformer prior fitted for a few dozen steps to its own samples, and 6 held-out grids."""
    torch.manual_seed(seed)
    prior = TransformerPrior(32, (8, 4), d_model=16, n_head=2, n_layer_top=2, n_layer_bottom=2, condition_blocks=1,
                      bottom_window_rows=1).eval()
    top, bottom = prior.sample(30, generator=torch.Generator().manual_seed(seed + 1))
    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-3)
    prior.train()
    for _ in range(40):
        nll_top, nll_bottom = prior.nll_bits(top[:24], bottom[:24])
        optimizer.zero_grad()
        (nll_top + nll_bottom).backward()
        optimizer.step()
    prior.eval()
    prior.integer = transformer_copy(prior, top[:24], bottom[:24])
    return prior, top[24:], bottom[24:]


@pytest.fixture(scope="module")
def fitted():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield trained_transformer()
    torch.set_num_threads(threads)


def test_exact_products_survive_a_moved_last_bit():
    a = torch.tensor([[32767.0, -32767.0, 5.0]], dtype=torch.float64)
    b = torch.tensor([[32767.0], [32766.0], [-3.0]], dtype=torch.float64)
    assert exact_matmul(a, b).tolist() == [[32767 * 32767 - 32767 * 32766 - 15]]
    with OneUlp():
        assert exact_matmul(a, b).tolist() == [[32767 * 32767 - 32767 * 32766 - 15]]
        assert exact_matmul(-a, b).tolist() == [[-(32767 * 32767 - 32767 * 32766 - 15)]]


def test_the_copys_logits_follow_the_float_priors_and_do_not_depend_on_the_chunk(fitted):
    prior, top, bottom = fitted
    with torch.inference_mode():
        floats = prior(top, bottom)
    condition = prior.integer.condition(top)
    for net, codes, cond, float_logits in ((prior.integer.top, top, None, floats[0]),
                                           (prior.integer.bottom, bottom, condition, floats[1])):
        flat = codes.reshape(len(codes), -1)
        whole = net.logits(flat, 0, net.length, net.new_cache(len(codes)), cond)
        cache = net.new_cache(len(codes), one_at_a_time=True)  # for the windowed bottom, a ring
        one_by_one = torch.cat([net.logits(flat, t, 1, cache, cond) for t in range(net.length)], dim=1)
        assert torch.equal(whole, one_by_one)
        integer = torch.log_softmax(whole.double() / 64, dim=-1)
        reference = torch.log_softmax(float_logits.flatten(2).transpose(1, 2).double(), dim=-1)
        assert float((integer - reference).abs().max()) < 0.05  # nats; the logits' unit is 1/64


def test_the_raster_coder_codes_at_the_float_priors_rate(fitted):
    prior, top, bottom = fitted
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy())
    with torch.inference_mode():
        nll_top, nll_bottom = prior.nll_bits(top, bottom)
    float_bits = len(top) * (float(nll_top) * top[0].numel() + float(nll_bottom) * bottom[0].numel())
    bits_top, bits_bottom = driver.surprise_bits(prior.integer, top.numpy(), bottom.numpy())
    assert abs(float(bits_top.sum() + bits_bottom.sum()) - float_bits) < 0.01 * float_bits
    # one stream per slice: a length word each and the coder's last words
    assert words.size * 32 <= float_bits * 1.02 + len(top) * 96


def test_raster_decoding_is_exact_whatever_the_floating_point_results_threads_and_batches(fitted):
    prior, top, bottom = fitted
    torch.set_num_threads(1)
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy(), batch_size=4)
    with OneUlp():
        decoded = driver.decode(prior.integer, words, len(top), batch_size=5)
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())
    torch.set_num_threads(2)  # batches side by side on two threads
    try:
        decoded = driver.decode(prior.integer, words, len(top), batch_size=1)
        assert np.array_equal(driver.encode(prior.integer, top.numpy(), bottom.numpy(), batch_size=2), words)
    finally:
        torch.set_num_threads(1)
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_raster_file_coded_on_the_cpu_decodes_on_cuda_and_back(fitted):
    prior, top, bottom = fitted
    on_gpu = prior.integer.to("cuda")
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy())
    decoded = driver.decode(on_gpu, words, len(top), batch_size=3)
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())
    words_gpu = driver.encode(on_gpu, top.numpy(), bottom.numpy(), batch_size=6)
    assert np.array_equal(words_gpu, words)
    decoded = driver.decode(prior.integer, words_gpu, len(top))
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())


def test_the_copy_is_made_the_same_way_twice_and_its_fingerprint_says_so(fitted):
    prior, top, bottom = fitted
    assert transformer_copy(prior, top, bottom).fingerprint() == transformer_copy(prior, top, bottom).fingerprint()
    assert transformer_copy(prior, top[:1], bottom[:1]).fingerprint() != prior.integer.fingerprint()


@pytest.mark.parametrize("spoil, message", [
    (lambda s: s["top"]["blocks"][0]["qkv"].update(weight=s["top"]["blocks"][0]["qkv"]["weight"].float()),
     "type or shape"),
    (lambda s: s["bottom"]["blocks"].pop(), "number of entries"),
    (lambda s: s["top"]["blocks"][1]["fc2"]["multiplier"].mul_(2**40), "leave int64"),
    (lambda s: s["top"]["blocks"][0]["qkv"]["weight"].fill_(2**20), "beyond 32767"),
    (lambda s: s["bottom"]["blocks"][0]["score"].fill_(2**40), "attention scale"),
    (lambda s: s["bottom"]["blocks"][0]["att_table"].fill_(1), "attention table"),
    (lambda s: s["top"]["blocks"][0]["eps_attn"].fill_(-1), "epsilon"),
    (lambda s: s["top"]["neighbour_at"].fill_(0), "neighbour positions"),
    (lambda s: s["condition"]["up_in"][0].fill_(2**50), "leave int64"),
    (lambda s: s["top"]["token"].fill_(2**40), "beyond 68719476736 at /top/token"),
    (lambda s: s["top"]["token"].fill_(-2**63), "at /top/token"),  # abs() of the least int64 is itself
    (lambda s: s["condition"]["embed"].fill_(-2**40), "at /condition/embed"),
    (lambda s: s["bottom"]["blocks"][1]["gelu"].fill_(-2**31), "beyond 32767 at /bottom/blocks[1]/gelu"),
    (lambda s: s.update(n_embed=64), "where 32 belongs"),
])
def test_a_damaged_copy_is_named_before_it_is_used(fitted, spoil, message):
    prior, _, _ = fitted
    state = copy.deepcopy(prior.integer.state)
    assert transformer_copy_problem(state, prior) is None
    spoil(state)
    problem = transformer_copy_problem(state, prior)
    assert problem and message in problem


def test_a_raster_stream_that_runs_on_is_refused(fitted):
    prior, top, bottom = fitted
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy())
    n, first = len(top), int(words[0])
    longer = np.concatenate([[first + 3], words[1:n], words[n:n + first], [1, 2, 3], words[n + first:]])
    with pytest.raises(ValueError):
        driver.decode(prior.integer, longer.astype(np.uint32), n)


def test_a_window_longer_than_the_grid_sees_the_whole_grid_and_keeps_no_more_keys():
    torch.manual_seed(3)
    prior = TransformerPrior(32, (2, 4), d_model=16, n_head=2, n_layer_top=1, n_layer_bottom=1, condition_blocks=1,
                      bottom_window_rows=1000).eval()
    top, bottom = prior.sample(3, generator=torch.Generator().manual_seed(4))
    prior.integer = transformer_copy(prior, top, bottom)
    assert transformer_copy_problem(prior.integer.state, prior) is None
    net = prior.integer.bottom
    assert net.window is None and net.new_cache(2, one_at_a_time=True)[0][0].shape[2] == net.length
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy())
    decoded = driver.decode(prior.integer, words, 3)
    assert np.array_equal(decoded[1], bottom.numpy())
