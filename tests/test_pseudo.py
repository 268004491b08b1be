"""PLOP pseudo-labelling, per-class thresholds and their cache (utils/pseudo.py)."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from utils.pseudo import (
    Thresholds,
    ThresholdCache,
    ThresholdKey,
    accumulate_histogram,
    base_threshold_for,
    find_thresholds,
    median_from_histogram,
    parse_pseudo_mode,
    plop_entropy,
    pseudo_label,
    thresholds_from_histograms,
    weights_fingerprint,
)

# One image of 6 pixels, C_o = 3 old channels, C = 4 (class 3 is new). Logits = log p, so the
# old model's softmax is exactly these probabilities.
PROBS = torch.tensor([
    [0.10, 0.80, 0.10],  # bg pixel, argmax 1, m 0.8
    [0.50, 0.20, 0.30],  # bg pixel, argmax 0, m 0.5
    [0.20, 0.20, 0.60],  # bg pixel, argmax 2, m 0.6
    [0.10, 0.10, 0.80],  # new class 3: never relabelled
    [0.90, 0.05, 0.05],  # ignore 255: never relabelled
    [0.05, 0.90, 0.05],  # bg pixel, argmax 1, m 0.9
])
LOGITS = PROBS.log().T.reshape(1, 3, 1, 6)
LABELS = torch.tensor([[[0, 0, 0, 3, 255, 0]]])


def _entropy_u(p):
    """u = -(1/ln 3) * mean_c p ln p / ln 4, by hand."""
    return -sum(x * math.log(x) for x in p) / 3 / math.log(3) / math.log(4)


def test_plop_entropy_is_a_channel_mean_normalised_twice():
    u = plop_entropy(torch.softmax(LOGITS, 1)) / math.log(4)
    expected = [_entropy_u(p.tolist()) for p in PROBS]
    assert torch.allclose(u.flatten(), torch.tensor(expected), atol=1e-6)
    # by hand: [0.1,0.8,0.1] -> 0.6390319 / (3 ln3 ln4) = 0.1398625; [0.5,0.2,0.3] -> 0.2253563
    assert u[0, 0, 0].item() == pytest.approx(0.1398625, abs=1e-6)
    assert u[0, 0, 1].item() == pytest.approx(0.2253563, abs=1e-6)


def test_naive():
    out = pseudo_label(LABELS, LOGITS, "naive", nb_old_classes=3)
    assert out.labels.tolist() == [[[1, 0, 2, 3, 255, 1]]]
    assert out.pixel_weights is None and out.adaptive_factor is None
    assert LABELS.tolist() == [[[0, 0, 0, 3, 255, 0]]]  # input untouched


def test_threshold_x():
    out = pseudo_label(LABELS, LOGITS, "threshold_0.7", nb_old_classes=3)
    assert out.labels.tolist() == [[[1, 255, 255, 3, 255, 1]]]


def test_confidence_weights():
    out = pseudo_label(LABELS, LOGITS, "confidence", nb_old_classes=3)
    assert out.labels.tolist() == [[[1, 0, 2, 3, 255, 1]]]
    assert torch.allclose(out.pixel_weights, torch.tensor([[[0.8, 0.5, 0.6, 1.0, 1.0, 0.9]]]), atol=1e-6)


def test_median_uses_threshold_of_predicted_class():
    out = pseudo_label(LABELS, LOGITS, "median", nb_old_classes=3, thresholds=torch.tensor([0.45, 0.85, 0.55]))
    # m=0.8 < tau_1=0.85 -> 255; 0.5 >= tau_0; 0.6 >= tau_2; 0.9 >= tau_1
    assert out.labels.tolist() == [[[255, 0, 2, 3, 255, 1]]]


def test_entropy_and_adaptive_factor():
    labels = torch.cat([LABELS, torch.tensor([[[3, 3, 3, 3, 3, 255]]])])
    logits = torch.cat([LOGITS, LOGITS])
    thresholds = torch.tensor([0.3, 0.1, 0.2])
    out = pseudo_label(labels, logits, "entropy", nb_old_classes=3, nb_current_classes=4,
                       thresholds=thresholds, adaptive_factor=True)
    # u = [0.1399, 0.2254, 0.2080, ., ., 0.0863] vs tau[argmax] = [0.1, 0.3, 0.2, ., ., 0.1]
    assert out.labels[0].tolist() == [[255, 0, 255, 3, 255, 1]]
    assert out.labels[1].tolist() == [[3, 3, 3, 3, 3, 255]]
    # image 0: 2 confident of 4 background pixels; image 1: no background pixel -> 0
    assert out.adaptive_factor.shape == (2, 1, 1)
    assert out.adaptive_factor[0].item() == pytest.approx(2 / (4 + 1e-6), rel=1e-6)
    assert out.adaptive_factor[1].item() == 0.0

    clamped = pseudo_label(labels, logits, "entropy", 3, 4, thresholds, adaptive_factor=True,
                           adaptive_min_factor=0.6)
    assert clamped.adaptive_factor.flatten().tolist() == pytest.approx([0.6, 0.6])

    # max_entropy given explicitly = log(4) gives the same labels
    same = pseudo_label(labels, logits, "entropy", 3, thresholds=thresholds, max_entropy=math.log(4))
    assert torch.equal(same.labels, out.labels) and same.adaptive_factor is None


@pytest.mark.parametrize("mode", ["naive", "threshold_0.7", "confidence", "entropy"])
def test_precomputed_old_probabilities_give_the_same_pseudo_labels(mode):
    labels = torch.cat([LABELS, torch.tensor([[[3, 0, 0, 3, 0, 255]]])])
    logits = torch.cat([LOGITS, LOGITS.flip(-1)])
    kwargs = dict(nb_old_classes=3, nb_current_classes=4, thresholds=torch.tensor([0.3, 0.1, 0.2]))
    plain = pseudo_label(labels, logits, mode, **kwargs)
    shared = pseudo_label(labels, logits, mode, probs_old=torch.softmax(logits, dim=1), **kwargs)
    assert torch.equal(plain.labels, shared.labels)
    assert (plain.pixel_weights is None) == (shared.pixel_weights is None)
    if plain.pixel_weights is not None:
        assert torch.equal(plain.pixel_weights, shared.pixel_weights)


def test_keep_old_gt_protects_old_class_ground_truth():
    labels = torch.tensor([[[2, 0, 0, 3, 255, 0]]])  # pixel 0 carries old-class GT (memory sample)
    plop = pseudo_label(labels, LOGITS, "naive", 3)
    kept = pseudo_label(labels, LOGITS, "naive", 3, keep_old_gt=True)
    assert plop.labels.tolist() == [[[1, 0, 2, 3, 255, 1]]]  # PLOP: labels < C_o are all relabelled
    assert kept.labels.tolist() == [[[2, 0, 2, 3, 255, 1]]]


def test_mode_parsing_and_errors():
    assert parse_pseudo_mode("threshold_0.7") == ("threshold", 0.7)
    assert parse_pseudo_mode("median_0.5") == ("median", 0.5)
    assert parse_pseudo_mode("entropy") == ("entropy", None)
    for bad in ["median_", "threshold", "threshold_abc", "softmax", "naive_3", ""]:
        with pytest.raises(ValueError):
            parse_pseudo_mode(bad)
    with pytest.raises(ValueError, match="thresholds"):
        pseudo_label(LABELS, LOGITS, "median", 3)
    with pytest.raises(ValueError, match="adaptive"):
        pseudo_label(LABELS, LOGITS, "naive", 3, adaptive_factor=True)
    with pytest.raises(ValueError, match="channels"):
        pseudo_label(LABELS, LOGITS, "naive", 4)


def test_base_threshold_median_x_and_step_threshold():
    assert base_threshold_for("median", 0.9) == 0.9
    assert base_threshold_for("median_0.5", 0.9) == 0.5
    assert base_threshold_for("entropy", 0.001, step=2, step_threshold=0.01) == pytest.approx(0.021)


def _hist(counts, nb_bins=100):
    row = torch.zeros(nb_bins, dtype=torch.long)
    for position, count in counts.items():
        row[position] = count
    return row


def test_true_and_published_median_on_histograms():
    # [400, 400, 200]: the true median is in bin 1 at 0.01 + 100/400 * 0.01; the published loop
    # never stops (no single bin holds half), ends on the empty last bin: (500 - 4950) / 0 -> -inf
    counts = _hist({0: 400, 1: 400, 2: 200})
    assert median_from_histogram(counts) == pytest.approx(0.0125)
    assert median_from_histogram(counts, legacy=True) == -math.inf
    # [600, 300, 100]: both stop in bin 0: 500 / 600 * 0.01
    counts = _hist({0: 600, 1: 300, 2: 100})
    assert median_from_histogram(counts) == pytest.approx(0.01 * 5 / 6)
    assert median_from_histogram(counts, legacy=True) == pytest.approx(0.01 * 5 / 6, rel=1e-6)
    # bins 28: 10, 50: 810 (half 410). Published: running sum 0+1+..+28 = 406 when j = 29, whose
    # bin read is int(0.29 * 100) = 28: 406 <= 410 <= 416 -> 0.29 + 4/10 * 0.01 = 0.294.
    # True: bin 50, 0.50 + (410 - 10)/810 * 0.01.
    counts = _hist({28: 10, 50: 810})
    assert median_from_histogram(counts, legacy=True) == pytest.approx(0.294, abs=1e-7)
    assert median_from_histogram(counts) == pytest.approx(0.50 + 400 / 810 * 0.01)
    # [0, 0, 0, 2]: published stops at j=2 with running sum 1 == half on an empty bin: 0/0 = nan
    counts = _hist({3: 2})
    assert math.isnan(median_from_histogram(counts, legacy=True))
    assert median_from_histogram(counts) == pytest.approx(0.035)
    assert median_from_histogram(torch.zeros(20, dtype=torch.long)) == 0.0


def test_thresholds_clamp_per_statistic():
    hist = torch.stack([_hist({0: 400, 1: 400, 2: 200}), _hist({0: 600, 1: 300, 2: 100}),
                        torch.zeros(100, dtype=torch.long), _hist({3: 2})])
    true_entropy = thresholds_from_histograms(hist, "entropy", 0.01)
    assert true_entropy.tolist() == pytest.approx([0.0125, 0.01, 0.01, 0.035])
    legacy_entropy = thresholds_from_histograms(hist, "entropy", 0.001, legacy=True)
    assert legacy_entropy[:3].tolist() == pytest.approx([0.001, 0.01 * 5 / 6, 0.001], rel=1e-6)
    assert math.isnan(legacy_entropy[3])  # Python max(nan, x) keeps nan, as published
    # PLOP's published thresholds keep the -inf median; the SATS repository's (legacy=True)
    # replace it by 0.005 after the clamp
    plop_probability = thresholds_from_histograms(hist, "probability", 0.9, legacy="plop")
    assert plop_probability[0] == -math.inf and plop_probability[2] == 0.0
    sats_probability = thresholds_from_histograms(hist, "probability", 0.9, legacy=True)
    assert sats_probability[0].item() == pytest.approx(0.005) and sats_probability[2] == 0.0
    true_probability = thresholds_from_histograms(hist, "probability", 0.03)
    assert true_probability.tolist() == pytest.approx([0.0125, 0.01 * 5 / 6, 0.0, 0.03])


class _FixedOldModel(torch.nn.Module):
    """Deterministic old model: a 1x1 conv with seeded weights, returns (logits, extras)."""

    def __init__(self, channels=3):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.conv = torch.nn.Conv2d(3, channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 2)
            self.conv.bias.copy_(torch.randn(channels, generator=generator))

    def forward(self, x):
        return self.conv(x), {}


def _batches(seed, count=3):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        images = torch.randn(2, 3, 4, 5, generator=generator)
        labels = torch.randint(0, 5, (2, 4, 5), generator=generator)
        labels[labels == 4] = 255
        out.append((images, labels, torch.ones_like(labels)))
    return out


def test_find_thresholds_matches_manual_histogram():
    model = _FixedOldModel()
    batches = _batches(0)
    result = find_thresholds(model, batches, "cpu", "entropy", nb_old_classes=3, nb_current_classes=4)
    hist = torch.zeros(4, 100, dtype=torch.long)
    max_entropy = float(torch.log(torch.tensor(4.0)))
    for images, labels, _ in batches:
        probs = torch.softmax(model(images)[0], 1)
        u = plop_entropy(probs) / max_entropy
        for b, i, j in zip(*torch.nonzero(labels == 0, as_tuple=True)):
            hist[probs[b, :, i, j].argmax(), min(int(u[b, i, j] * 100), 99)] += 1
    assert result.max_entropy == pytest.approx(math.log(4))
    assert torch.equal(result.thresholds, thresholds_from_histograms(hist, "entropy", 0.9))
    with pytest.raises(ValueError, match="does not use"):
        find_thresholds(model, batches, "cpu", "naive", 3, 4)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        shard = _batches(0, count=4)[rank::world_size]
        result = find_thresholds(_FixedOldModel(), shard, "cpu", "median", 3, 4, nb_bins=20, threshold=0.95)
        torch.save(result.thresholds, os.path.join(out_dir, f"rank{rank}.pt"))
        # legacy thresholds stay per rank, and the cache keeps one file per rank
        cache = ThresholdCache(os.path.join(out_dir, "cache"))
        legacy = cache.get_or_compute(_key(legacy=True), lambda: find_thresholds(
            _FixedOldModel(), shard, "cpu", "median", 3, 4, nb_bins=20, threshold=0.95, legacy=True))
        torch.save(legacy.thresholds, os.path.join(out_dir, f"legacy{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_histograms_are_summed_across_ranks(tmp_path):
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    union = find_thresholds(_FixedOldModel(), _batches(0, count=4), "cpu", "median", 3, 4,
                            nb_bins=20, threshold=0.95)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(per_rank[0], union.thresholds) and torch.equal(per_rank[1], union.thresholds)
    # a single shard's thresholds differ from the union's (the published per-rank behaviour)
    alone = find_thresholds(_FixedOldModel(), _batches(0, count=4)[0::2], "cpu", "median", 3, 4,
                            nb_bins=20, threshold=0.95)
    assert not torch.equal(alone.thresholds, union.thresholds)
    for rank in range(2):
        shard_alone = find_thresholds(_FixedOldModel(), _batches(0, count=4)[rank::2], "cpu", "median",
                                      3, 4, nb_bins=20, threshold=0.95, legacy=True)
        assert torch.equal(torch.load(tmp_path / f"legacy{rank}.pt", weights_only=True),
                           shard_alone.thresholds)
    legacy_union = find_thresholds(_FixedOldModel(), _batches(0, count=4), "cpu", "median", 3, 4,
                                   nb_bins=20, threshold=0.95, legacy=True)
    assert not torch.equal(legacy_union.thresholds, shard_alone.thresholds)
    assert len(list((tmp_path / "cache").glob("thresholds_*.pt"))) == 2


def test_histogram_accumulation_is_additive():
    model = _FixedOldModel()
    batches = _batches(1, count=4)
    both = torch.zeros(4, 20, dtype=torch.long)
    parts = [torch.zeros(4, 20, dtype=torch.long) for _ in range(2)]
    for k, (images, labels, _) in enumerate(batches):
        logits = model(images)[0]
        accumulate_histogram(both, logits, labels, "probability")
        accumulate_histogram(parts[k % 2], logits, labels, "probability")
    assert torch.equal(parts[0] + parts[1], both)
    assert both.sum().item() == sum(int((labels == 0).sum()) for _, labels, _ in batches)


def _key(**changes):
    fields = dict(weights="abc", dataset="voc", task="15-1", step=1, mode="entropy", nb_bins=None,
                  legacy=False, threshold=0.001, step_threshold=None, nb_old_classes=16,
                  nb_current_classes=17, dataset_len=100, extra={"crop_size": 512})
    fields.update(changes)
    return ThresholdKey(**fields)


def test_cache_key_changes_with_every_dependency():
    base = _key().digest()
    assert _key().digest() == base
    for change in [dict(weights="abd"), dict(task="15-5"), dict(step=2), dict(mode="median"),
                   dict(nb_bins=50), dict(legacy=True), dict(dataset_len=101), dict(threshold=0.01),
                   dict(extra={"crop_size": 320}), dict(dataset="ade")]:
        assert _key(**change).digest() != base, change


def test_weights_fingerprint_tracks_weights():
    model = _FixedOldModel()
    before = weights_fingerprint(model)
    assert weights_fingerprint({"module." + k: v for k, v in model.state_dict().items()}) == before
    with torch.no_grad():
        model.conv.bias[0] += 1e-3
    assert weights_fingerprint(model) != before
    # BatchNorm's 0-dim num_batches_tracked and bf16 weights are hashed too
    normed = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).to(torch.bfloat16)
    first = weights_fingerprint(normed)
    normed[1].num_batches_tracked += 1
    assert weights_fingerprint(normed) != first


def test_cache_round_trip_and_compute_once(tmp_path):
    cache = ThresholdCache(tmp_path / "cache")
    calls = []

    def compute():
        calls.append(1)
        return Thresholds(torch.tensor([0.1, 0.2, 0.3]), 1.386)

    first = cache.get_or_compute(_key(), compute)
    second = cache.get_or_compute(_key(), compute)
    assert len(calls) == 1
    assert torch.equal(first.thresholds, second.thresholds) and second.max_entropy == 1.386
    assert cache.path(_key()).name == f"thresholds_{_key().digest()}.pt"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [cache.path(_key()).name]
    cache.get_or_compute(_key(step=2), compute)
    assert len(calls) == 2
