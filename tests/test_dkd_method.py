"""DKD / DKD-M as a method (methods/dkd.py): options and recipe, one trainer iteration checked term
by term, the frozen BatchNorm of steps > 0, the legacy memory, and run.py end to end.

Part 1 (no model): the recipe of steps 0 and 1, the presets and per-dataset defaults, the refused
combinations, the sweep values, the registry hooks.

Part 2 (tiny models on 64 x 64 images, VOC 15-5 classes [16, 5] vs [16]): ``Trainer.train_iteration``
returns the values of the ``utils/dkd`` functions called on copies of the models taken just before
the step, with the same seed:

    step 1   mbce    = new_class_bce(z, y, first_new=16, p=1)
             dkd_kd  = 5 old_class_kd(z, z_old)          dkd_ac = aux_classifier_loss(z_0)
             dkd_pos = 5 decomposed_kd(pos, pos_old)     dkd_neg = 5 decomposed_kd(neg, neg_old)
    step 0   mbce_ac = new_class_bce(z, y, first_new=1, p=2) + aux_classifier_loss(z_0)

Part 3: DKD trains VOC 15-5 steps 0-1 through run.py on SegFormer-B0 and on DeepLab (ResNet-50),
DKD-M trains step 1 from DKD's step 0 (the sweep scripts share it), and ``--test --ckpt`` on each
step-1 file reproduces the end-of-step scores.
"""
import copy
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import argparser
import methods
from modules.dkd_model import DKDSegmentationModule
from helpers_e2e import base_args, checkpoint_file, log_folder, results_csv, run_cli, tiny_voc  # noqa: F401
from methods import dkd as dkd_method
from segmentation_module import make_model
from train import Trainer, build_recipe
from utils.checkpoint import load_checkpoint
from utils.dkd import (EVIDENCE_NEG, EVIDENCE_POS, aux_classifier_loss, decomposed_kd, dkd_memory_pseudo_labels,
                       dkd_prediction, new_class_bce, old_class_kd)
from utils.results import read_results

CPU = torch.device("cpu")
OLD_CLASSES, NEW_CLASSES = 16, 5  # VOC 15-5, step 1 (class counts include background)
SIZE = 64
EVIDENCE = {EVIDENCE_POS, EVIDENCE_NEG}
DEEPLAB = ["--model", "deeplab", "--backbone", "resnet50", "--norm_act", "std", "--no_pretrained"]
STEP1_TERMS = {"mbce", "dkd_kd", "dkd_pos", "dkd_neg", "dkd_ac"}


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def options(*args, model=("--model", "segformer_b0")):
    """Checked options with ``lr`` one number, as ``run.py`` hands them to a step."""
    opts = argparser.parse_options(["--task", "15-5", *model, "--no_pretrained", "--crop_size", str(SIZE),
                                    "--lr", "0.001", *map(str, args)])
    opts.lr = opts.lr[0]
    return opts


def raw_options(*args):
    """Parsed but not yet checked (``modify_command_options`` raises ValueError)."""
    return argparser.get_argparser().parse_args(["--task", "15-5", "--model", "segformer_b0", *map(str, args)])


# ============================================================================================
# Part 1: options and recipe
# ============================================================================================
def test_recipe_of_steps_0_and_1():
    opts = options("--method", "DKD")
    step0, step1 = build_recipe(opts, 0, [OLD_CLASSES]), build_recipe(opts, 1, [OLD_CLASSES, NEW_CLASSES])
    assert step0.criterion.name == "mbce_ac" and step0.terms == [] and not step0.needs_old_model
    assert step1.criterion.name == "mbce"
    assert {t.name: t.weight for t in step1.terms} == {"dkd_kd": 5.0, "dkd_pos": 5.0, "dkd_neg": 5.0, "dkd_ac": 1.0}
    assert step1.new_wants == step1.old_wants == EVIDENCE
    assert step1.init == "aux" and step1.pseudo is None and step1.regularizer is None
    for recipe in (step0, step1):
        assert recipe.predict is dkd_prediction and recipe.eval_loss is False
        assert not recipe.find_unused_parameters and not recipe.share_old_softmax


def test_presets_and_per_dataset_positive_weights():
    voc = options("--method", "DKD")
    assert (voc.dkd, voc.lr_head, voc.norm_act, voc.mem_size) == (True, 10, "std", 0)
    assert voc.dkd_weights == [1.0, 5.0, 5.0, 5.0, 1.0]
    assert voc.dkd_pos_weight == [2.0, 1.0]
    assert (dkd_method.pos_weight(voc, 0), dkd_method.pos_weight(voc, 3)) == (2.0, 1.0)
    ade = argparser.parse_options(["--dataset", "ade", "--task", "100-50", "--method", "DKD-M"])
    assert ade.dkd_pos_weight == [35.0, 35.0] and ade.mem_size == 300
    assert options("--method", "DKD-M").mem_size == 100
    one = options("--method", "DKD", "--dkd_pos_weight", "3")
    assert (dkd_method.pos_weight(one, 0), dkd_method.pos_weight(one, 1)) == (3.0, 3.0)
    assert build_recipe(one, 1, [OLD_CLASSES, NEW_CLASSES]).criterion.pos_weight == 3.0
    assert not options().dkd and options().norm_act == "iabn_sync"  # nothing leaks without --method DKD


def test_weights_option_drops_zero_terms_and_asks_ddp_for_unused_parameters():
    opts = options("--method", "DKD", "--dkd_weights", "2", "0", "5", "5", "0")
    step1 = build_recipe(opts, 1, [OLD_CLASSES, NEW_CLASSES])
    assert {t.name: t.weight for t in step1.terms} == {"dkd_pos": 5.0, "dkd_neg": 5.0}
    assert step1.init is None  # no trained auxiliary classifier to copy
    assert step1.find_unused_parameters and step1.criterion.weight == 2.0
    assert build_recipe(opts, 0, [OLD_CLASSES]).criterion.name == "mbce"  # no AC at step 0 either


@pytest.mark.parametrize("args, message", [
    (("--method", "DKD", "--cosine"), "--cosine cannot be combined with DKD"),
    (("--method", "DKD", "--nb_background_modes", "2"), "--nb_background_modes cannot be combined with DKD"),
    (("--method", "DKD", "--unknown"), "--unknown cannot be combined with DKD"),
    (("--method", "DKD", "--loss_kd", "10"), "--loss_kd cannot be combined with DKD"),
    (("--method", "DKD", "--pseudo", "entropy"), "--pseudo cannot be combined with DKD"),
    (("--method", "DKD", "--init_balanced"), "--init_balanced cannot be combined with DKD"),
    (("--method", "DKD", "--freeze"), "--freeze cannot be combined with DKD"),
    (("--method", "DKD", "--dkd_pos_weight", "1", "2", "3"), "one or two values > 0"),
    (("--method", "DKD", "--dkd_weights", "1", "-5", "5", "5", "1"), "--dkd_weights must be >= 0"),
    (("--method", "DKD", "--dkd_weights", "0", "5", "5", "5", "0"), "step 0 has nothing to train"),
    (("--method", "DKD", "--dkd_memory_legacy"), "it needs a memory"),
    (("--method", "MiB", "--dkd_ignore_void"), "--dkd_ignore_void needs --dkd"),
])
def test_refused_combinations_name_the_option(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        argparser.modify_command_options(raw_options(*args))


@pytest.mark.parametrize("method", ["DKD", "DKD-M"])
def test_sweep_values(method):
    voc = methods.sweep_settings(method, "voc", "15-5s")
    assert (voc["epochs"], voc["lr0"], voc["lr"], voc["args"], voc["step0_args"]) == (60, 0.001, 0.0001, [], [])
    ade = methods.sweep_settings(method, "ade", "100-10")
    assert (ade["epochs"], ade["lr0"], ade["lr"]) == (100, 0.0025, 0.00025)
    assert ade["args"] == ade["step0_args"] == ["--lr_policy", "warm_poly", "--lr_warmup", "0.2"]
    assert (voc["step0_family"], voc["step0_method"]) == ("dkd", "DKD")  # DKD-M reuses DKD's step 0


def test_network_and_registry_hooks():
    opts = options("--method", "DKD")
    model = make_model(opts, [OLD_CLASSES, NEW_CLASSES])
    assert isinstance(model, DKDSegmentationModule)
    assert [c.out_channels for c in model.cls] == [1, 15, 5]  # auxiliary, step-0 classes, step-1 classes
    assert not isinstance(make_model(options("--method", "MiB"), [OLD_CLASSES]), DKDSegmentationModule)
    assert methods.memory_pseudo_labels(opts) is dkd_memory_pseudo_labels
    groups = methods.param_groups(model, opts, 1)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("backbone", 0.001, 0.0), ("head", 0.01, 0.0), ("old_classifiers", 0.01, 0.0),
        ("new_classifier", 0.01, 1e-4)]
    component = next(c for c in methods.components() if c.name == "dkd")
    assert component.model_tag(opts) == "dkd" and component.model_tag(options()) is None


# ============================================================================================
# Part 2: one training iteration
# ============================================================================================
def step_info(opts, step, classes):
    return methods.step_info(opts, step, classes)


def prepare_step1(opts, perturb=0.05):
    """(new, old) as run.py prepares step 1: the new model holds the old weights but its new
    classifier, the recipe's init and every component's setup_model have run; the new body is then
    nudged so that the distillation terms have something to distil."""
    torch.manual_seed(0)
    old = make_model(opts, [OLD_CLASSES])
    new = make_model(opts, [OLD_CLASSES, NEW_CLASSES])
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("cls.2.") for k in missing)
    old.eval()
    for p in old.parameters():
        p.requires_grad_(False)
    classes = [OLD_CLASSES, NEW_CLASSES]
    recipe = build_recipe(opts, 1, classes)
    recipe.init_classifier(new, None)
    assert torch.equal(new.cls[2].weight, new.cls[0].weight.expand_as(new.cls[2].weight))
    for component in recipe.components:
        component.setup_model(SimpleNamespace(opts=opts), new, step_info(opts, 1, classes))
    with torch.no_grad():
        for p in new.body.parameters():
            p.add_(perturb * torch.randn_like(p))
    return new.train(), old


def batch(step):
    """Two 64 x 64 images: background, classes of the step, a void strip."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE, generator=g)
    labels = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    if step == 1:
        labels[0, 8:28, 12:40] = 17
        labels[1, 20:56, 4:24] = 20
        labels[1, 40:60, 32:60] = 16
    else:
        labels[0, 8:28, 12:40] = 3
        labels[1, 20:56, 4:24] = 15
    labels[:, :, -4:] = 255
    return images, labels


def sgd(model, opts, step, lr=None):
    groups = methods.param_groups(model, opts, step)
    if lr is not None:
        for g in groups:
            g["lr"] = lr
    return torch.optim.SGD(groups, lr=opts.lr, momentum=0.9, nesterov=True, weight_decay=opts.weight_decay)


def assert_term(value, expected):
    assert value == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)


def test_step1_iteration_matches_the_dkd_functions():
    opts = options("--method", "DKD", "--segformer_head", "mlp")
    new, old = prepare_step1(opts)
    trainer = Trainer(new, old, CPU, opts, classes=[OLD_CLASSES, NEW_CLASSES], step=1)
    images, labels = batch(1)
    ref_new, ref_old = copy.deepcopy(new), copy.deepcopy(old)
    torch.manual_seed(123)  # MiT's drop path draws random numbers in training mode
    with torch.no_grad():
        z_old, old_extras = ref_old(images, wants=EVIDENCE)
    z, extras = ref_new(images, wants=EVIDENCE)
    torch.manual_seed(123)
    values = trainer.train_iteration((images, labels), sgd(new, opts, 1))

    assert set(values) == STEP1_TERMS
    assert z.shape[1] == 1 + 15 + 5 and extras[EVIDENCE_POS].shape[1] == 20 and old_extras[EVIDENCE_NEG].shape[1] == 15
    assert_term(values["mbce"], new_class_bce(z, labels, OLD_CLASSES, pos_weight=1.0))
    assert_term(values["dkd_kd"], 5 * old_class_kd(z, z_old))
    assert_term(values["dkd_pos"], 5 * decomposed_kd(extras[EVIDENCE_POS], old_extras[EVIDENCE_POS]))
    assert_term(values["dkd_neg"], 5 * decomposed_kd(extras[EVIDENCE_NEG], old_extras[EVIDENCE_NEG]))
    assert_term(values["dkd_ac"], aux_classifier_loss(z[:, 0]))
    # the terms are distinct quantities: no two coincide, the void pixels count in the mBCE
    assert len({round(v, 4) for v in values.values()}) == 5
    assert abs(values["mbce"] - float(new_class_bce(z, labels, OLD_CLASSES, ignore_void=True).detach())) > 1e-4


def test_step0_iteration_is_mbce_with_step0_positive_weight_plus_ac():
    opts = options("--method", "DKD")
    torch.manual_seed(0)
    model = make_model(opts, [OLD_CLASSES]).train()
    trainer = Trainer(model, None, CPU, opts, classes=[OLD_CLASSES], step=0)
    images, labels = batch(0)
    ref = copy.deepcopy(model)
    torch.manual_seed(123)
    z, _ = ref(images)
    torch.manual_seed(123)
    values = trainer.train_iteration((images, labels), sgd(model, opts, 0))

    assert set(values) == {"mbce_ac"}
    assert_term(values["mbce_ac"], new_class_bce(z, labels, 1, pos_weight=2.0) + aux_classifier_loss(z[:, 0]))
    with_p1 = new_class_bce(z, labels, 1, pos_weight=1.0) + aux_classifier_loss(z[:, 0])
    assert abs(values["mbce_ac"] - float(with_p1.detach())) > 1e-3  # the step-0 weight 2 is the one applied


def test_step1_iteration_leaves_batchnorm_untouched_on_deeplab():
    opts = options("--method", "DKD", model=DEEPLAB)
    new, old = prepare_step1(opts)
    norms = [m for m in new.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    dropouts = [m for m in new.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert len(norms) > 50 and dropouts  # ResNet-50 and the ASPP
    before = copy.deepcopy(new.state_dict())
    trainer = Trainer(new, old, CPU, opts, classes=[OLD_CLASSES, NEW_CLASSES], step=1)
    new.train()  # the trainer's train() call: the freeze must survive it
    values = trainer.train_iteration(batch(1), sgd(new, opts, 1, lr=0.01))

    assert set(values) == STEP1_TERMS and all(math.isfinite(v) for v in values.values())
    assert not any(m.training for m in norms) and not any(m.training for m in dropouts)
    after = new.state_dict()
    bn_names = {f"{name}.{key}" for name, m in new.named_modules() if m in norms
                for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert bn_names <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in bn_names)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert any(k.startswith("body.") for k in changed) and any(k.startswith("head.") for k in changed)
    assert {"cls.0.weight", "cls.1.weight", "cls.2.weight"} <= changed


def test_legacy_memory_is_chosen_with_an_untrained_model(tmp_path, monkeypatch):
    import methods.memory as memory_module
    from dataset.memory import MemoryEntry, load_memory

    opts = options("--method", "DKD-M", "--dkd_memory_legacy", "--mem_size", "2", "--checkpoint", tmp_path,
                   "--name", "legacy", "--segformer_head", "mlp", "--task", "15-5s")
    # 15-5s has single-class steps after step 0: the legacy rule applies from step 2 on
    torch.manual_seed(0)
    trained = make_model(opts, [16, 1]).eval()
    seen = {}

    def fake_choose(o, step, model, device, logger):
        seen.update(step=step, model=model)
        return [MemoryEntry("b.jpg", (3,)), MemoryEntry("a.jpg", (1, 16))]

    monkeypatch.setattr(memory_module, "choose_memory", fake_choose)
    logger = SimpleNamespace(info=lambda message: seen.setdefault("log", message))
    run = SimpleNamespace(opts=opts, model_old=trained, device=CPU, logger=logger, rank=0)
    component = next(c for c in methods.components() if c.name == "dkd")
    new = make_model(opts, [16, 1, 1])
    torch.manual_seed(5)
    component.setup_model(run, new, step_info(opts, 2, [16, 1, 1]))
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))  # the fresh model came from a forked random stream

    labeller = seen["model"]
    assert seen["step"] == 2 and labeller is not trained and not labeller.training
    assert [c.out_channels for c in labeller.cls] == [1, 15, 1]
    assert not torch.equal(labeller.cls[1].weight, trained.cls[1].weight)
    assert "--dkd_memory_legacy" in seen["log"]
    path = memory_module.memory_path(opts, 2)
    assert [e.name for e in load_memory(path)] == ["b.jpg", "a.jpg"]
    assert json.loads(open(path).read())["meta"]["dkd_memory_legacy"] is True
    # a memory file already there (a resumed step) is kept; step 1 never uses the legacy rule
    seen.clear()
    component.setup_model(run, new, step_info(opts, 2, [16, 1, 1]))
    component.setup_model(run, make_model(opts, [16, 1]), step_info(opts, 1, [16, 1]))
    assert "model" not in seen


# ============================================================================================
# Part 3: run.py end to end
# ============================================================================================
EPOCH_LINE = re.compile(r"epoch \d+/\d+: (?P<terms>.*) \([\d.]+s\)$")
STEP_LINE = re.compile(r"step (?P<step>\d+): \d+ train / \d+ val / \d+ test images")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("dkd_e2e")


def logged_losses(cwd, name):
    """{step: {term: value}} from the ``epoch 1/1: mbce 0.79, dkd_kd 14.5, ...`` lines of log.txt."""
    losses, step = {}, None
    for line in (log_folder(cwd, name) / "log.txt").read_text().splitlines():
        if m := STEP_LINE.search(line):
            step = int(m["step"])
        elif m := EPOCH_LINE.search(line):
            losses[step] = {k: float(v) for k, v in (item.rsplit(" ", 1) for item in m["terms"].split(", "))}
    return losses


def rows(cwd, name):
    _, found = read_results(results_csv(cwd, name))
    return {int(row[0]): row for row in found}


def train(cwd, root, name, method, steps, extra=()):
    args = base_args(root, name, method) + list(extra)
    lrs = {0: "0.001", 1: "0.0001"}  # DKD's rates: 10x on the head and classifiers
    scores = run_cli(args + ["--step", *map(str, steps), "--lr", *(lrs[s] for s in steps)], cwd)
    return args, scores


@pytest.fixture(scope="module")
def dkd_run(tiny_voc, workspace):
    """DKD on SegFormer-B0, steps 0 and 1 in one invocation: (args, scores)."""
    return train(workspace, tiny_voc, "dkd", "DKD", [0, 1])


def check_trained_and_retested(cwd, name, args, scores, steps):
    assert sorted(rows(cwd, name)) == steps
    for step, score in zip(steps, scores):
        assert float(rows(cwd, name)[step][-1]) == pytest.approx(score["Mean IoU"])
    losses = logged_losses(cwd, name)
    if 0 in steps:
        assert set(losses[0]) == {"mbce_ac"}
    assert set(losses[1]) == STEP1_TERMS
    assert all(math.isfinite(v) and v > 0 for v in losses[1].values()), losses[1]
    state = load_checkpoint(checkpoint_file(cwd, name, 1))["model_state"]
    assert [state[f"cls.{i}.weight"].shape[0] for i in range(3)] == [1, 15, 5]
    before = rows(cwd, name)[1]
    retest = run_cli(args + ["--step", "1", "--test", "--ckpt", str(checkpoint_file(cwd, name, 1))], cwd)
    assert retest[0]["Mean IoU"] == scores[-1]["Mean IoU"]
    assert (retest[0]["Confusion Matrix"] == scores[-1]["Confusion Matrix"]).all()
    assert rows(cwd, name)[1] == before
    return losses


def test_dkd_trains_two_steps_and_retests(dkd_run, workspace):
    args, scores = dkd_run
    check_trained_and_retested(workspace, "dkd", args, scores, [0, 1])
    text = (log_folder(workspace, "dkd") / "log.txt").read_text()
    assert "New classifier initialised from the auxiliary classifier (DKD)" in text


def test_dkd_m_trains_step1_from_the_dkd_step0(dkd_run, tiny_voc, workspace):
    step0 = checkpoint_file(workspace, "dkd", 0)
    args, scores = train(workspace, tiny_voc, "dkd-m", "DKD-M", [1], ["--mem_size", "6", "--step_ckpt", str(step0)])
    losses = check_trained_and_retested(workspace, "dkd-m", args, scores, [1])
    step1 = checkpoint_file(workspace, "dkd-m", 1)
    assert step1.with_name(step1.stem + "_memory.json").is_file()
    found = re.search(r"Exemplar memory: (\d+) images", (log_folder(workspace, "dkd-m") / "log.txt").read_text())
    assert found and 0 < int(found[1]) <= 6
    # the memory changes the batches: not the run without it
    assert losses[1] != logged_losses(workspace, "dkd")[1]


def test_dkd_on_deeplab_trains_two_steps_and_retests(tiny_voc, workspace):
    args, scores = train(workspace, tiny_voc, "dkd-deeplab", "DKD", [0, 1], DEEPLAB)
    check_trained_and_retested(workspace, "dkd-deeplab", args, scores, [0, 1])
