"""NeST pre-tuning (utils/nest.py): hand-computed selection statistics, generator, gradients,
schedule and installation on a 2-channel toy model; the memory-light selection against the
per-pixel definition; the pre-tuning loop on a small SegFormer; two gloo ranks."""
import math
import torch.multiprocessing as mp
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segmentation_module import IncrementalSegmentationModule, make_model
from utils import nest
from utils.nest import (GeneratedClassifier, NestSettings, NestTransform, SelectionAccumulator, install,
                        is_done, pretune_classifier, pretune_logits, rescaled_bias, run_nest,
                        selection_statistics, should_pretune)

W = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
B = torch.tensor([0.5, -0.3])
T1_F = torch.tensor([[0.5, 0.5], [-1.0, 2.0]])
T1_P = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
T1_M0 = torch.tensor([[[0.125, 0.0], [0.375, 0.625]]])
T1_P0 = torch.tensor([[0.294215, 0.705785]])
T4_W = torch.tensor([[0.566116, 0.220558]])


class PixelBody(nn.Module):
    """The input 'image' is the head output itself: pixel n's channels are f_n."""

    def forward(self, x):
        return x, [x]


def toy_model(classes=(2, 1), weight=W, bias=B):
    model = IncrementalSegmentationModule(PixelBody(), nn.Identity(), weight.shape[1], list(classes))
    with torch.no_grad():  # the classifiers the given rows cover (the old ones)
        rows = 0
        for conv in model.cls:
            n = conv.weight.shape[0]
            if rows + n > weight.shape[0]:
                break
            conv.weight.copy_(weight[rows:rows + n, :, None, None])
            conv.bias.copy_(bias[rows:rows + n])
            rows += n
    return model


def t1_statistics():
    acc = SelectionAccumulator(W, 1)
    acc.add(T1_P, T1_F, torch.tensor([2, 2]))
    return acc.statistics()


def pixels(f):
    """(P, D) pixel features → a (1, D, 1, P) image."""
    return f.t()[None, :, None, :].contiguous()


def naive_bucket(probs, feats, labels, weight, n_old, n_new):
    """Σ_n p_n[j] 1[f_n[d] W[j,d] > 0] pixel by pixel, and the pixel counts."""
    bucket = torch.zeros(n_new, *weight.shape, dtype=torch.float64)
    counts = torch.zeros(n_new, dtype=torch.long)
    for p, f, y in zip(probs.double(), feats.double(), labels.tolist()):
        k = y - n_old
        if 0 <= k < n_new:
            bucket[k] += p[:, None] * (f[None, :] * weight.double() > 0).double()
            counts[k] += 1
    return bucket, counts


# --- Stage A: selection ---------------------------------------------------------------------
def test_t1_selection_by_hand():
    stats = t1_statistics()
    assert torch.allclose(stats.mask, T1_M0, atol=1e-7)
    assert torch.allclose(stats.mask.sum(dim=2), torch.tensor([[0.125, 1.0]]))
    assert torch.allclose(stats.mix, T1_P0, atol=1e-6)
    assert stats.counts.tolist() == [2] and stats.empty == []


def test_t2_matmul_form_equals_per_pixel_definition():
    gen = torch.Generator().manual_seed(3)
    n_old, n_new, channels, n_pix = 5, 3, 7, 400
    weight = torch.randn(n_old, channels, generator=gen)
    weight[weight.abs() < 0.3] = 0.0  # planted exact zeros: the indicator is strict
    feats = torch.randn(n_pix, channels, generator=gen)
    feats[feats.abs() < 0.3] = 0.0
    probs = torch.softmax(torch.randn(n_pix, n_old, generator=gen), dim=1)
    labels = torch.randint(0, n_old + n_new, (n_pix,), generator=gen)
    labels[::17] = 255
    assert (weight == 0).any() and (feats == 0).any()
    acc = SelectionAccumulator(weight, n_new)
    for chunk in range(0, n_pix, 150):  # several batches
        acc.add(probs[chunk:chunk + 150], feats[chunk:chunk + 150], labels[chunk:chunk + 150])
    stats = acc.statistics()
    bucket, counts = naive_bucket(probs, feats, labels, weight, n_old, n_new)
    assert stats.counts.tolist() == counts.tolist()
    expected = bucket / counts[:, None, None]
    assert torch.allclose(stats.mask.double(), expected, atol=1e-6)
    assert torch.allclose(stats.mix.double(), torch.softmax(expected.sum(dim=2), dim=1), atol=1e-6)


def test_t3_shards_sum_to_the_whole_and_empty_class_rules():
    first, second = SelectionAccumulator(W, 1), SelectionAccumulator(W, 1)
    first.add(T1_P[:1], T1_F[:1], torch.tensor([2]))
    second.add(T1_P[1:], T1_F[1:], torch.tensor([2]))
    first.positive += second.positive  # what reduce_across_ranks sums
    first.negative += second.negative
    first.counts += second.counts
    assert torch.allclose(first.statistics().mask, T1_M0, atol=1e-7)

    empty = SelectionAccumulator(W, 2)
    empty.add(T1_P, T1_F, torch.tensor([2, 2]))  # class id 3 never seen
    with pytest.raises(ValueError, match=r"class id\(s\) 3 .*--nest_empty_class uniform"):
        empty.statistics()
    stats = empty.statistics("uniform")
    assert stats.empty == [1] and torch.equal(stats.mask[1], torch.ones(2, 2))
    assert torch.equal(stats.mix[1], torch.full((2,), 0.5))
    assert torch.allclose(stats.mask[0], T1_M0[0], atol=1e-7)
    assert not torch.isnan(stats.mask).any()


def test_selection_over_a_loader_matches_the_definition():
    """The whole Stage A on a small SegFormer: grid resizing, softmax, reshapes."""
    torch.manual_seed(1)
    opts = SimpleNamespace(model="segformer_b0", no_pretrained=True)
    old = make_model(opts, [3]).eval()
    batches = []
    for _ in range(2):
        images = torch.randn(2, 3, 64, 64)
        labels = torch.randint(0, 5, (2, 64, 64))
        labels[:, :8] = 255
        batches.append((images, labels))
    stats = selection_statistics(old, batches, torch.device("cpu"), [3, 2])
    probs, feats, labels = [], [], []
    with torch.no_grad():
        for images, label in batches:
            logits, extras = old(images, wants=["pre_logits"])
            probs.append(F.interpolate(logits, size=(16, 16), mode="bilinear").softmax(1).permute(0, 2, 3, 1).reshape(-1, 3))
            feats.append(F.interpolate(extras["pre_logits"], size=(16, 16), mode="bilinear")
                         .permute(0, 2, 3, 1).reshape(-1, 256))
            labels.append(label[:, ::4, ::4].reshape(-1))  # nearest at 64 -> 16: every 4th pixel, offset 0
    weight = old.cls[0].weight.flatten(1)
    bucket, counts = naive_bucket(torch.cat(probs), torch.cat(feats), torch.cat(labels), weight, 3, 2)
    assert stats.counts.tolist() == counts.tolist() and min(counts.tolist()) > 0
    assert torch.allclose(stats.mask.double(), bucket / counts[:, None, None], atol=1e-5)
    assert stats.mask.shape == (2, 3, 256) and stats.mix.shape == (2, 3)


# --- Stage B: transformation ------------------------------------------------------------------
def test_t4_generator_and_t9_bias_start():
    transform = NestTransform.initial(t1_statistics(), B)
    assert torch.allclose(transform.new_weight(W), T4_W, atol=1e-6)
    assert abs(float(transform.new_weight(W).detach().norm()) - 0.607563) < 1e-6
    assert transform.new_bias.tolist() == [0.5]  # the loaded background bias
    assert torch.equal(transform.bg_mask.detach(), torch.ones(2)) and float(transform.bg_scale.detach()) == 1.0

    stats = SelectionAccumulator(W, 3)
    stats.add(T1_P.repeat(3, 1), T1_F.repeat(3, 1), torch.tensor([2, 2, 3, 3, 4, 4]))
    three = stats.statistics()
    assert NestTransform.initial(three, B).new_bias.tolist() == [0.5, 0.5, 0.5]
    legacy = NestTransform.initial(three, B, legacy_bias_init=True).new_bias.detach()
    assert bool((legacy == legacy[0]).all()) and abs(float(legacy[0])) <= 1 / math.sqrt(2)


def test_t5_old_logits_unchanged_at_the_start():
    model = toy_model().eval()
    x = torch.randn(2, 2, 3, 5)
    transform = NestTransform.initial(t1_statistics(), B)
    weight, bias = transform.classifier(W, B)
    ours = pretune_logits(model, x, weight, bias)
    reference = model(x)[0]
    assert torch.allclose(ours[:, :2], reference[:, :2], atol=1e-6)
    expected_new = torch.einsum("d,bdhw->bhw", T4_W[0], x) + 0.5
    assert torch.allclose(ours[:, 2], expected_new, atol=1e-5)


def test_t6_one_pretuning_gradient():
    model = toy_model(bias=torch.zeros(2)).train()
    transform = NestTransform.initial(t1_statistics(), torch.zeros(2))
    assert transform.new_bias.tolist() == [0.0]
    x = pixels(torch.tensor([[1.0, 0.0]]))
    weight, bias = transform.classifier(W, torch.zeros(2))
    logits = pretune_logits(model, x, weight, bias)
    assert torch.allclose(logits.flatten(), torch.tensor([1.0, 2.0, 0.566116]), atol=1e-6)
    assert torch.allclose(logits.softmax(1).flatten(), torch.tensor([0.229028, 0.622564, 0.148408]), atol=1e-6)
    loss = nest._PretuneLoss(NestSettings(), n_old=2)(logits, torch.tensor([[[2]]]))
    assert abs(float(loss.detach()) - 1.907793) < 1e-6
    loss.backward()
    assert abs(float(transform.new_bias.grad) - (-0.851592)) < 1e-6
    assert abs(float(transform.bg_scale.grad) - 0.229028) < 1e-6
    assert torch.allclose(transform.mix.grad, torch.tensor([[-0.106449, -0.638694]]), atol=1e-6)
    assert torch.allclose(transform.bg_mask.grad, torch.tensor([0.229028, 0.0]), atol=1e-6)
    # with the old biases [0.5, -0.3] and b_new = 0
    with torch.no_grad():
        weight, bias = transform.classifier(W, B)
        biased = pretune_logits(model, x, weight, bias)
    assert torch.allclose(biased.flatten(), torch.tensor([1.5, 1.7, 0.566116]), atol=1e-6)


def test_t6_one_sgd_step_touches_only_the_transformation():
    model = toy_model(bias=torch.zeros(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    batch = (pixels(torch.tensor([[1.0, 0.0]])), torch.tensor([[[2]]]))
    settings = NestSettings(epochs=1, lr=0.1, weight_decay=0.0)
    generated = pretune_classifier(settings, model, None, [batch], torch.device("cpu"), t1_statistics())
    # Nesterov SGD's first step moves by lr * (1 + momentum) * grad
    assert abs(float(generated.new_bias[0]) - 0.1 * 1.9 * 0.851592) < 1e-6
    assert generated.lrs == [0.1]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training  # mode restored


def test_t7_unbiased_ce_in_pretuning():
    loss = nest._PretuneLoss(NestSettings(loss="unce"), n_old=2)
    logits = torch.tensor([1.0, 0.0, 2.0]).view(1, 3, 1, 1)
    assert abs(float(loss(logits, torch.tensor([[[0]]]))) - 1.094344) < 1e-6
    assert abs(float(loss(logits, torch.tensor([[[2]]]))) - 0.407606) < 1e-6
    two = torch.tensor([1.0, 0.0, 2.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2)
    assert abs(float(loss(two, torch.tensor([[[0, 255]]]))) - 1.094344 / 2) < 1e-6
    ce = nest._PretuneLoss(NestSettings(loss="ce"), n_old=2)
    assert abs(float(ce(logits, torch.tensor([[[0]]]))) - float(-torch.log_softmax(logits, 1)[0, 0])) < 1e-6


# --- Stage C: schedule, loop ----------------------------------------------------------------
@pytest.mark.parametrize("legacy, expected", [(False, [1.0, 0.771890, 0.535887, 0.287175]),
                                              (True, [0.771890, 0.535887, 0.287175, 0.0])])
def test_t10_schedule(legacy, expected):
    model = toy_model(bias=torch.zeros(2))
    gen = torch.Generator().manual_seed(0)
    batches = [(0.1 * torch.randn(1, 2, 2, 2, generator=gen), torch.tensor([[[0, 2], [2, 255]]])) for _ in range(4)]
    settings = NestSettings(epochs=1, lr=1.0, legacy_schedule=legacy)
    generated = pretune_classifier(settings, model, None, batches, torch.device("cpu"), t1_statistics())
    assert generated.lrs == pytest.approx(expected, abs=1e-6)
    assert len(generated.history) == 1 and math.isfinite(generated.history[0]["loss"])


def small_segformer_step(seed=0):
    torch.manual_seed(seed)
    opts = SimpleNamespace(model="segformer_b0", no_pretrained=True)
    old = make_model(opts, [3]).eval()
    model = make_model(opts, [3, 2])
    model.load_state_dict(old.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(3):
        labels = torch.randint(0, 5, (2, 32, 32), generator=gen)
        labels[labels < 3] = 0  # old classes appear as background, as in the step's labels
        batches.append((torch.randn(2, 3, 32, 32, generator=gen), labels))
    return model, old, batches


def test_pretuning_loop_changes_the_transformation_and_is_deterministic():
    cpu = torch.device("cpu")
    settings = NestSettings(epochs=2, lr=0.01, lr_scale=500)
    results = []
    for _ in range(2):
        model, old, batches = small_segformer_step()
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        stats = selection_statistics(old, batches, cpu, model.classes)
        start = NestTransform.initial(stats, _old_bias(model))
        torch.manual_seed(7)
        generated = pretune_classifier(settings, model, old, batches, cpu, stats)
        results.append((generated, start, _old_weight(model)))
        for key, value in model.state_dict().items():
            assert torch.equal(value, reference[key]), key
    (first, start, weight), (second, _, _) = results
    assert len(first.lrs) == 6 and first.lrs[0] == pytest.approx(5.0)
    with torch.no_grad():
        for tuned, initial in [(first.new_weight, start.new_weight(weight)), (first.new_bias, start.new_bias),
                               (first.background_weight, start.background_weight(weight))]:
            assert float((tuned - initial).norm() / initial.norm()) > 0.01
    assert torch.equal(first.new_weight, second.new_weight)
    assert torch.equal(first.new_bias, second.new_bias)
    assert torch.equal(first.background_weight, second.background_weight)
    assert first.history[-1]["loss"] < first.history[0]["loss"] + 1e-3


def _old_weight(model):
    return torch.cat([c.weight.detach().flatten(1) for c in model.cls[:-1]])


def _old_bias(model):
    return torch.cat([c.bias.detach() for c in model.cls[:-1]])


def test_folded_head_path_equals_the_unfolded_one():
    model, old, batches = small_segformer_step()
    stats = selection_statistics(old, batches, torch.device("cpu"), model.classes)
    transform = NestTransform.initial(stats, _old_bias(model))
    weight, bias = transform.classifier(_old_weight(model), _old_bias(model))
    images = batches[0][0]
    model.eval()
    folded = pretune_logits(model, images, weight, bias, fold=True)
    unfolded = pretune_logits(model, images, weight, bias, fold=False)
    assert torch.allclose(folded, unfolded, atol=1e-4)
    assert torch.allclose(folded[:, :3], model(images)[0][:, :3], atol=1e-4)
    folded.sum().backward()  # the folded path reaches the transformation
    assert transform.mix.grad is not None and transform.mix.grad.abs().sum() > 0


# --- Stage D: installation -----------------------------------------------------------------
def test_t8_install_by_hand():
    for scale, background in [(0.5, [1.264911, -0.632456]), (-0.5, [-1.264911, 0.632456])]:
        model = toy_model()
        transform = NestTransform.initial(t1_statistics(), B)
        with torch.no_grad():
            transform.bg_mask.copy_(torch.tensor([2.0, 1.0]))
            transform.bg_scale.fill_(scale)
            transform.new_bias.fill_(-0.2)
        generated = GeneratedClassifier.from_transform(transform, W)
        install(model, generated)
        assert torch.allclose(model.cls[0].weight[0].flatten(), torch.tensor(background), atol=1e-6)
        assert torch.allclose(model.cls[0].weight[1].flatten(), W[1])
        assert torch.allclose(model.cls[1].weight.flatten(), torch.tensor([1.619327, 0.630887]), atol=1e-5)
        assert abs(float(model.cls[1].bias[0].detach()) - (-0.583095)) < 1e-6
        assert model.cls[0].bias.tolist() == pytest.approx([0.5, -0.3])  # background bias kept (no -log 2)


def test_t8_install_bias_of_two_new_classes():
    assert rescaled_bias(torch.tensor([0.1, -0.2]), B).tolist() == pytest.approx([0.260768, -0.521536], abs=1e-6)
    assert rescaled_bias(torch.tensor([-0.2]), B, "mean_abs").tolist() == pytest.approx([-0.4])
    assert rescaled_bias(torch.zeros(2), B).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="--nest_bias_norm"):
        rescaled_bias(torch.ones(1), B, "l1")


def test_installed_classifier_gives_the_same_logits_folded_and_unfolded():
    cpu = torch.device("cpu")
    model, old, batches = small_segformer_step()
    outcome = run_nest(NestSettings(epochs=1, lr=0.01, lr_scale=10), model, old, batches, cpu)
    images = batches[1][0]
    model.eval()
    with torch.no_grad():
        folded = model(images)[0]  # the SATS head folds the classifiers
        unfolded = model(images, wants=["pre_logits"])[0]
    assert torch.allclose(folded, unfolded, atol=1e-4)
    new_rows = model.cls[1].weight.detach().flatten(1)
    old_rows = _old_weight(model)
    assert float(new_rows.norm(dim=1).mean()) == pytest.approx(float(old_rows.norm(dim=1).mean()), rel=1e-5)
    assert float(model.cls[0].weight[0].detach().norm()) == pytest.approx(float(old.cls[0].weight[0].detach().norm()), rel=1e-5)
    assert torch.equal(model.cls[0].bias, old.cls[0].bias)
    assert float(model.cls[1].bias.detach().norm()) == pytest.approx(float(old.cls[0].bias.detach().norm()), rel=1e-5)
    assert outcome.record["done"] is True and outcome.record["counts"] == outcome.statistics.counts.tolist()


# --- settings, refusals, resume ------------------------------------------------------------
def test_t11_step_zero_and_resume():
    assert not should_pretune(0)
    assert should_pretune(1) and should_pretune(2, {"epoch": 3})
    assert not should_pretune(1, {"nest": {"done": True}})
    assert not should_pretune(1, {"trainer_state": {"nest": {"done": True}}})
    assert not is_done(None) and not is_done({"nest": {"done": False}})
    record = nest.done_record(NestSettings(), t1_statistics())
    assert is_done({"nest": record}) and record["counts"] == [2]
    from utils.checkpoint import to_safe
    assert to_safe(record) == record  # checkpoint-safe as is


def test_settings_from_options_and_errors():
    opts = SimpleNamespace(dataset="ade", lr=0.001, weight_decay=1e-4, opt_level="O1", lr_power=0.9)
    settings = NestSettings.from_options(opts)
    assert (settings.epochs, settings.lr_scale, settings.tune_lr) == (15, 500.0, pytest.approx(0.5))
    voc = NestSettings.from_options(SimpleNamespace(dataset="voc", lr=0.001, nest_epochs=10))
    assert (voc.epochs, voc.lr_scale, voc.loss, voc.bias_norm) == (10, 1.0, "unce", "vector")
    for kwargs, option in [({"epochs": 0}, "--nest_epochs"), ({"lr_scale": 0}, "--nest_lr_scale"),
                           ({"loss": "bce"}, "--nest_loss"), ({"grid": 0}, "--nest_grid"),
                           ({"empty_class": "skip"}, "--nest_empty_class"), ({"unkd": -1}, "--nest_unkd")]:
        with pytest.raises(ValueError, match=option):
            NestSettings(**kwargs)


def test_refused_layouts():
    opts = SimpleNamespace(model="segformer_b0", no_pretrained=True)
    for extra, message in [({"cosine": True}, "--cosine"), ({"method": "SSUL"}, "SSUL")]:
        with pytest.raises(ValueError, match=message):
            nest.check_model(make_model(SimpleNamespace(**vars(opts), **extra), [3, 1]))
    with pytest.raises(ValueError, match="one classifier"):
        nest.check_model(make_model(opts, [3]))


# --- two ranks -----------------------------------------------------------------------------
def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_data():
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(3, 4, generator=gen)
    bias = 0.1 * torch.randn(3, generator=gen)
    images = [torch.randn(1, 4, 3, 3, generator=gen) for _ in range(6)]
    labels = [torch.tensor([[[0, 3, 4], [3, 255, 4], [0, 0, 3]]]) for _ in range(6)]
    return weight, bias, images, labels


SETTINGS = dict(epochs=2, lr=0.05, weight_decay=1e-4)


def _two_rank_worker(rank, port, queue):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "CSS_DIST_TIMEOUT": "60", "CUDA_VISIBLE_DEVICES": ""})
    os.environ.pop("LOCAL_RANK", None)
    from utils import distributed

    try:
        distributed.init_distributed(SimpleNamespace(local_rank=rank))
        weight, bias, images, labels = _rank_data()
        model = toy_model((3, 2), weight, bias)
        old = toy_model((3,), weight, bias).eval()
        # rank r holds images r, r+2, r+4; rank 1 also gets an extra batch it must not run
        shard = [(images[i], labels[i]) for i in range(rank, 4, 2)]
        selection = [(images[i], labels[i]) for i in range(rank, 6, 2)]
        if rank == 1:
            shard.append((images[5], labels[5]))
        cpu = torch.device("cpu")
        stats = selection_statistics(old, selection, cpu, [3, 2], grid=3)
        generated = pretune_classifier(NestSettings(**SETTINGS), model, old, shard, cpu, stats)
        # plain lists: shared-memory tensors cannot be fetched once this process has exited
        queue.put((rank, stats.mask.tolist(), stats.counts.tolist(), generated.new_weight.tolist(),
                   generated.new_bias.tolist(), generated.background_weight.tolist(), len(generated.lrs)))
    finally:
        distributed.cleanup()


def test_two_ranks_sum_statistics_and_average_gradients():
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_two_rank_worker, args=(_free_port(), queue), nprocs=2, start_method="spawn")
    outputs = sorted((queue.get() for _ in range(2)), key=lambda o: o[0])

    weight, bias, images, labels = _rank_data()
    cpu = torch.device("cpu")
    old = toy_model((3,), weight, bias).eval()
    stats = selection_statistics(old, list(zip(images, labels)), cpu, [3, 2], grid=3)
    # one process, batch 2 = the two ranks' images of each iteration
    batches = [(torch.cat([images[i], images[i + 1]]), torch.cat([labels[i], labels[i + 1]])) for i in (0, 2)]
    single = pretune_classifier(NestSettings(**SETTINGS), toy_model((3, 2), weight, bias), old, batches, cpu, stats)
    for _, mask, counts, new_weight, new_bias, background, updates in outputs:
        mask, new_weight, new_bias, background = map(torch.tensor, (mask, new_weight, new_bias, background))
        assert counts == stats.counts.tolist()
        assert torch.allclose(mask, stats.mask, atol=1e-6)
        assert updates == 4  # 2 epochs x 2 iterations on both ranks
        assert torch.allclose(new_weight, single.new_weight, atol=1e-5)
        assert torch.allclose(new_bias, single.new_bias, atol=1e-5)
        assert torch.allclose(background, single.background_weight, atol=1e-5)
    assert outputs[0][3:6] == outputs[1][3:6]  # bit-identical on both ranks
