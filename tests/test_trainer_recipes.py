"""The Trainer's method recipes and one hand-checked training iteration per loss family.

Part 1 (no model): ``build_recipe(opts, step)`` for every ``--method`` preset at steps 0 and 1 --
main criterion, loss terms and weights, pseudo-labelling, classifier init, regularizer -- with the
values of ``argparser.METHOD_PRESETS`` written out, and an explicit option beating its preset.

Part 2 (tiny SegFormer-B0 pair on 64 x 64 images, classes [16, 5] vs [16]): one
``Trainer.train_iteration`` returns loss terms equal to the loss functions called directly on the
same inputs, computed on copies of the two models taken just before the step with the same seed:

    MiB   ce  = mean_pixels UnbiasedCrossEntropy(old_cl=16)(z, y)      kd  = 40 * UnbiasedKD(z, z_old)
    SATS  ce  = mean_pixels CE(z, y_pl)                                kd  = 20 * UnbiasedKD(z, z_old)
          sats = 20 * sats_loss(A_new, A_old, y_pl)                    (y_pl: entropy pseudo-labels)
    PLOP  ce  = mean_pixels f_b * CE(z, y_pl)                          pod = POD(maps_old, maps_new)
    EWC   reg = 100 * sum Omega * (theta - theta_old)^2,  Omega = minmax(F_prev); 0 at step 0
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import argparser
from methods.dkd import AuxiliaryClassifierTerm, DecomposedKD, SigmoidKD
from methods.ilt import FeatureDistillation
from methods.lwf import OutputDistillation
from methods.lwf_mc import IcarlDistillation
from methods.plop import PodDistillation
from methods.sats import AttentionTransfer
from segmentation_module import make_model
from train import Trainer, build_recipe
from utils import loss as L
from utils import pseudo as pseudo_utils
from utils.sats import sats_loss

CPU = torch.device("cpu")
OLD_CLASSES, NEW_CLASSES = 16, 5  # VOC 15-5, step 1
SIZE = 64  # smallest size where every MiT stage attends over more than one key (4)


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def options(*args):
    return argparser.parse_options(["--task", "15-5", "--model", "segformer_b0", "--no_pretrained",
                                    "--crop_size", str(SIZE), *map(str, args)])


# ============================================================================================
# Part 1: recipes
# ============================================================================================
def recipe_summary(recipe):
    return {
        "criterion": recipe.criterion.name,
        "terms": {t.name: t.weight for t in recipe.terms},
        "pseudo": recipe.pseudo,
        "init": recipe.init,
        "regularizer": recipe.regularizer,
    }


def summary(criterion, terms=None, pseudo=None, init=None, regularizer=None):
    return {"criterion": criterion, "terms": terms or {}, "pseudo": pseudo, "init": init,
            "regularizer": regularizer}


# (step 0, step 1) for each preset, written out from METHOD_PRESETS.
EXPECTED_RECIPES = {
    "FT": (summary("ce"), summary("ce")),
    "LWF": (summary("ce"), summary("ce", {"kd": 100.0})),
    "LWF-MC": (summary("bce"), summary("bce", {"icarl": 10.0})),
    "ILT": (summary("ce"), summary("ce", {"kd": 10.0, "de": 10.0})),
    "EWC": (summary("ce", regularizer="ewc"), summary("ce", regularizer="ewc")),
    "RW": (summary("ce", regularizer="rw"), summary("ce", regularizer="rw")),
    "PI": (summary("ce", regularizer="pi"), summary("ce", regularizer="pi")),
    "MiB": (summary("ce"), summary("unce", {"kd": 40.0}, init="balanced")),
    "PLOP": (summary("ce"), summary("ce", {"pod": 1.0}, pseudo="entropy", init="balanced")),
    # SSUL's targets move the labels to its unknown-channel space at every step, step 0 included
    "SSUL": (summary("ssul", pseudo="ssul"), summary("ssul", pseudo="ssul", init="unknown")),
    "SATS": (summary("ce"),
             summary("ce", {"kd": 20.0, "sats": 20.0}, pseudo="entropy", init="balanced")),
}
EXPECTED_RECIPES["DKD"] = (summary("mbce_ac"),
                           summary("mbce", {"dkd_kd": 5.0, "dkd_pos": 5.0, "dkd_neg": 5.0, "dkd_ac": 1.0}, init="aux"))
EXPECTED_RECIPES["DKD-M"] = EXPECTED_RECIPES["DKD"]
EXPECTED_RECIPES["SATS-M"] = EXPECTED_RECIPES["SATS"]
EXPECTED_RECIPES["SSUL-M"] = EXPECTED_RECIPES["SSUL"]

TERM_CLASSES = {"kd": OutputDistillation, "de": FeatureDistillation, "icarl": IcarlDistillation,
                "pod": PodDistillation, "sats": AttentionTransfer, "dkd_kd": SigmoidKD, "dkd_pos": DecomposedKD,
                "dkd_neg": DecomposedKD, "dkd_ac": AuxiliaryClassifierTerm}
TERM_INPUTS = {"kd": set(), "de": {"body"}, "icarl": set(),
               "pod": {"attentions", "sem_logits_small"}, "sats": {"attn_maps"}, "dkd_kd": set(),
               "dkd_pos": {"evidence_pos"}, "dkd_neg": {"evidence_neg"}, "dkd_ac": set()}


def test_every_method_has_an_expected_recipe():
    methods = set(argparser.METHODS) | {f"{m}-M" for m in ("SATS", "SSUL")}
    assert methods <= set(EXPECTED_RECIPES)


@pytest.mark.parametrize("method", sorted(EXPECTED_RECIPES))
@pytest.mark.parametrize("step", [0, 1])
def test_preset_recipe(method, step):
    recipe = build_recipe(options("--method", method), step)
    assert recipe_summary(recipe) == EXPECTED_RECIPES[method][step]


@pytest.mark.parametrize("method", sorted(EXPECTED_RECIPES))
def test_recipe_terms_use_their_functions_and_inputs(method):
    recipe = build_recipe(options("--method", method), 1)
    for term in recipe.terms:
        assert type(term) is TERM_CLASSES[term.name]
        assert set(term.new_wants) == set(term.old_wants) == TERM_INPUTS[term.name]
    # the old model runs only where a term or the pseudo-labels read it
    assert recipe.needs_old_model == (method not in ("FT", "EWC", "RW", "PI"))
    assert not build_recipe(options("--method", method), 0).needs_old_model


def test_one_old_softmax_serves_pseudo_labels_and_the_kd_teacher():
    shares = {m: build_recipe(options("--method", m), 1).share_old_softmax for m in EXPECTED_RECIPES}
    # PLOP/SATS pseudo-labels, or a KD term at alpha 1 (the teacher is then softmax(z_old))
    assert shares["SATS"] and shares["PLOP"] and shares["MiB"] and shares["LWF"]
    assert not shares["FT"] and not shares["LWF-MC"] and not shares["SSUL"]
    assert not build_recipe(options("--method", "MiB", "--alpha", "0.5"), 1).share_old_softmax


@pytest.mark.parametrize("method, values", [
    ("LWF", {"unkd": False, "alpha": 1.0}),
    ("ILT", {"unkd": False}),
    ("MiB", {"unkd": True, "unce": True}),
    ("SATS", {"unkd": True, "unce": False, "classif_adaptive_factor": False,
              "distill_object": "sats-selfattn", "threshold": 0.001}),
    ("PLOP", {"classif_adaptive_factor": True, "pod": "local", "pod_factor": 0.01,
              "pod_logits": True, "threshold": 0.001,
              "pod_options": {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005,
                                                   "type": "local"}}}}),
    ("LWF-MC", {"icarl": True, "icarl_disjoint": False}),
    ("EWC", {"reg_importance": 100.0}),
    ("RW", {"reg_importance": 100.0}),
    ("PI", {"reg_importance": 100.0}),
    ("SSUL", {"ssul": True, "unknown": True, "freeze": True, "bn_freeze": True,
              "ssul_pseudo_threshold": 0.7}),
    ("SATS-M", {"mem_size": 100}),
    ("SSUL-M", {"mem_size": 100}),
])
def test_options_the_recipe_terms_read(method, values):
    opts = options("--method", method)
    assert {k: getattr(opts, k) for k in values} == values


@pytest.mark.parametrize("args, step1", [
    (("--method", "MiB", "--loss_kd", "10"), summary("unce", {"kd": 10.0}, init="balanced")),
    (("--method", "SATS", "--distill_weight_args", "5"),
     summary("ce", {"kd": 20.0, "sats": 5.0}, pseudo="entropy", init="balanced")),
    (("--method", "ILT", "--loss_de", "0"), summary("ce", {"kd": 10.0})),
    (("--method", "PLOP", "--no_init_balanced", "--pseudo", "median"),
     summary("ce", {"pod": 1.0}, pseudo="median")),
    (("--method", "LWF-MC", "--icarl_importance", "2", "--icarl_disjoint"), summary("icarl_disjoint")),
    (("--method", "MiB", "--no_unce"), summary("ce", {"kd": 40.0}, init="balanced")),
])
def test_an_explicit_option_beats_the_preset(args, step1):
    opts = options(*args)
    assert recipe_summary(build_recipe(opts, 1)) == step1
    assert opts.preset_overrides  # the run logs every override


def test_explicit_regularizer_weight_and_adaptive_factor_beat_the_preset():
    opts = options("--method", "EWC", "--reg_importance", "500")
    assert opts.reg_importance == 500 and build_recipe(opts, 1).regularizer == "ewc"
    assert options("--method", "PLOP", "--no_classif_adaptive_factor").classif_adaptive_factor is False
    assert options("--method", "MiB", "--no_unkd").unkd is False


# ============================================================================================
# Part 2: one training iteration checked against direct loss calls
# ============================================================================================
def model_pair(opts, perturb=0.05):
    """(new, old) as run.py builds them at step 1: the new model holds the old weights except its
    new classifier; the body is then nudged so that old and new features differ (otherwise the
    feature terms are exactly 0 at the first iteration)."""
    torch.manual_seed(0)
    old = make_model(opts, [OLD_CLASSES])
    new = make_model(opts, [OLD_CLASSES, NEW_CLASSES])
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("cls.1.") for k in missing)
    old.eval()
    for p in old.parameters():
        p.requires_grad_(False)
    recipe = build_recipe(opts, 1)
    if recipe.init == "balanced":
        new.init_new_classifier()
    with torch.no_grad():
        for p in new.body.parameters():
            p.add_(perturb * torch.randn_like(p))
    return new.train(), old


def step1_batch():
    """Two 64 x 64 images; labels as the step-1 training set gives them: background (old classes
    are masked to 0), new classes and a strip of ignored pixels."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE, generator=g)
    labels = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    labels[0, 8:28, 12:40] = 17
    labels[1, 20:56, 4:24] = 20
    labels[1, 40:60, 32:60] = 16
    labels[:, :, -4:] = 255
    return images, labels


def run_iteration(trainer, images, labels, wants):
    """Reference outputs on copies of both models, then the trainer's step, from one seed."""
    ref_new, ref_old = copy.deepcopy(trainer.model), copy.deepcopy(trainer.model_old)
    torch.manual_seed(123)  # MiT's drop path draws random numbers in training mode
    with torch.no_grad():
        old_logits, old_extras = ref_old(images, wants=wants)
    logits, extras = ref_new(images, wants=wants)
    optim = torch.optim.SGD([p for p in trainer.model.parameters() if p.requires_grad], lr=0.01)
    torch.manual_seed(123)
    values = trainer.train_iteration((images, labels), optim)
    changed = any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), ref_new.parameters()))
    assert changed, "the optimiser step did not move the model"
    return values, (logits, extras), (old_logits, old_extras)


def assert_term(value, expected):
    assert value == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)


def test_mib_iteration_matches_unbiased_ce_and_unbiased_kd():
    opts = options("--method", "MiB")
    new, old = model_pair(opts)
    trainer = Trainer(new, old, CPU, opts, classes=[OLD_CLASSES, NEW_CLASSES], step=1)
    images, labels = step1_batch()
    values, (z, _), (z_old, _) = run_iteration(trainer, images, labels, wants=())

    assert set(values) == {"unce", "kd"}  # the main criterion is logged under its own name
    ce = L.UnbiasedCrossEntropy(old_cl=OLD_CLASSES, reduction="none")(z, labels).mean()
    kd = 40 * L.UnbiasedKnowledgeDistillationLoss()(z, z_old)
    assert_term(values["unce"], ce)
    assert_term(values["kd"], kd)
    # the unbiased CE differs from the plain one on background pixels: the check has teeth
    plain = F.cross_entropy(z, labels, ignore_index=255, reduction="none").mean()
    assert abs(float(ce.detach()) - float(plain.detach())) > 1e-3


def entropy_trainer(opts, new, old, images, labels):
    """Trainer whose per-class entropy thresholds are the exact medians on this batch.

    ``before()`` computes them from 100-bin histograms; this random old model's normalised
    entropies all fall in one bin, where the interpolated median accepts every pixel. The exact
    medians drop about half of each class's background pixels, so the pseudo-labels have both
    outcomes (``find_thresholds`` itself is tested in test_pseudo.py).
    """
    trainer = Trainer(new, old, CPU, opts, classes=[OLD_CLASSES, NEW_CLASSES], step=1)
    trainer.before([(images, labels)])
    pseudo = trainer.recipe.targets
    assert pseudo.thresholds.shape == (OLD_CLASSES + NEW_CLASSES,)  # histogram rows: all classes
    with torch.no_grad():
        probs = torch.softmax(old(images)[0], dim=1)
    u = pseudo_utils.plop_entropy(probs) / pseudo.max_entropy
    predicted, background = probs.argmax(dim=1), labels == 0
    medians = torch.ones(OLD_CLASSES + NEW_CLASSES)
    for c in predicted[background].unique():
        medians[c] = u[background & (predicted == c)].median()
    pseudo.thresholds = medians
    return trainer


def pseudo_labels(trainer, labels, z_old, adaptive):
    out = pseudo_utils.pseudo_label(labels, z_old, "entropy", nb_old_classes=OLD_CLASSES,
                                    nb_current_classes=OLD_CLASSES + NEW_CLASSES,
                                    thresholds=trainer.recipe.targets.thresholds,
                                    max_entropy=trainer.recipe.targets.max_entropy,
                                    adaptive_factor=adaptive)
    relabelled = out.labels[labels == 0]
    # some background pixels get an old class, others are dropped (255): a real pseudo-labelling
    assert bool((relabelled == 255).any()) and bool(((relabelled > 0) & (relabelled < 255)).any())
    return out


def test_sats_iteration_matches_ce_unbiased_kd_and_sats_loss_on_pseudo_labels():
    opts = options("--method", "SATS")
    new, old = model_pair(opts)
    images, labels = step1_batch()
    trainer = entropy_trainer(opts, new, old, images, labels)
    values, (z, extras), (z_old, old_extras) = run_iteration(trainer, images, labels, wants={"attn_maps"})

    assert set(values) == {"ce", "kd", "sats"}
    targets = pseudo_labels(trainer, labels, z_old, adaptive=False).labels
    ce = F.cross_entropy(z, targets, ignore_index=255, reduction="none").mean()
    kd = 20 * L.UnbiasedKnowledgeDistillationLoss()(z, z_old)
    sats = 20 * sats_loss(extras["attn_maps"], old_extras["attn_maps"], targets)
    assert len(extras["attn_maps"]) == 4 and float(sats.detach()) > 0
    assert_term(values["ce"], ce)
    assert_term(values["kd"], kd)
    assert_term(values["sats"], sats)


def test_plop_iteration_matches_adaptive_ce_and_pod():
    opts = options("--method", "PLOP")
    new, old = model_pair(opts)
    images, labels = step1_batch()
    trainer = entropy_trainer(opts, new, old, images, labels)
    wants = {"attentions", "sem_logits_small"}
    values, (z, extras), (z_old, old_extras) = run_iteration(trainer, images, labels, wants=wants)

    assert set(values) == {"ce", "pod"}
    pl = pseudo_labels(trainer, labels, z_old, adaptive=True)
    assert pl.adaptive_factor.shape == (2, 1, 1) and float(pl.adaptive_factor.max()) < 1
    ce = (F.cross_entropy(z, pl.labels, ignore_index=255, reduction="none") * pl.adaptive_factor).mean()
    pod = L.features_distillation(
        old_extras["attentions"] + [old_extras["sem_logits_small"]],
        extras["attentions"] + [extras["sem_logits_small"]],
        collapse_channels="local", labels=pl.labels, index_new_class=OLD_CLASSES, pod_factor=0.01,
        prepro="pow", spp_scales=[1, 2, 4],
        pod_options={"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}},
        outputs_old=z_old, use_pod_schedule=True, nb_current_classes=OLD_CLASSES + NEW_CLASSES,
        nb_new_classes=NEW_CLASSES)
    assert len(extras["attentions"]) == 5 and float(pod.detach()) > 0  # 4 MiT stages + head output
    assert_term(values["ce"], ce)
    assert_term(values["pod"], pod)


def test_ewc_penalty_is_zero_at_step_0_and_the_fisher_follows_the_gradients():
    opts = options("--method", "EWC")
    torch.manual_seed(0)
    model = make_model(opts, [OLD_CLASSES]).train()
    trainer = Trainer(model, None, CPU, opts, classes=[OLD_CLASSES], step=0)
    images, labels = step1_batch()
    labels = labels.masked_fill(labels > 15, 3)  # a step-0 label space

    ref = copy.deepcopy(model)
    torch.manual_seed(123)
    F.cross_entropy(ref(images)[0], labels, ignore_index=255, reduction="none").mean().backward()
    torch.manual_seed(123)
    values = trainer.train_iteration((images, labels), torch.optim.SGD(model.parameters(), lr=0.01))

    assert set(values) == {"ce", "reg"} and values["reg"] == 0.0
    fisher = trainer.regularizer.fisher
    for name, p in ref.named_parameters():  # F <- 0.9 g^2 + 0.1 F, F starting at 1
        torch.testing.assert_close(fisher[name], 0.9 * p.grad.pow(2) + 0.1, rtol=1e-5, atol=1e-8)


def test_ewc_penalty_at_step_1_weights_the_drift_by_the_normalised_previous_fisher():
    opts = options("--method", "EWC")
    new, old = model_pair(opts)
    g = torch.Generator().manual_seed(2)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in old.named_parameters()}
    state = {"regularizer": {"name": "ewc", "fisher": fisher, "alpha": 0.9}}
    trainer = Trainer(new, old, CPU, opts, trainer_state=state, classes=[OLD_CLASSES, NEW_CLASSES], step=1)

    old_params = dict(old.named_parameters())
    expected = torch.zeros(())
    for name, p in new.named_parameters():
        if name in fisher:  # the new classifier has no old value and is not penalised
            omega = (fisher[name] - fisher[name].min()) / (fisher[name].max() - fisher[name].min() + 1e-8)
            expected = expected + (omega * (p.detach() - old_params[name]).pow(2)).sum()
    images, labels = step1_batch()
    values, _, _ = run_iteration(trainer, images, labels, wants=())

    assert set(values) == {"ce", "reg"}
    assert float(expected) > 0
    assert_term(values["reg"], 100 * expected)


def test_old_model_side_thread_gives_the_sequential_updates():
    """The old model's forward on a side thread (default) and in the training thread
    (``--sequential_old_model``) give the same losses and the same weights, bit for bit."""
    import threading

    images, labels = step1_batch()
    results = []
    for extra in ([], ["--sequential_old_model"]):
        opts = options("--method", "SATS", *extra)
        new, old = model_pair(opts)
        trainer = Trainer(new, old, CPU, opts, classes=[OLD_CLASSES, NEW_CLASSES], step=1)
        trainer.before([(images, labels)])
        optim = torch.optim.SGD(new.parameters(), lr=0.01, momentum=0.9)
        torch.manual_seed(5)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([images, images.flip(-1)]),
                                                                            torch.cat([labels, labels.flip(-1)])),
                                             batch_size=2)
        losses = trainer.train(0, optim, loader)
        assert not any(t.name.startswith("old-model") for t in threading.enumerate())  # closed
        results.append((losses, [p.detach().clone() for p in new.parameters()]))
    (threaded, w_threaded), (sequential, w_sequential) = results
    assert threaded == sequential and set(threaded) == {"ce", "kd", "sats"}
    assert all(torch.equal(a, b) for a, b in zip(w_threaded, w_sequential))


def test_ssul_targets_apply_at_step_0_too():
    """SSUL's label space (unknown channel 0, background 1, class k on k + 1) is used from step 0:
    a recipe that skipped its target builder at step 0 trained SSUL's step 0 on unshifted labels."""
    from utils.ssul import ssul_targets

    opts = options("--method", "SSUL")
    model = make_model(opts, [OLD_CLASSES])
    trainer = Trainer(model, None, CPU, opts, classes=[OLD_CLASSES], step=0)
    _, labels = step1_batch()
    labels = labels.masked_fill((labels > 15) & (labels < 255), 3)
    saliency = (torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) > 0.5).long()
    targets = trainer.make_targets(labels, None, saliency).labels
    assert torch.equal(targets, ssul_targets(labels, saliency, "voc"))
    assert not torch.equal(targets, labels) and not trainer.recipe.needs_old_model
