"""SecAgg+ protocol core: the unmasked sum equals plaintext weighted FedAvg, dropouts recover,
below threshold fails cleanly, masks hide the update, no site reveals both shares."""

import numpy as np
import pytest

from fedhealth.security.secagg import (
    SecAggError,
    SecAggParams,
    SecAggServer,
    SecAggSite,
    neighbour_graph,
)

PARAMS = SecAggParams(
    threshold=3, clipping_range=4.0, quantization_levels=1 << 20, max_examples=1000
)


def _round(
    updates, counts, degree=None, drop_before_input=(), drop_before_unmask=(), params=PARAMS
):
    ids = list(range(1, len(updates) + 1))
    graph = neighbour_graph(ids, degree)
    sites = {i: SecAggSite(i, params, graph[i]) for i in ids}
    server = SecAggServer(params, graph)
    server.publics = {i: s.advertise() for i, s in sites.items()}
    server.shared = {
        i: s.share_keys({j: server.publics[j] for j in [i, *graph[i]]}) for i, s in sites.items()
    }
    inbox = server.route()
    for i, s in sites.items():
        if i not in drop_before_input:
            server.masked[i] = s.masked_input(updates[i - 1], counts[i - 1], inbox[i])
    survivors, dropped = server.survivors_and_dropped()
    reveals = {
        i: sites[i].unmask(survivors, dropped) for i in survivors if i not in drop_before_unmask
    }
    return server.aggregate(reveals), server


def _fedavg(updates, counts, keep):
    w = np.array([counts[i] for i in keep], dtype=np.float64)
    return sum(wi * updates[i] for wi, i in zip(w, keep, strict=True)) / w.sum()


@pytest.fixture
def updates():
    rng = np.random.default_rng(0)
    return [rng.normal(0, 0.5, 5000) for _ in range(5)]


COUNTS = [10, 40, 25, 7, 100]
QUANT_ERROR = 2 * 4.0 / (1 << 20) * 1000 / 7 * 5  # per coordinate, generous


def test_securely_aggregated_mean_equals_plaintext_fedavg(updates):
    (mean, total), _ = _round(updates, COUNTS)
    assert total == sum(COUNTS)
    np.testing.assert_allclose(mean, _fedavg(updates, COUNTS, range(5)), atol=QUANT_ERROR)


def test_sparse_neighbour_graph_gives_the_same_sum(updates):
    (mean, _), _ = _round(updates, COUNTS, degree=4)
    np.testing.assert_allclose(mean, _fedavg(updates, COUNTS, range(5)), atol=QUANT_ERROR)


def test_site_dropping_after_its_masked_input_is_still_counted(updates):
    (mean, total), _ = _round(updates, COUNTS, drop_before_unmask=(2,))
    assert total == sum(COUNTS)
    np.testing.assert_allclose(mean, _fedavg(updates, COUNTS, range(5)), atol=QUANT_ERROR)


def test_site_dropping_before_its_input_is_recovered_from_the_survivors(updates):
    (mean, total), _ = _round(updates, COUNTS, drop_before_input=(4,))
    assert total == sum(COUNTS) - COUNTS[3]
    np.testing.assert_allclose(mean, _fedavg(updates, COUNTS, [0, 1, 2, 4]), atol=QUANT_ERROR)


def test_below_threshold_fails_cleanly(updates):
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        _round(updates, COUNTS, drop_before_input=(1, 2, 3))
    with pytest.raises(SecAggError, match="threshold"):
        _round(updates, COUNTS, drop_before_unmask=(1, 2, 3))


def test_masked_update_is_uncorrelated_with_the_plaintext(updates):
    _, server = _round(updates, COUNTS)
    for i, masked in server.masked.items():
        plain = updates[i - 1]
        r = np.corrcoef(masked[:-1].astype(np.float64), plain)[0, 1]
        assert abs(r) < 0.05, (i, r)
        # and uniform over the ring: mean close to 2^31
        assert abs(masked.astype(np.float64).mean() / 2**31 - 1) < 0.05


def _three_sites_sharing():
    ids = [1, 2, 3]
    graph = neighbour_graph(ids)
    params = SecAggParams(threshold=2, max_examples=10)
    sites = {i: SecAggSite(i, params, graph[i]) for i in ids}
    publics = {i: s.advertise() for i, s in sites.items()}
    shared = {i: s.share_keys(publics) for i, s in sites.items()}
    return sites, {i: {src: boxes[i] for src, boxes in shared.items()} for i in ids}


def test_no_site_reveals_both_shares_of_one_site():
    sites, inbox = _three_sites_sharing()
    for i, s in sites.items():
        s.masked_input(np.zeros(4), 1, inbox[i])
    sites[1].unmask([1, 2], [3])  # seeds of 1, 2; key of 3
    with pytest.raises(SecAggError, match="other share of 3"):
        sites[1].unmask([1, 2, 3], [])  # now asked for 3's seed too
    with pytest.raises(SecAggError, match="both shares"):
        sites[2].unmask([1, 2, 3], [3])


def test_tampered_share_fails_authentication():
    sites, inbox = _three_sites_sharing()
    blob = bytearray(inbox[1][2])
    blob[-1] ^= 1
    inbox[1][2] = bytes(blob)
    sites[1].masked_input(np.zeros(4), 1, inbox[1])
    with pytest.raises(SecAggError, match="fails authentication"):
        sites[1].unmask([1, 2, 3], [])


@pytest.mark.parametrize("bad", [np.array([np.nan, 0.0]), np.array([np.inf, 1.0])])
def test_site_refuses_to_mask_a_non_finite_update(bad):
    site = SecAggSite(1, SecAggParams(threshold=2, max_examples=10), [2])
    with pytest.raises(SecAggError, match="NaN or infinite"):
        site.masked_input(bad, 1, {})
    with pytest.raises(SecAggError, match="out of bounds"):
        site.masked_input(np.zeros(2), 11, {})


def test_logarithmic_graph_at_scale_recovers_the_sum_with_dropouts():
    """SecAgg+'s k ~ 2 log2 n graph: 40 sites, 10 neighbours each, threshold from the
    neighbourhood; 3 sites drop before their input, 2 after it."""
    from fedhealth.security.secagg import auto_degree

    n, degree = 40, auto_degree(40)
    assert degree == 12 and degree < n - 1
    rng = np.random.default_rng(3)
    many = [rng.normal(0, 0.5, 300) for _ in range(n)]
    counts = [int(c) for c in rng.integers(5, 50, n)]
    params = SecAggParams(
        threshold=int(np.ceil(0.51 * (degree + 1))),
        clipping_range=4.0,
        quantization_levels=1 << 20,
        max_examples=1000,
    )
    (mean, total), server = _round(
        many,
        counts,
        degree,
        drop_before_input=(5, 6, 30),
        drop_before_unmask=(11, 12),
        params=params,
    )
    keep = [i - 1 for i in range(1, n + 1) if i not in (5, 6, 30)]
    assert total == sum(counts[i] for i in keep)
    bound = 2 * 4.0 / (1 << 20) * 1000 / 5 * n
    np.testing.assert_allclose(mean, _fedavg(many, counts, keep), atol=bound)
    assert max(len(peers) for peers in server.graph.values()) == degree  # not every other site


def test_masks_made_block_by_block_are_the_one_chacha20_keystream():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    from fedhealth.security.secagg_primitives import apply_mask, keystream, prg

    key = bytes(range(32))
    whole = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    expected = np.frombuffer(whole.update(bytes(4 * 10)), dtype="<u4")
    np.testing.assert_array_equal(np.concatenate(list(keystream(key, 10, chunk=3))), expected)
    np.testing.assert_array_equal(prg(key, 10), expected)
    vector = np.arange(10, dtype=np.uint32)
    apply_mask(vector, key, +1)
    apply_mask(vector, key, -1)  # modulo 2^32 both ways
    np.testing.assert_array_equal(vector, np.arange(10, dtype=np.uint32))


def test_a_vector_spanning_several_mask_blocks_sums_exactly():
    """Updates longer than one mask block (a real-size model is ~30 blocks): the blocks meet
    without a seam, with dropouts too."""
    from fedhealth.security.secagg_primitives import MASK_CHUNK

    rng = np.random.default_rng(3)
    big = [rng.normal(0, 0.5, MASK_CHUNK + 7) for _ in range(4)]
    counts = [10, 40, 25, 7]
    (mean, total), _ = _round(big, counts, drop_before_input=(2,))
    assert total == sum(counts) - 40
    np.testing.assert_allclose(mean, _fedavg(big, counts, [0, 2, 3]), atol=QUANT_ERROR)


def test_the_mean_in_float32_is_the_float64_mean_rounded_across_blocks():
    """The coordinator asks for the model's float32: dequantised block by block in float64,
    stored in float32, the same values as the float64 mean rounded once (blocks meet without a
    seam)."""
    from fedhealth.security.secagg_primitives import MASK_CHUNK, dequantize_sum

    total = np.random.default_rng(4).integers(0, 5 << 20, 2 * MASK_CHUNK + 3, dtype=np.uint32)
    wide = dequantize_sum(total, 123, 5, PARAMS)
    narrow = dequantize_sum(total, 123, 5, PARAMS, np.float32)
    assert wide.dtype == np.float64 and narrow.dtype == np.float32
    # the formula, whole-vector: (q * 2c / L - n c) * M / W
    expected = (total * (2 * 4.0 / (1 << 20)) - 5 * 4.0) * (1000 / 123)
    np.testing.assert_array_equal(wide, expected)
    np.testing.assert_array_equal(narrow, wide.astype(np.float32))
