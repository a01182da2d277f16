"""The pass prior and its integer copy: each pass sees only the passes before it, the copy's
frequencies match the float prior's probabilities, and a file decodes to the same codes
whatever floating-point results, threads, batches or device the decoder has."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from prior_helpers import OneUlp

from mrivq.compression import driver
from mrivq.compression.entropy import (
    code_count_table,
    decode_with_frequencies,
    encode_with_frequencies,
)
from mrivq.compression.portable.fixed_point import (
    EXP_BITS,
    LOGIT_UNITS,
    coder_table,
    weights_from_logits,
)
from mrivq.compression.portable.passes import (
    _float_matmul,
    int8_matmul,
    pass_copy,
    pass_copy_problem,
)
from mrivq.nn.pass_prior import (
    DRAW_STEPS,
    PassPrior,
    VolumePrior,
    draw_in_passes,
    draw_in_steps,
    pass_map,
)


def trained_prior(seed: int = 0, **sizes) -> tuple[PassPrior, torch.Tensor, torch.Tensor]:
    """A tiny pass prior fitted for a few dozen steps to grids drawn from four patterns, and 12 grids."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    patterns = torch.as_tensor(rng.integers(0, 32, size=(4, 8, 4)))
    top = patterns[torch.as_tensor(rng.integers(0, 4, size=48))]
    bottom = top.repeat_interleave(2, 1).repeat_interleave(2, 2)
    noise = torch.as_tensor(rng.random(bottom.shape) < 0.2)
    bottom = torch.where(noise, torch.as_tensor(rng.integers(0, 32, size=bottom.shape)), bottom)
    prior = PassPrior(32, (8, 4), **{"channels": 16, "layers": 3, "condition_layers": 1, **sizes})
    optimizer = torch.optim.Adam(prior.parameters(), lr=1e-2)
    for step in range(60):
        i = torch.as_tensor(rng.integers(0, 36, size=8))
        nll_top, nll_bottom = prior.nll_bits(top[i], bottom[i])
        optimizer.zero_grad()
        (nll_top + 4 * nll_bottom).backward()
        optimizer.step()
    prior.eval()
    prior.integer = pass_copy(prior, top[:32], bottom[:32])
    return prior, top[36:], bottom[36:]


@pytest.fixture(scope="module")
def fitted():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield trained_prior()
    torch.set_num_threads(threads)


def test_the_passes_refine_each_4x4_tile_dyadically():
    five = pass_map((8, 8), 5)
    tile_counts = torch.bincount(five[:4, :4].flatten(), minlength=5).tolist()
    assert tile_counts == [1, 1, 2, 4, 8]
    assert torch.equal(pass_map((8, 8), 2), (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2)
    assert pass_map((8, 8), 1).max() == 0
    for passes in range(1, 6):  # fewer passes merge the first ones: the order is kept
        merged = pass_map((8, 8), passes)
        assert ((five[:, :, None] < five[:, None, :]).flatten()
                <= (merged[:, :, None] <= merged[:, None, :]).flatten()).all()


@pytest.mark.parametrize("neighbour_codes,masks", [(True, 0.0), (False, 0.0), (True, 0.5)])
def test_a_pass_sees_only_the_codes_of_the_passes_before_it(neighbour_codes, masks):
    torch.manual_seed(0)
    prior = PassPrior(16, (4, 4), channels=8, layers=2, neighbour_codes=neighbour_codes, top_masks=masks).eval()
    net = prior.top
    if neighbour_codes:  # the tables of log-odds start at zero: give them something to leak
        torch.nn.init.normal_(net.near_follow.weight)
    codes = torch.randint(0, 16, (1, 4, 4))
    for step in range(net.passes):
        changed = codes.clone()
        later = net.order >= step
        changed[0][later] = (codes[0][later] + 1) % 16
        same = net(codes, torch.tensor([step])), net(changed, torch.tensor([step]))
        assert torch.equal(*same), step
        if step:
            earlier = codes.clone()
            earlier[0][net.order < step] = (codes[0][net.order < step] + 3) % 16
            assert not torch.equal(net(earlier, torch.tensor([step])), same[0])


def test_a_net_that_learns_masks_sees_only_the_codes_its_mask_marks_known():
    torch.manual_seed(0)
    net = PassPrior(16, (4, 4), channels=8, layers=2, neighbour_codes=True, top_masks=0.5).eval().top
    torch.nn.init.normal_(net.near_follow.weight)
    codes = torch.randint(0, 16, (6, 4, 4))
    known = torch.rand(6, 4, 4) < torch.linspace(0.1, 0.9, 6)[:, None, None]
    with torch.no_grad():
        logits = net(codes, net.masked(known))
        assert torch.equal(net(torch.where(known, codes, (codes + 1) % 16), net.masked(known)), logits)
        assert not torch.equal(net(torch.where(known, (codes + 1) % 16, codes), net.masked(known)), logits)
    # the known share, in eighths; each coding pass's is one fixed row of the table
    assert net.masked(known)[1].tolist() == (known.flatten(1).sum(1) * 8 // 16).tolist()
    assert net.pass_row.tolist() == [0, 2, 4]  # three passes: nothing, a quarter, half known


def test_a_volume_prior_learns_its_random_masks_as_slices_drawn_alone():
    """Samples are drawn with no slice beside them, so the random masks a volume prior's top net
    learns are of grids given no references, whatever slices the coding passes are given."""
    torch.manual_seed(0)
    prior = VolumePrior(16, (4, 4), channels=8, layers=2, top_masks=0.5).train()
    torch.nn.init.normal_(prior.follow_top.weight)
    top, bottom = torch.randint(0, 16, (6, 4, 4)), torch.randint(0, 16, (6, 8, 8))
    refs = [(torch.stack([t, t], 1), torch.stack([b, b], 1)) for t, b in ((top, bottom), ((top + 1) % 16, bottom))]

    def top_bits(masks: float, references) -> float:
        prior.top.masks = masks
        torch.manual_seed(1)
        with torch.no_grad():
            return float(prior.nll_bits(top, bottom, references)[0])

    assert top_bits(1.0, refs[0]) == top_bits(1.0, refs[1]) == top_bits(1.0, None)
    assert top_bits(0.5, refs[0]) != top_bits(0.5, refs[1])


def masked_top(steps: int = 300) -> PassPrior:
    """A pass prior whose top net (trained alone, half the time on random masks) learnt grids
    of one code each, one of four codes."""
    torch.manual_seed(0)
    prior = PassPrior(32, (8, 4), channels=16, layers=3, condition_layers=1, top_masks=0.5)
    optimizer = torch.optim.Adam(prior.top.parameters(), lr=1e-2)
    bottom = torch.zeros(16, 16, 8, dtype=torch.long)
    for _ in range(steps):
        top = torch.tensor([3, 9, 17, 30])[torch.randint(0, 4, (16,))][:, None, None].expand(16, 8, 4)
        loss = prior.nll_bits(top, bottom)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return prior.eval()


def test_drawing_in_steps_keeps_what_one_early_code_says_where_the_first_pass_cannot():
    """The first coding pass draws a quarter of the grid with nothing known, so a net drawn in
    its passes never draws a grid of one code; drawn in steps (the first keeping one code), it
    does. Each step sees only the codes kept before it, and keeps them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prior = masked_top()
    finally:
        torch.set_num_threads(threads)
    net, seen, forward = prior.top, [], prior.top.forward

    def recording(codes, step, *args):
        known = net.seen(step)[0]
        seen.append((codes.clone(), known.clone()))
        return forward(codes, step, *args)

    drawn = {}
    for name, drawing in (("passes", draw_in_passes), ("steps", draw_in_steps)):
        with torch.no_grad():
            drawn[name] = drawing(net, 64, None, None, temperature=1.0, top_p=0.5,
                                  generator=torch.Generator().manual_seed(0))
    one_code = {name: int((grids == grids[:, :1, :1]).flatten(1).all(1).sum()) for name, grids in drawn.items()}
    assert one_code["passes"] == 0 and one_code["steps"] >= 8, one_code

    net.forward = recording
    with torch.no_grad():
        grids = draw_in_steps(net, 4, None, None, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(1))
    unknown = [int((~known[0]).sum()) for _, known in seen]
    assert len(seen) == DRAW_STEPS and unknown[0] == 32
    assert unknown[1:] == [math.floor(32 * math.cos(math.pi / 2 * t / DRAW_STEPS)) for t in range(1, DRAW_STEPS)]
    for (codes, known), (_, later) in zip(seen, seen[1:] + [(None, torch.ones_like(seen[0][1]))]):
        assert (later >= known).all() and torch.equal(codes[known], grids[known])


def test_drawing_in_passes_takes_one_nucleus_setting_or_one_per_pass():
    torch.manual_seed(0)
    net = PassPrior(32, (8, 4), channels=8, layers=2, top_masks=0).eval().top

    def drawn(top_p):
        with torch.no_grad():
            return draw_in_passes(net, 5, None, None, temperature=1.0, top_p=top_p,
                                  generator=torch.Generator().manual_seed(0))

    assert torch.equal(drawn(0.7), drawn([0.7] * net.passes))
    assert not torch.equal(drawn(0.7), drawn([0.7, 0.7, 0.05]))  # the last pass's positions, nearly argmax
    with pytest.raises(ValueError):
        drawn([0.7, 0.7])


def test_int8_products_are_exact_even_where_a_kernel_would_saturate():
    """Long sums of extreme products: oneDNN's int8 kernel for CPUs without VNNI saturates 16-bit
    pair sums on them, so there the products go through floating point, exactly."""
    rng = torch.Generator().manual_seed(0)
    cases = [torch.randint(-128, 128, (5, 19), generator=rng, dtype=torch.int8),
             torch.randint(-128, 128, (40, 1200), generator=rng, dtype=torch.int8)]
    cases += [torch.full((20, 576), value, dtype=torch.int8) for value in (127, -128)]
    for a in cases:
        for b in (a.T.contiguous(), -a.T.contiguous().clamp(min=-127)):
            exact = a.long() @ b.long()
            assert torch.equal(int8_matmul(a, b).long(), exact)
            assert torch.equal(_float_matmul(a, b).long(), exact)


def test_a_file_coded_through_float_products_decodes_through_int8_products(fitted, monkeypatch):
    """What a CPU without VNNI codes (floating-point products) decodes on one with them, and back."""
    from mrivq.compression.portable import passes as module

    prior, top, bottom = fitted
    monkeypatch.setattr(module, "int_mm_is_exact", lambda device: False)
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy())
    monkeypatch.undo()
    decoded = driver.decode(prior.integer, words, len(top))
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())
    assert np.array_equal(words, driver.encode(prior.integer, top.numpy(), bottom.numpy()))


def test_integer_weights_follow_the_logits_and_are_never_zero():
    table = torch.tensor([max(1, round(2**EXP_BITS * math.exp(-d / 64))) for d in range(16 * 64 + 1)])
    logits = torch.tensor([[0, -64, -128, -10**9], [5, 5, 5, 5]])
    weights = weights_from_logits(logits, coder_table(table))
    assert weights[0, 0] == 2**EXP_BITS and weights[0, 3] == 1 and (weights >= 1).all()
    assert weights[0, 0] / weights[0, 1] == pytest.approx(math.e, rel=1e-4)
    assert (weights[1] == 2**EXP_BITS).all()


def test_the_integer_copy_codes_at_the_float_priors_rate(fitted):
    prior, top, bottom = fitted
    assert all("widen" in prior.integer.state[level] for level in ("top", "bottom"))  # the default head
    with torch.inference_mode():
        nll_top, nll_bottom = prior.nll_bits(top, bottom)
    float_bits = len(top) * (float(nll_top) * top[0].numel() + float(nll_bottom) * bottom[0].numel())
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy(), batch_size=5)
    assert float_bits < 0.7 * len(top) * 5 * (top[0].numel() + bottom[0].numel())  # it learnt something
    # the stream: one per slice (a length word each and the coder's last words), at the float rate
    assert words.size * 32 <= float_bits * 1.02 + len(top) * 96


def test_decoding_is_exact_whatever_the_floating_point_results_threads_and_batches(fitted):
    prior, top, bottom = fitted
    torch.set_num_threads(1)
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy(), batch_size=3)
    with OneUlp():  # one thread: torch function modes hold in the thread that enters them
        decoded = driver.decode(prior.integer, words, len(top), batch_size=5)
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())
    torch.set_num_threads(2)  # batches side by side on two threads
    try:
        decoded = driver.decode(prior.integer, words, len(top), batch_size=5)
    finally:
        torch.set_num_threads(1)
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())
    # the nudge is real: the float prior's probabilities move under it
    with torch.inference_mode():
        plain = torch.softmax(prior(top, bottom)[1], dim=1)
        with OneUlp():
            moved = torch.softmax(prior(top, bottom)[1], dim=1)
    assert not torch.equal(plain, moved)


@pytest.mark.parametrize("sizes", [{"head_channels": 0}, {"neighbour_codes": True}, {"top_masks": 0.5}])
def test_a_prior_without_the_widened_head_or_with_neighbour_codes_codes_at_its_rate_exactly(sizes):
    """Priors stored before ``head_channels`` existed take their logits from the convolutions'
    channels: their copies have no ``widen``. Priors with ``neighbour_codes`` add their neighbours'
    embeddings and tables of log-odds in integers (learnt: not the zeros they start from). A top
    net that learnt masks codes with its passes' rows of its table of known shares. All code at
    their float rate and decode exactly."""
    prior, top, bottom = trained_prior(**sizes)
    assert (prior.top.widen is None) == ("widen" not in prior.integer.state["bottom"]) == ("head_channels" in sizes)
    near = [prior.integer.state[level].get("near_follow") for level in ("top", "bottom")]
    if "top_masks" in sizes:
        assert prior.integer.state["top"]["step"].shape == (prior.top.passes, 16)
    if "neighbour_codes" in sizes:
        assert all(table.abs().max() > 0 for table in near)
    else:
        assert near == [None, None] and prior.top.near is None
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy(), batch_size=3)
    with torch.inference_mode():
        nll_top, nll_bottom = prior.nll_bits(top, bottom)
    float_bits = len(top) * (float(nll_top) * top[0].numel() + float(nll_bottom) * bottom[0].numel())
    assert words.size * 32 <= float_bits * 1.02 + len(top) * 96
    with OneUlp():
        decoded = driver.decode(prior.integer, words, len(top), batch_size=5)
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())


def test_the_copy_adds_every_neighbours_table_row_the_float_prior_adds():
    """Each pass's integer logits are the float prior's, within the rounding of int8 weights:
    the rows of known neighbours and those of unknown ones (the same row over a whole pass) alike."""
    torch.manual_seed(0)
    prior = PassPrior(32, (8, 4), channels=16, layers=2, neighbour_codes=True).eval()
    for net in (prior.top, prior.bottom):
        torch.nn.init.normal_(net.near_follow.weight)
    top, bottom = torch.randint(0, 32, (6, 8, 4)), torch.randint(0, 32, (6, 16, 8))
    copy_ = pass_copy(prior, top, bottom)
    for level, net, codes in (("top", prior.top, top), ("bottom", prior.bottom, bottom)):
        integer = getattr(copy_, level)
        condition = copy_.condition(level, top.numpy(), None)
        for step in range(net.passes):
            here = net.order.flatten() == step
            with torch.no_grad():
                expected = net.logits_at(codes[:1], torch.tensor([step]), prior.condition_for(level, top[:1]), here)[0]
            near = integer.near_rows(codes[:1], step)
            head_input = integer.head_input(codes[:1], step, None if condition is None else condition[:1], near)
            near = near.flatten(2)[:, :, here]
            got = integer.logits(head_input[0], near[0]).double() / LOGIT_UNITS
            assert (got - expected.double()).abs().max() < 0.1, (level, step)  # the rows: ~3 nats


def test_the_frequency_coder_is_portable_too():
    rng = np.random.default_rng(0)
    top, bottom = rng.integers(0, 32, (6, 4, 2)), rng.integers(0, 32, (6, 8, 4))
    counts = code_count_table(top, bottom, 32)
    words = encode_with_frequencies(top, bottom, counts)
    with OneUlp():
        again = encode_with_frequencies(top, bottom, counts)
        decoded = decode_with_frequencies(words, counts, 6, (4, 2))
    assert np.array_equal(words, again)
    assert np.array_equal(decoded[0], top) and np.array_equal(decoded[1], bottom)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_file_coded_on_the_cpu_decodes_on_cuda_and_back(fitted):
    prior, top, bottom = fitted
    on_gpu = prior.integer.to("cuda")
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy())
    decoded = driver.decode(on_gpu, words, len(top), batch_size=7)
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())
    words_gpu = driver.encode(on_gpu, top.numpy(), bottom.numpy(), batch_size=2)
    assert np.array_equal(words_gpu, words)
    decoded = driver.decode(prior.integer, words_gpu, len(top))
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())


def test_the_copy_is_made_the_same_way_twice_and_its_fingerprint_says_so(fitted):
    prior, top, bottom = fitted
    assert pass_copy(prior, top, bottom).fingerprint() == pass_copy(prior, top, bottom).fingerprint()
    assert pass_copy(prior, top[:1], bottom[:1]).fingerprint() != pass_copy(prior, top, bottom).fingerprint()


@pytest.mark.parametrize("spoil, message", [
    (lambda s: s["top"]["convs"][0].update(weight=s["top"]["convs"][0]["weight"].float()), "type or shape"),
    (lambda s: s["top"]["convs"].pop(), "number of entries"),
    (lambda s: s["bottom"]["convs"][1].update(multiplier=s["bottom"]["convs"][1]["multiplier"] * 2**40), "beyond"),
    (lambda s: s["top"]["order"].fill_(0), "pass order"),
    (lambda s: s["top"]["code"].fill_(-2**63), "at /top/code"),  # abs() of the least int64 is itself
    (lambda s: s["exp_table"].__setitem__(5, 2**21), "exponential table"),
    (lambda s: s.update(n_embed=64), "where 32 belongs"),
    (lambda s: s.pop("condition"), "other entries"),
])
def test_a_damaged_copy_is_named_before_it_is_used(fitted, spoil, message):
    prior, _, _ = fitted
    state = copy.deepcopy(prior.integer.state)
    assert pass_copy_problem(state, prior) is None
    spoil(state)
    problem = pass_copy_problem(state, prior)
    assert problem and message in problem


def test_a_stream_whose_slice_lengths_do_not_add_up_or_that_runs_on_is_refused(fitted):
    prior, top, bottom = fitted
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy())
    short = words.copy()
    short[0] += 1
    with pytest.raises(ValueError, match="do not add up"):
        driver.decode(prior.integer, short, len(top))
    n, first = len(top), int(words[0])
    longer = np.concatenate([[first + 3], words[1:n], words[n:n + first], [1, 2, 3], words[n + first:]])
    with pytest.raises(ValueError):
        driver.decode(prior.integer, longer.astype(np.uint32), len(top))


def test_a_prior_with_a_dead_layer_still_makes_a_copy_that_loads(fitted):
    prior, top, bottom = fitted
    dead = PassPrior(32, (8, 4), channels=16, layers=3, condition_layers=1)
    dead.load_state_dict(prior.state_dict())
    with torch.no_grad():
        dead.top.convs[1].weight.zero_()
        dead.top.convs[1].bias.fill_(-5.0)  # the stream below it stays, the layer adds nothing positive
        dead.bottom.convs[0].weight.mul_(1e-9)
    copy = pass_copy(dead, top, bottom)
    assert pass_copy_problem(copy.state, dead) is None
    words = driver.encode(copy, top.numpy(), bottom.numpy())
    assert np.array_equal(driver.decode(copy, words, len(top))[1], bottom.numpy())


def test_sampling_draws_by_the_probabilities_within_the_nucleus():
    """Both priors draw through one function (nucleus sampling: the fewest most probable codes holding top_p)."""
    from mrivq.nn.pass_prior import _draw

    probs = torch.tensor([[0.2, 0.5, 0.3]]).repeat(20000, 1)
    shares = torch.bincount(_draw(probs, 1.0, torch.Generator().manual_seed(1)), minlength=3) / 20000
    assert torch.allclose(shares, torch.tensor([0.2, 0.5, 0.3]), atol=0.015)
    shares = torch.bincount(_draw(probs, 0.6, torch.Generator().manual_seed(1)), minlength=3) / 20000
    assert shares[0] == 0 and torch.allclose(shares[1:], torch.tensor([0.625, 0.375]), atol=0.015)


def test_pass_sampling_finds_a_nucleus_wider_than_its_candidates():
    """Rows whose nucleus holds more codes than the candidates looked at first are sorted whole;
    peaked rows in the same batch stay within theirs."""
    from mrivq.nn.pass_prior import NUCLEUS_CANDIDATES, _draw

    flat = torch.arange(400, 200, -1, dtype=torch.float64)  # 200 codes, slowly falling
    flat /= flat.sum()
    nucleus = int((flat.cumsum(0) - flat < 0.5).sum())  # codes before which less than half lies
    assert nucleus > NUCLEUS_CANDIDATES
    peaked = torch.zeros(200, dtype=torch.float64)
    peaked[[7, 3]] = torch.tensor([0.7, 0.3], dtype=torch.float64)
    probs = torch.stack([flat, peaked]).repeat(5000, 1)
    drawn = _draw(probs, 0.5, torch.Generator().manual_seed(2)).reshape(5000, 2)
    assert drawn[:, 0].max() < nucleus and drawn[:, 0].max() >= NUCLEUS_CANDIDATES
    assert (drawn[:, 1] == 7).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_pass_sampling_refuses_probabilities_that_are_not_numbers(bad):
    """One damaged weight of the output layer spoils one code's probability at every position:
    sampling says so instead of drawing from them."""
    from mrivq.nn.pass_prior import NonFiniteProbabilities

    torch.manual_seed(0)
    prior = PassPrior(16, (4, 4), channels=8, layers=2, condition_layers=1)
    with torch.no_grad():
        prior.bottom.head.bias[5] = bad
    with pytest.raises(NonFiniteProbabilities):
        prior.sample(2)
    with torch.no_grad():
        prior.bottom.head.bias[5] = 0.0
    assert prior.sample(2)[1].shape == (2, 8, 8)


def test_the_coders_count_every_slice_on_their_progress_bar(fitted, monkeypatch):
    """On a terminal a bar counts the slices coded, from whichever thread finished them."""

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.done, self.closed = total, 0, False
            bars.append(self)

        def update(self, size):
            self.done += size

        def close(self):
            self.closed = True

    monkeypatch.setattr(driver, "tqdm", Bar)
    prior, top, bottom = fitted
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # batches side by side on two threads
    try:
        words = driver.encode(prior.integer, top[:5].numpy(), bottom[:5].numpy(), batch_size=2)
        driver.decode(prior.integer, words, 5, batch_size=3)
    finally:
        torch.set_num_threads(threads)
    assert [(bar.total, bar.done, bar.closed) for bar in bars] == [(5, 5, True), (5, 5, True)]
