"""utils/loss.py: hand-computed cases and loop-based restatements of the originals' formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils.loss import (BCEWithLogitsLossWithIgnoreIndex, IcarlLoss, KnowledgeDistillationLoss,
                        UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss,
                        features_distillation, features_l2, global_pod, icarl_distillation,
                        local_pod, resolve_pod_options, spatial_pod)

IGNORE = 255


def logits(*channel_values):
    """``1 x C x 1 x P`` logits from per-channel lists of ``P`` pixel values."""
    return torch.tensor(channel_values, dtype=torch.float32)[None, :, None, :]


def labels(*values):
    return torch.tensor(values, dtype=torch.long)[None, None, :]


def lse(*values):
    return math.log(sum(math.exp(v) for v in values))


def softplus(v):
    return math.log1p(math.exp(v))


def close(actual, expected, rtol=1e-5, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# UnbiasedCrossEntropy
# ---------------------------------------------------------------------------------------------

# Three channels: 0 background, 1 an old class, 2 the new class (C_o = 2).
UNCE_Z = logits([1.0, 0.0, 0.5], [2.0, 0.0, -1.0], [3.0, 0.0, 2.0])
UNCE_Y = labels(2, 1, IGNORE)
UNCE_NEW = -(3.0 - lse(1.0, 2.0, 3.0))                 # new class: ordinary log-softmax
UNCE_OLD = -(lse(0.0, 0.0) - lse(0.0, 0.0, 0.0))       # old class -> bg+old merged = log(3/2)


def test_unce_hand_computed_every_reduction():
    assert UNCE_OLD == pytest.approx(math.log(1.5))
    close(UnbiasedCrossEntropy(2, reduction="none")(UNCE_Z, UNCE_Y), [[[UNCE_NEW, UNCE_OLD, 0.0]]])
    close(UnbiasedCrossEntropy(2, reduction="sum")(UNCE_Z, UNCE_Y), UNCE_NEW + UNCE_OLD)
    # 'mean' is over the non-ignored pixels (F.nll_loss semantics).
    close(UnbiasedCrossEntropy(2, reduction="mean")(UNCE_Z, UNCE_Y), (UNCE_NEW + UNCE_OLD) / 2)


def test_unce_mask_ignores_pixels_and_targets_are_not_modified():
    targets = UNCE_Y.clone()
    mask = torch.tensor([[[True, False, False]]])
    out = UnbiasedCrossEntropy(2, reduction="none")(UNCE_Z, targets, mask)
    close(out, [[[0.0, UNCE_OLD, 0.0]]])
    close(UnbiasedCrossEntropy(2, reduction="mean")(UNCE_Z, targets, mask), UNCE_OLD)
    assert torch.equal(targets, UNCE_Y)  # the old-class pixel still reads 1, not 0


def test_unce_without_new_classes_is_zero_and_old_cl_zero_is_plain_ce():
    z = torch.randn(2, 4, 3, 3)
    y = torch.randint(0, 4, (2, 3, 3))
    close(UnbiasedCrossEntropy(4, reduction="none")(z, y), torch.zeros(2, 3, 3))
    y[0, 0, 0] = IGNORE
    close(UnbiasedCrossEntropy(0, reduction="none")(z, y),
          F.cross_entropy(z, y, ignore_index=IGNORE, reduction="none"))


def test_unce_all_ignored_mean_is_zero_not_nan():
    out = UnbiasedCrossEntropy(1)(UNCE_Z, labels(IGNORE, IGNORE, IGNORE))
    assert out.item() == 0.0


def unce_reference(z, y, old_cl):
    out = torch.zeros(y.shape, dtype=torch.float64)
    for b, h, w in torch.cartesian_prod(*[torch.arange(s) for s in y.shape]).tolist():
        label = int(y[b, h, w])
        if label == IGNORE:
            continue
        values = z[b, :, h, w].double().tolist()
        den = lse(*values)
        out[b, h, w] = -(lse(*values[:old_cl]) - den) if label < old_cl else -(values[label] - den)
    return out


def test_unce_matches_loop_reference():
    z = torch.randn(2, 6, 3, 4) * 3
    y = torch.randint(0, 6, (2, 3, 4))
    y[torch.rand(2, 3, 4) < 0.25] = IGNORE
    ref = unce_reference(z, y, old_cl=4)
    close(UnbiasedCrossEntropy(4, reduction="none")(z, y), ref)
    close(UnbiasedCrossEntropy(4, reduction="sum")(z, y), ref.sum())
    close(UnbiasedCrossEntropy(4, reduction="mean")(z, y), ref.sum() / (y != IGNORE).sum())


def test_unce_rejects_bad_arguments():
    with pytest.raises(ValueError, match="old_cl"):
        UnbiasedCrossEntropy(None)
    with pytest.raises(ValueError, match="reduction"):
        UnbiasedCrossEntropy(2, reduction="avg")
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        UnbiasedCrossEntropy(2)(UNCE_Z, labels(7, 0, 0))
    with pytest.raises(ValueError, match="mask"):
        UnbiasedCrossEntropy(2)(UNCE_Z, UNCE_Y, torch.ones(1, 1, 3))


# ---------------------------------------------------------------------------------------------
# KnowledgeDistillationLoss / UnbiasedKnowledgeDistillationLoss
# ---------------------------------------------------------------------------------------------

def test_kd_hand_computed():
    # Student old channels [0, log 3] -> p = [1/4, 3/4]; teacher [0, 0] -> q = [1/2, 1/2].
    # l = -(1/2) * (1/2 log 1/4 + 1/2 log 3/4) = log(16/3) / 4; channel 2 (new) is not used.
    z = logits([0.0, 0.0], [math.log(3.0), 0.0], [5.0, -7.0])
    z_old = logits([0.0, 0.0], [0.0, 0.0])
    first = math.log(16 / 3) / 4
    second = math.log(2.0) / 2  # p = q = [1/2, 1/2]: H(q) / C_o
    kd = KnowledgeDistillationLoss(reduction="none")
    close(kd(z, z_old), [[[first, second]]])
    close(KnowledgeDistillationLoss()(z, z_old), (first + second) / 2)
    close(KnowledgeDistillationLoss(reduction="sum")(z, z_old), first + second)
    # The mask multiplies; the mean still divides by both pixels.
    mask = torch.tensor([[[True, False]]])
    close(KnowledgeDistillationLoss()(z, z_old, mask), first / 2)


def test_kd_alpha_scales_only_the_teacher():
    # alpha = 2 on teacher [0, log 2] -> q = softmax([0, log 4]) = [1/5, 4/5].
    z = logits([0.0], [math.log(3.0)])
    z_old = logits([0.0], [math.log(2.0)])
    expected = -(0.2 * math.log(0.25) + 0.8 * math.log(0.75)) / 2
    close(KnowledgeDistillationLoss(reduction="none", alpha=2.0)(z, z_old), [[[expected]]])


def test_kd_identical_teacher_and_student_is_entropy_over_old_channels():
    z_old = torch.randn(2, 5, 3, 3)
    z = torch.cat([z_old, torch.randn(2, 2, 3, 3)], dim=1)
    q = torch.softmax(z_old, dim=1)
    close(KnowledgeDistillationLoss(reduction="none")(z, z_old), -(q * q.log()).sum(1) / 5)


def test_unkd_hand_computed():
    # C_o = 2, C = 3: D = log 6; log p_bg = log((1 + 3) / 6); log p_1 = log(2 / 6).
    z = logits([0.0], [math.log(2.0)], [math.log(3.0)])
    z_old = logits([0.0], [0.0])
    expected = -(0.5 * math.log(4 / 6) + 0.5 * math.log(2 / 6)) / 2
    close(UnbiasedKnowledgeDistillationLoss(reduction="none")(z, z_old), [[[expected]]])
    close(UnbiasedKnowledgeDistillationLoss()(z, z_old), expected)
    mask = torch.tensor([[[False]]])
    close(UnbiasedKnowledgeDistillationLoss(reduction="sum")(z, z_old, mask), 0.0)


def test_unkd_with_no_new_class_equals_kd():
    # The original slices 1:-0 (empty) here; 1:C_o gives ordinary KD.
    z = logits([0.0, 0.0], [math.log(3.0), 0.0])
    z_old = logits([0.0, 0.0], [0.0, 0.0])
    unkd = UnbiasedKnowledgeDistillationLoss(reduction="none")(z, z_old)
    close(unkd, [[[math.log(16 / 3) / 4, math.log(2.0) / 2]]])
    z, z_old = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    close(UnbiasedKnowledgeDistillationLoss(alpha=0.5)(z, z_old),
          KnowledgeDistillationLoss(alpha=0.5)(z, z_old))


def test_unkd_equals_kd_when_new_classes_vanish():
    z_old = torch.randn(2, 4, 3, 3)
    z = torch.cat([torch.randn(2, 4, 3, 3), torch.full((2, 2, 3, 3), -1e4)], dim=1)
    close(UnbiasedKnowledgeDistillationLoss(reduction="none")(z, z_old),
          KnowledgeDistillationLoss(reduction="none")(z, z_old))


def kd_reference(z, z_old, alpha, unbiased):
    old_cl = z_old.shape[1]
    out = torch.zeros((z.shape[0],) + tuple(z.shape[2:]), dtype=torch.float64)
    for b, h, w in torch.cartesian_prod(*[torch.arange(s) for s in out.shape]).tolist():
        new = z[b, :, h, w].double().tolist()
        teacher = [alpha * v for v in z_old[b, :, h, w].double().tolist()]
        q = [math.exp(v - lse(*teacher)) for v in teacher]
        if unbiased:
            den = lse(*new)
            log_p = [lse(new[0], *new[old_cl:]) - den] + [v - den for v in new[1:old_cl]]
        else:
            log_p = [v - lse(*new[:old_cl]) for v in new[:old_cl]]
        out[b, h, w] = -sum(qc * lp for qc, lp in zip(q, log_p)) / old_cl
    return out


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("new_classes", [0, 3])
def test_kd_and_unkd_match_loop_reference(unbiased, new_classes):
    z_old = torch.randn(2, 4, 3, 2) * 2
    z = torch.randn(2, 4 + new_classes, 3, 2) * 2
    mask = torch.rand(2, 3, 2) < 0.5
    ref = kd_reference(z, z_old, alpha=1.5, unbiased=unbiased)
    cls = UnbiasedKnowledgeDistillationLoss if unbiased else KnowledgeDistillationLoss
    close(cls(reduction="none", alpha=1.5)(z, z_old), ref)
    close(cls(reduction="mean", alpha=1.5)(z, z_old), ref.mean())
    close(cls(reduction="sum", alpha=1.5)(z, z_old, mask), (ref * mask).sum())


def unkd_written_out(z, z_old):
    """The formula as autograd sees it written out (slices, logsumexp), for gradient checks."""
    old_cl = z_old.shape[1]
    log_p = torch.log_softmax(z, dim=1)
    log_bg = torch.logsumexp(torch.cat([log_p[:, :1], log_p[:, old_cl:]], dim=1), dim=1)
    q = torch.softmax(z_old, dim=1)
    return -(q[:, 0] * log_bg + (q[:, 1:] * log_p[:, 1:old_cl]).sum(dim=1)) / old_cl


@pytest.mark.parametrize("channels,old_channels", [(6, 4), (4, 4), (5, 1)])
def test_unkd_gradient_equals_the_written_out_formula(channels, old_channels):
    z = (torch.randn(2, channels, 3, 4, dtype=torch.float64) * 3).requires_grad_()
    z_old = torch.randn(2, old_channels, 3, 4, dtype=torch.float64) * 3
    weights = torch.rand(2, 3, 4, dtype=torch.float64)
    fused = UnbiasedKnowledgeDistillationLoss(reduction="none")(z, z_old)
    written = unkd_written_out(z, z_old)
    (g_fused,) = torch.autograd.grad((fused * weights).sum(), z)
    (g_written,) = torch.autograd.grad((written.float() * weights).sum(), z)
    close(fused, written.float())
    assert torch.allclose(g_fused.double(), g_written.double(), atol=1e-6)


def test_unkd_gradcheck_and_repeated_backward():
    from utils.loss import _UnbiasedKDMap

    z = torch.randn(2, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(2, 3, 2, 3, dtype=torch.float64), dim=1)
    assert torch.autograd.gradcheck(lambda x: _UnbiasedKDMap.apply(x, q), (z,))


def test_unkd_gradient_stays_finite_when_the_background_group_underflows():
    # p_bg ~ e^-200: the gradient splits q_0 over the group by the student's own shares.
    z = torch.tensor([0.0, 200.0, -1.0, 0.0]).view(1, 4, 1, 1).requires_grad_()
    z_old = torch.tensor([5.0, 0.0]).view(1, 2, 1, 1)
    UnbiasedKnowledgeDistillationLoss()(z, z_old).backward()
    q0 = 1 / (1 + math.exp(-5.0))
    group = torch.softmax(torch.tensor([0.0, -1.0, 0.0]), dim=0)  # channels 0, 2, 3
    expected = torch.stack([-q0 * group[0], torch.tensor(1 - (1 - q0)), -q0 * group[1], -q0 * group[2]]) / 2
    assert torch.isfinite(z.grad).all()
    close(z.grad.flatten(), expected)


def test_kd_losses_accept_the_teacher_probabilities():
    z, z_old = torch.randn(2, 6, 3, 3), torch.randn(2, 4, 3, 3)
    q = torch.softmax(z_old, dim=1)
    for cls in (KnowledgeDistillationLoss, UnbiasedKnowledgeDistillationLoss):
        close(cls(reduction="none")(z, z_old, teacher=q), cls(reduction="none")(z, z_old))
        with pytest.raises(ValueError, match="teacher probabilities"):
            cls()(z, z_old, teacher=q[:, :3])
    log_p = torch.log_softmax(z, dim=1)  # the trainer shares the criterion's log-softmax with UNKD
    unkd = UnbiasedKnowledgeDistillationLoss(reduction="none")
    close(unkd(z, z_old, log_probs=log_p), unkd(z, z_old))
    with pytest.raises(ValueError, match="log_probs"):
        unkd(z, z_old, log_probs=log_p[:, :5])


def test_kd_rejects_a_teacher_with_more_channels():
    with pytest.raises(ValueError, match="old model has 3 channels"):
        KnowledgeDistillationLoss()(torch.randn(1, 2, 2, 2), torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="spatial"):
        UnbiasedKnowledgeDistillationLoss()(torch.randn(1, 3, 2, 2), torch.randn(1, 2, 2, 3))


# ---------------------------------------------------------------------------------------------
# BCE, iCaRL, ILT
# ---------------------------------------------------------------------------------------------

# BCE-with-logits(z, t) = softplus(z) - t * z.
BCE_Z = logits([0.0, 1.0, 2.0], [0.0, 1.0, -1.0])
BCE_Y = labels(1, IGNORE, 0)
BCE_PIX0 = 2 * math.log(2.0)
BCE_PIX2 = (softplus(2.0) - 2.0) + softplus(-1.0)


def test_bce_hand_computed_every_reduction():
    close(BCEWithLogitsLossWithIgnoreIndex(reduction="none")(BCE_Z, BCE_Y),
          [[[BCE_PIX0, 0.0, BCE_PIX2]]])
    close(BCEWithLogitsLossWithIgnoreIndex(reduction="sum")(BCE_Z, BCE_Y), BCE_PIX0 + BCE_PIX2)
    # 'mean' averages over the two valid pixels only (MiB/SSUL).
    close(BCEWithLogitsLossWithIgnoreIndex()(BCE_Z, BCE_Y), (BCE_PIX0 + BCE_PIX2) / 2)


def test_bce_pixel_weights_and_all_ignored_batch():
    weight = torch.tensor([[[0.5, 3.0, 2.0]]])
    close(BCEWithLogitsLossWithIgnoreIndex()(BCE_Z, BCE_Y, weight),
          (0.5 * BCE_PIX0 + 2.0 * BCE_PIX2) / 2)
    all_ignored = labels(IGNORE, IGNORE, IGNORE)
    assert BCEWithLogitsLossWithIgnoreIndex()(BCE_Z, all_ignored).item() == 0.0


def test_bce_rejects_labels_beyond_the_channels():
    with pytest.raises(ValueError, match=r"labels \[2\]"):
        BCEWithLogitsLossWithIgnoreIndex()(BCE_Z, labels(2, 0, 0))


def test_icarl_hand_computed():
    # C = 3, C_o = 2; old probabilities [1/4, 3/4] replace the one-hot of channels 0 and 1.
    z = logits([1.0, 1.0], [-1.0, -1.0], [2.0, 2.0])
    y = labels(2, IGNORE)
    old = torch.tensor([0.25, 0.75])[None, :, None, None].expand(1, 2, 1, 2)
    base = (softplus(1.0) - 0.25) + (softplus(-1.0) + 0.75)
    labelled = base + softplus(2.0) - 2.0      # channel 2 target = 1
    ignored = base + softplus(2.0)             # ignored pixel: channel 2 target = 0
    close(IcarlLoss(reduction="none")(z, y, old), [[[labelled, ignored]]])
    close(IcarlLoss()(z, y, old), (labelled + ignored) / 2)  # ignored pixel counts
    close(IcarlLoss(reduction="sum")(z, y, old), labelled + ignored)
    # bkg=True keeps the ground-truth background (0 here) on channel 0.
    bkg_labelled = labelled + 0.25
    close(IcarlLoss(reduction="none", bkg=True)(z, y, old), [[[bkg_labelled, ignored + 0.25]]])


def icarl_reference(z, y, old_probs, bkg):
    out = torch.zeros(y.shape, dtype=torch.float64)
    old_cl = old_probs.shape[1]
    for b, h, w in torch.cartesian_prod(*[torch.arange(s) for s in y.shape]).tolist():
        total = 0.0
        for c in range(z.shape[1]):
            target = 1.0 if int(y[b, h, w]) == c else 0.0
            if c < old_cl and (c > 0 or not bkg):
                target = float(old_probs[b, c, h, w])
            zc = float(z[b, c, h, w])
            total += softplus(zc) - target * zc
        out[b, h, w] = total
    return out


@pytest.mark.parametrize("bkg", [False, True])
def test_icarl_matches_loop_reference(bkg):
    z = torch.randn(2, 5, 3, 2)
    y = torch.randint(0, 5, (2, 3, 2))
    y[torch.rand(2, 3, 2) < 0.3] = IGNORE
    old = torch.sigmoid(torch.randn(2, 3, 3, 2))
    ref = icarl_reference(z, y, old, bkg)
    close(IcarlLoss(reduction="none", bkg=bkg)(z, y, old), ref)
    close(IcarlLoss(reduction="mean", bkg=bkg)(z, y, old), ref.mean())


def test_icarl_distillation_hand_computed():
    # C_o = 2 old channels over 2 pixels; channel 2 (new) is left out.
    z = logits([0.0, 1.0], [2.0, 0.0], [9.0, 9.0])
    z_old = logits([0.0, math.log(3.0)], [0.0, 0.0])  # sigmoid: [1/2, 3/4], [1/2, 1/2]
    terms = [math.log(2.0), softplus(1.0) - 0.75, softplus(2.0) - 1.0, math.log(2.0)]
    close(icarl_distillation(z, z_old), 2 * sum(terms) / 4)


def test_features_l2_is_the_element_mean_of_squares():
    new = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    old = torch.tensor([[[[0.0, 0.0]], [[3.0, 2.0]]]])
    close(features_l2(new, old), (1 + 4 + 0 + 4) / 4)
    with pytest.raises(ValueError, match="same shape"):
        features_l2(new, old[..., :1])


# ---------------------------------------------------------------------------------------------
# POD
# ---------------------------------------------------------------------------------------------

def test_local_pod_on_a_4x4_map_by_hand():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    scale1 = [1.5, 5.5, 9.5, 13.5] + [6.0, 7.0, 8.0, 9.0]
    scale2 = ([0.5, 4.5] + [2.0, 3.0] + [2.5, 6.5] + [4.0, 5.0]
              + [8.5, 12.5] + [10.0, 11.0] + [10.5, 14.5] + [12.0, 13.0])
    scale4 = [v for pixel in range(16) for v in (pixel, pixel)]
    close(local_pod(x, [1, 2, 4]), [scale1 + scale2 + scale4])
    by_region_count = [v / 4 for v in scale2] + [v / 16 for v in scale4]
    close(local_pod(x, [1, 2, 4], normalize_per_scale=True), [scale1 + by_region_count])
    spm = [v / 4 for v in scale1] + [v / 4 for v in scale2] + [v / 2 for v in scale4]
    close(local_pod(x, [1, 2, 4], normalize_per_scale="spm"), [spm])


def local_pod_reference(x, scales):
    rows = []
    for sample in x.double():
        emb = []
        for s in scales:
            k = x.shape[-1] // s
            for i in range(s):
                for j in range(s):
                    region = sample[:, i * k:(i + 1) * k, j * k:(j + 1) * k]
                    for c in range(region.shape[0]):
                        emb += [sum(region[c, r].tolist()) / region.shape[2]
                                for r in range(region.shape[1])]
                    for c in range(region.shape[0]):
                        emb += [sum(region[c, :, col].tolist()) / region.shape[1]
                                for col in range(region.shape[2])]
        rows.append(emb)
    return torch.tensor(rows)


def test_local_pod_matches_reference_with_channels_and_remainders():
    x = torch.randn(2, 3, 6, 6)
    close(local_pod(x, [1, 2, 4]), local_pod_reference(x, [1, 2, 4]))  # 6 // 4 drops 2 px
    with pytest.raises(ValueError, match="empty rows"):
        local_pod(torch.randn(1, 1, 3, 4), [4])


def test_spatial_and_global_pod_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    close(spatial_pod(x), [[3.0, 7.0, 4.0, 6.0]])
    y = torch.arange(16.0).reshape(1, 1, 4, 4)  # 2x2 average pool: [[2.5, 4.5], [10.5, 12.5]]
    close(global_pod(y, [2]), [[13.0, 17.0, 7.0, 23.0]])


def one_map_pod(old, new, **kwargs):
    defaults = dict(collapse_channels="local", spp_scales=[1], use_pod_schedule=False,
                    pod_factor=2.0)
    defaults.update(kwargs)
    return features_distillation([old], [new], **defaults)


NEW_2X2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]


def test_pod_single_map_by_hand_prepro_and_factor():
    old = torch.zeros(1, 1, 2, 2)
    # prepro none: row means [1.5, 3.5], column means [2, 3].
    close(one_map_pod(old, NEW_2X2, prepro="none"), 2.0 * math.sqrt(27.5))
    # prepro pow squares first: row means [2.5, 12.5], column means [5, 10].
    close(one_map_pod(old, NEW_2X2), 2.0 * math.sqrt(287.5))
    close(one_map_pod(old, NEW_2X2, prepro="relu"), one_map_pod(old, NEW_2X2, prepro="none"))
    l1 = one_map_pod(old, NEW_2X2, prepro="none", pod_options={"difference_function": "l1"})
    close(l1, 2.0 * (1.5 + 3.5 + 2 + 3))


def test_pod_normalize_argument_is_ignored_but_norm_option_normalises():
    old = torch.ones(1, 1, 2, 2)
    plain = one_map_pod(old, NEW_2X2, prepro="none", normalize=False)
    close(one_map_pod(old, NEW_2X2, prepro="none", normalize=True), plain)
    normed = one_map_pod(old, NEW_2X2, prepro="none",
                         pod_options={"switch": {"after": {"norm": True}}})
    e_old = torch.tensor([1.0, 1.0, 1.0, 1.0])
    e_new = torch.tensor([1.5, 3.5, 2.0, 3.0])
    close(normed, 2.0 * (e_old / e_old.norm() - e_new / e_new.norm()).norm())


def test_pod_extra_channels_sum_versus_trim():
    old = torch.zeros(1, 2, 1, 1)
    new = torch.tensor([1.0, 2.0, 3.0])[None, :, None, None]
    # sum: channel 0 becomes 1 + 3 = 4, embedding [4, 2, 4, 2]; trim: [1, 2, 1, 2].
    summed = one_map_pod(old, new, prepro="none", index_new_class=2, pod_factor=1.0)
    close(summed, math.sqrt(40.0))
    trimmed = one_map_pod(old, new, prepro="none", index_new_class=2, pod_factor=1.0,
                          pod_options={"switch": {"after": {"extra_channels": "trim"}}})
    close(trimmed, math.sqrt(10.0))
    # Raw logits are summed, then squared: [16, 4, 16, 4].
    close(one_map_pod(old, new, index_new_class=2, pod_factor=1.0), math.sqrt(544.0))


def test_pod_schedule_factor():
    old = torch.zeros(1, 1, 2, 2)
    scheduled = one_map_pod(old, NEW_2X2, prepro="none", use_pod_schedule=True,
                            nb_current_classes=17, nb_new_classes=1)
    close(scheduled, math.sqrt(17.0) * 2.0 * math.sqrt(27.5))
    # Defaults -1 / -1 give a factor of 1, as in PLOP.
    close(one_map_pod(old, NEW_2X2, prepro="none", use_pod_schedule=True),
          2.0 * math.sqrt(27.5))
    with pytest.raises(ValueError, match="schedule"):
        one_map_pod(old, NEW_2X2, use_pod_schedule=True, nb_current_classes=16, nb_new_classes=0)


PLOP_POD_OPTIONS = {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005,
                                         "type": "local"}}}


def test_pod_plop_preset_closed_form():
    torch.manual_seed(3)
    old = [torch.randn(2, 3, 8, 8) for _ in range(5)] + [torch.randn(2, 16, 8, 8)]
    new = [torch.randn(2, 3, 8, 8) for _ in range(5)] + [torch.randn(2, 17, 8, 8)]
    loss = features_distillation(old, new, collapse_channels="local", labels=None,
                                 index_new_class=16, pod_factor=0.01, prepro="pow",
                                 spp_scales=[1, 2, 4], pod_options=PLOP_POD_OPTIONS,
                                 use_pod_schedule=True, nb_current_classes=17, nb_new_classes=1)
    summed_last = torch.cat([new[5][:, :1] + new[5][:, 16:], new[5][:, 1:16]], dim=1)
    distances = []
    for a, b in zip(old, new[:5] + [summed_last]):
        diff = local_pod_reference(a ** 2, [1, 2, 4]) - local_pod_reference(b ** 2, [1, 2, 4])
        distances.append(diff.norm(dim=1).mean())
    expected = math.sqrt(17) / 6 * (0.01 * sum(distances[:5]) + 0.0005 * distances[5])
    close(loss, expected)
    close(features_distillation(old, old, collapse_channels="local", index_new_class=16,
                                pod_factor=0.01, pod_options=PLOP_POD_OPTIONS), 0.0)


def test_pod_options_per_map_and_carry_over():
    preset = resolve_pod_options(6, "local", 0.01, "pow", [1, 2, 4], True, PLOP_POD_OPTIONS)
    assert [o.factor for o in preset] == [0.01] * 5 + [0.0005]
    assert all(o.collapse == "local" and o.prepro == "pow" and not o.normalize for o in preset)
    assert preset[5].extra_channels == "sum"
    # Without "after", the last map keeps the values "before" set, as in PLOP.
    before_only = {"switch": {"before": {"type": "spatial", "factor": 2.0, "norm": True}}}
    resolved = resolve_pod_options(3, "local", 0.5, "pow", [1, 2], True, before_only)
    assert [(o.collapse, o.factor, o.normalize) for o in resolved] == [("spatial", 2.0, True)] * 3
    # An "after" sub-dict resets "norm" and applies its own scales to the last map only.
    both = {"switch": {"before": {"norm": True}, "after": {"spp_scales": [1]}}}
    resolved = resolve_pod_options(2, "local", 0.5, "pow", [1, 2], True, both)
    assert [(o.normalize, o.spp_scales) for o in resolved] == [(True, (1, 2)), (False, (1,))]


def test_pod_adaptive_factor_uses_the_background_share():
    old = torch.zeros(1, 1, 2, 2)
    plain = one_map_pod(old, NEW_2X2, prepro="none")
    adaptive = one_map_pod(old, NEW_2X2, prepro="none", labels=torch.tensor([[[0, 0], [3, 255]]]),
                           pod_options={"switch": {"after": {"use_adaptative_factor": True}}})
    close(adaptive, 0.5 * plain)


def test_pod_deeplab_mask_zeroes_masked_pixels_without_touching_inputs():
    old = torch.ones(1, 1, 2, 2)
    new = NEW_2X2.clone()
    lab = torch.tensor([[[0, 5], [5, 5]]])  # pixel (0, 0) is below index_new_class -> masked
    masked = one_map_pod(old, new, prepro="none", labels=lab, index_new_class=3,
                         pod_deeplab_mask=True, deeplabmask_upscale=False)
    # Masked old [[0, 1], [1, 1]]: row means [0.5, 1], column means [0.5, 1].
    # Masked new [[0, 2], [3, 4]]: row means [1, 3.5], column means [1.5, 3].
    close(masked, 2.0 * math.sqrt(0.5 ** 2 + 2.5 ** 2 + 1.0 ** 2 + 2.0 ** 2))
    assert torch.equal(new, NEW_2X2) and torch.equal(old, torch.ones(1, 1, 2, 2))
    skipped = one_map_pod(old, new, labels=lab, index_new_class=3, pod_deeplab_mask=True,
                          pod_deeplab_mask_factor=0.0)
    assert skipped.item() == 0.0


def test_pod_rejects_unsupported_or_unknown_options():
    old, new = [torch.zeros(1, 1, 2, 2)], [NEW_2X2]
    with pytest.raises(ValueError, match="pod_apply"):
        features_distillation(old, new, pod_apply="backbone")
    with pytest.raises(ValueError, match="interpolate_last"):
        features_distillation(old, new, interpolate_last=True)
    with pytest.raises(ValueError, match="unknown pod_options"):
        features_distillation(old, new, pod_options={"switch": {"after": {"typo": 1}}})
    with pytest.raises(ValueError, match="difference function"):
        features_distillation(old, new, pod_options={"difference_function": "kl"})
    with pytest.raises(ValueError, match="only the last map"):
        features_distillation([torch.zeros(1, 1, 2, 2)] * 2, [torch.zeros(1, 2, 2, 2)] * 2,
                              index_new_class=1)
    with pytest.raises(ValueError, match="index_new_class"):
        features_distillation([torch.zeros(1, 1, 2, 2)], [torch.zeros(1, 2, 2, 2)])


def test_pod_gradient_reaches_only_the_new_maps_and_runs_in_fp32():
    old = [torch.randn(1, 2, 4, 4).bfloat16()]
    new = [torch.randn(1, 3, 4, 4, requires_grad=True)]
    loss = features_distillation(old, [new[0].bfloat16()], collapse_channels="local",
                                 index_new_class=2, pod_factor=1.0, use_pod_schedule=False)
    assert loss.dtype == torch.float32
    loss.backward()
    assert new[0].grad is not None and torch.isfinite(new[0].grad).all()
    assert new[0].grad.abs().sum() > 0
