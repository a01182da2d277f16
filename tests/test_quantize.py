"""VectorQuantizer: nearest code, EMA update, data initialisation, dead-code restart, dtypes."""

from __future__ import annotations

import pytest
import torch

from mrivq.nn import VectorQuantizer


def as_feature_map(vectors: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` vectors -> ``(1, D, 1, N)`` encoder output, the quantizer's input layout."""
    return vectors.t().reshape(1, vectors.shape[1], 1, vectors.shape[0]).contiguous()


def make_quantizer(embed: torch.Tensor, **kwargs) -> VectorQuantizer:
    """Quantizer with a given codebook and pseudo-count 1 per code, no data init/restart."""
    kwargs = {"init_from_data": False, "restart_dead_codes": False, **kwargs}
    vq = VectorQuantizer(embed.shape[1], embed.shape[0], **kwargs)
    vq.embed.copy_(embed)
    vq.embed_avg.copy_(embed)
    vq.cluster_size.fill_(1.0)
    return vq


def is_row_of(vectors: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """For each row of ``vectors``, whether it is exactly one of the rows of ``data``."""
    return (vectors[:, None, :] == data[None, :, :]).all(dim=-1).any(dim=1)


def buffers(vq: VectorQuantizer) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in vq.named_buffers()}


EMBED_3x2 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
INPUTS_4x2 = torch.tensor([[0.1, 0.1], [0.9, 0.1], [1.1, -0.1], [0.2, 0.8]])


def test_each_vector_gets_its_nearest_code_by_euclidean_distance():
    vq = make_quantizer(EMBED_3x2).eval()
    out = vq(as_feature_map(INPUTS_4x2))
    assert out.codes.dtype == torch.int64
    assert out.codes.reshape(-1).tolist() == [0, 1, 1, 2]
    expected = EMBED_3x2[[0, 1, 1, 2]]
    assert torch.equal(out.quantized.reshape(2, 4).t(), expected)


def test_commitment_loss_is_mse_between_input_and_chosen_code():
    vq = make_quantizer(EMBED_3x2).eval()
    out = vq(as_feature_map(INPUTS_4x2))
    # squared errors per vector: 0.02, 0.02, 0.02, 0.08 -> 0.14 over 8 elements
    assert out.commitment_loss.item() == pytest.approx(0.14 / 8, rel=1e-5)


def test_one_ema_update_equals_hand_computed_laplace_smoothed_example():
    vq = make_quantizer(EMBED_3x2, decay=0.5, eps=0.1).train()
    vq(as_feature_map(INPUTS_4x2))

    # counts per code: [1, 2, 1]; cluster_size = 0.5 * 1 + 0.5 * counts
    assert torch.allclose(vq.cluster_size, torch.tensor([1.0, 1.5, 1.0]))
    # code sums: [0.1, 0.1], [2.0, 0.0], [0.2, 0.8]; embed_avg = 0.5 * embed + 0.5 * sums
    expected_avg = torch.tensor([[0.05, 0.05], [1.5, 0.0], [0.1, 0.9]])
    assert torch.allclose(vq.embed_avg, expected_avg)
    # n = 3.5; smoothed = (cluster_size + 0.1) / (3.5 + 3 * 0.1) * 3.5
    smoothed = torch.tensor([1.1, 1.6, 1.1]) / 3.8 * 3.5
    expected_embed = torch.tensor(
        [[0.05 / smoothed[0], 0.05 / smoothed[0]],
         [1.5 / smoothed[1], 0.0],
         [0.1 / smoothed[2], 0.9 / smoothed[2]]]
    )
    assert torch.allclose(vq.embed, expected_embed, atol=1e-6)
    assert vq.embed[1, 0].item() == pytest.approx(1.5 * 3.8 / 5.6, rel=1e-6)


def test_quantized_output_uses_the_codebook_from_before_the_update():
    vq = make_quantizer(EMBED_3x2, decay=0.5).train()
    out = vq(as_feature_map(INPUTS_4x2))
    assert torch.equal(out.quantized.reshape(2, 4).t(), EMBED_3x2[[0, 1, 1, 2]])


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_decay_sets_the_weight_of_the_old_statistics(decay):
    vq = make_quantizer(EMBED_3x2, decay=decay).train()
    vq(as_feature_map(INPUTS_4x2))
    counts = torch.tensor([1.0, 2.0, 1.0])
    assert torch.allclose(vq.cluster_size, decay * 1.0 + (1 - decay) * counts)


def test_eps_changes_the_smoothed_codebook():
    embeds = []
    for eps in (1e-5, 0.5):
        vq = make_quantizer(EMBED_3x2, decay=0.5, eps=eps).train()
        vq(as_feature_map(INPUTS_4x2))
        embeds.append(vq.embed.clone())
    assert not torch.allclose(embeds[0], embeds[1], atol=1e-3)


def test_straight_through_gradient_passes_unchanged_to_the_input():
    vq = make_quantizer(EMBED_3x2).train()
    z = as_feature_map(INPUTS_4x2).requires_grad_(True)
    out = vq(z)
    weights = torch.arange(8.0).reshape_as(z)
    (out.quantized * weights).sum().backward()
    assert torch.equal(z.grad, weights)


def test_eval_mode_leaves_every_buffer_bit_identical():
    torch.manual_seed(0)
    vq = VectorQuantizer(embed_dim=4, n_embed=8).train()
    vq(torch.randn(2, 4, 4, 4))  # initialise and update once, so buffers are non-trivial
    before = buffers(vq)
    vq.eval()
    for _ in range(3):
        vq(torch.randn(2, 4, 4, 4) * 5)
        vq.nearest_codes(torch.randn(2, 4, 4, 4))
    for name, value in buffers(vq).items():
        assert torch.equal(value, before[name]), name


def test_nearest_codes_never_updates_the_codebook_in_training_mode():
    torch.manual_seed(0)
    vq = VectorQuantizer(embed_dim=4, n_embed=8).train()
    before = buffers(vq)
    codes = vq.nearest_codes(torch.randn(2, 4, 4, 4))
    assert codes.shape == (2, 4, 4)
    for name, value in buffers(vq).items():
        assert torch.equal(value, before[name]), name


def test_first_training_batch_initialises_the_codebook_from_its_vectors():
    torch.manual_seed(0)
    data = 10.0 + torch.randn(64, 2)
    vq = VectorQuantizer(embed_dim=2, n_embed=8, restart_dead_codes=False).train()
    assert not vq.initialised
    out = vq(as_feature_map(data))
    assert vq.initialised and vq.state_dict()["initialised"]
    # the codes used for this batch were a sample of the batch itself
    chosen = out.quantized.reshape(2, 64).t()
    assert is_row_of(chosen, data).all()
    assert (vq.embed - 10.0).norm(dim=1).max() < 5.0


def test_without_init_from_data_the_codebook_starts_as_standard_normal_vectors():
    torch.manual_seed(0)
    data = 10.0 + torch.randn(64, 2)
    vq = VectorQuantizer(embed_dim=2, n_embed=8, init_from_data=False,
                         restart_dead_codes=False).train()
    vq(as_feature_map(data))
    assert not vq.initialised
    # only the nearest code moved towards the data; the rest stay near the origin
    assert ((vq.embed - 10.0).norm(dim=1) > 5.0).sum() >= 7


def test_loaded_initialised_codebook_is_not_reinitialised():
    torch.manual_seed(0)
    vq = VectorQuantizer(embed_dim=2, n_embed=8, restart_dead_codes=False).train()
    vq(as_feature_map(10.0 + torch.randn(64, 2)))
    restored = VectorQuantizer(embed_dim=2, n_embed=8, restart_dead_codes=False)
    restored.load_state_dict(vq.state_dict())
    restored.train()(as_feature_map(-10.0 + torch.randn(64, 2)))
    # a re-initialisation would put every code near -10; only the nearest code moves
    assert ((restored.embed - 10.0).norm(dim=1) < 5.0).sum() >= 7


def four_clusters() -> torch.Tensor:
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    return (centres.repeat_interleave(16, dim=0) + 0.1 * torch.randn(64, 2))


def far_away_codebook() -> torch.Tensor:
    """Codes 0 and 1 inside the data; codes 2 and 3 far from every input vector."""
    return torch.tensor([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0], [-100.0, -100.0]])


def test_dead_codes_are_restarted_at_encoder_outputs_and_then_used():
    data = four_clusters()
    vq = make_quantizer(far_away_codebook(), decay=0.9, restart_dead_codes=True,
                        dead_code_threshold=1.0).train()
    out = vq(as_feature_map(data))
    assert set(out.codes.unique().tolist()) == {0, 1}
    assert vq.n_restarted.item() == 2

    restarted = vq.embed[2:]
    assert is_row_of(restarted, data).all()
    # statistics reset consistently: embed_avg / cluster_size is the new code
    assert torch.allclose(vq.cluster_size[2:], torch.tensor([1.0, 1.0]))
    assert torch.allclose(vq.embed_avg[2:] / vq.cluster_size[2:, None], restarted)

    codes = vq.eval()(as_feature_map(data)).codes
    assert set(codes.unique().tolist()) == {0, 1, 2, 3}


def test_live_codes_are_not_restarted():
    data = four_clusters()
    restarting = make_quantizer(far_away_codebook(), decay=0.9, restart_dead_codes=True).train()
    plain = make_quantizer(far_away_codebook(), decay=0.9, restart_dead_codes=False).train()
    restarting(as_feature_map(data))
    plain(as_feature_map(data))
    # codes 0 and 1 only took their EMA step, exactly as without restarts
    assert torch.equal(restarting.embed[:2], plain.embed[:2])
    assert not torch.equal(restarting.embed[2:], plain.embed[2:])


@pytest.mark.parametrize(
    ("restart_dead_codes", "dead_code_threshold", "restarted"),
    [(True, 1.0, True), (False, 1.0, False), (True, 0.0, False), (True, 0.85, False),
     (True, 0.95, True)],
)
def test_restart_flag_and_threshold_decide_whether_unused_codes_move(
    restart_dead_codes, dead_code_threshold, restarted
):
    # unused codes' cluster_size decays from 1.0 to 0.9 after one step (decay 0.9)
    vq = make_quantizer(far_away_codebook(), decay=0.9, restart_dead_codes=restart_dead_codes,
                        dead_code_threshold=dead_code_threshold).train()
    vq(as_feature_map(four_clusters()))
    # Laplace smoothing alone shifts an unused code by a tiny fraction; a restart moves it far
    moved = not torch.allclose(vq.embed[2:], far_away_codebook()[2:], rtol=1e-3)
    assert moved == restarted


def test_statistics_stay_float32_under_bfloat16_autocast():
    torch.manual_seed(0)
    vq = VectorQuantizer(embed_dim=4, n_embed=8).train()
    z = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
        vq(z)
    for name in ("embed", "embed_avg", "cluster_size"):
        assert getattr(vq, name).dtype == torch.float32, name
    assert out.commitment_loss.dtype == torch.float32
    assert out.quantized.dtype == torch.bfloat16
    assert torch.isfinite(vq.embed).all()


def test_channels_last_input_gives_channels_last_output():
    vq = VectorQuantizer(embed_dim=4, n_embed=8).eval()
    z = torch.randn(2, 4, 4, 6).to(memory_format=torch.channels_last)
    out = vq(z)
    assert out.quantized.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.codes, vq.nearest_codes(z.contiguous()))


def test_worst_served_restart_puts_dead_codes_on_the_vectors_farthest_from_the_codebook():
    # 8 vectors: 6 close to code 0, 2 far out at (10, 0) and (0, 10); codes 1 and 2 are dead.
    near = torch.tensor([[0.1, 0.0], [0.0, 0.1], [-0.1, 0.0], [0.0, -0.1], [0.05, 0.05], [-0.05, -0.05]])
    data = torch.cat([near, torch.tensor([[10.0, 0.0], [0.0, 10.0]])])
    embed = torch.tensor([[0.0, 0.0], [50.0, 50.0], [-50.0, 50.0]])
    vq = make_quantizer(embed, decay=0.9, restart_dead_codes=True, restart_from="worst").train()
    vq(as_feature_map(data))
    assert vq.n_restarted.item() == 2
    moved = {tuple(row.tolist()) for row in vq.embed[1:]}
    # the 3 worst-served vectors are the two far ones and one near one: both dead codes land on
    # distinct vectors among them, never on the same one
    assert len(moved) == 2 and moved <= {(10.0, 0.0), (0.0, 10.0), *map(tuple, near.tolist())}
    far_hits = sum(row in moved for row in [(10.0, 0.0), (0.0, 10.0)])
    assert far_hits >= 1


def test_kmeans_refined_initialisation_serves_the_first_batch_better_than_a_sample():
    torch.manual_seed(0)
    centres = torch.randn(8, 4) * 5
    sizes = [100, 60, 30, 20, 10, 10, 5, 5]
    data = torch.cat([c + 0.3 * torch.randn(n, 4) for c, n in zip(centres, sizes)])
    data = data[torch.randperm(len(data))]

    def distortion(kmeans_iters: int) -> float:
        torch.manual_seed(1)  # the same random sample to start from
        vq = VectorQuantizer(4, 8, init_from_data=True, restart_dead_codes=False, kmeans_iters=kmeans_iters)
        vq.train()._initialise_once(data)
        return float(torch.cdist(data, vq.embed).min(dim=1).values.pow(2).mean())

    assert distortion(10) < 0.8 * distortion(0)


def test_cosine_lookup_keeps_unit_codes_and_ignores_the_input_scale():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 5)
    vq = VectorQuantizer(4, 8, cosine=True).train()
    out = vq(z)
    assert torch.allclose(vq.embed.norm(dim=1), torch.ones(8), atol=1e-6)
    assert torch.allclose(out.quantized.norm(dim=1), torch.ones(2, 3, 5), atol=1e-6)
    vq.eval()
    assert torch.equal(vq.nearest_codes(z), vq.nearest_codes(0.01 * z))  # direction alone decides
    # shrinking the encoder output towards a point no longer lowers the commitment loss
    assert vq(0.01 * z).commitment_loss == pytest.approx(float(vq(z).commitment_loss), rel=1e-4)
