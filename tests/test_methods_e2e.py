"""Every method through ``run.py``: steps 0 and 1 of VOC 15-5 on a tiny generated tree, then
``--test --ckpt`` on the step-1 checkpoint.

For each method the run must finish, write the results row of each step, log every loss term its
recipe declares (the text log's ``epoch 1/1: ce ..., kd ..., sats ...`` line) with finite values,
and re-testing the saved step-1 file must reproduce the end-of-step scores and results row.

Step 0 is trained once (FT) and shared through ``--step_ckpt`` by the methods whose step-0 recipe
is plain CE with nothing else (LWF, ILT, MiB, PLOP, SATS, SATS-M). LWF-MC (BCE at step 0), EWC, RW,
PI (importance accumulated during step 0) and SSUL / SSUL-M (unknown-channel classifier) run both
steps in one invocation (``--step 0 1 --lr 0.01 0.001``). DeepLab-v3 (ResNet-50) runs PLOP so that
POD reads the ResNet maps, and SATS with ``--distill_object sats-feature-CNN`` from its step 0.
"""
import math
import re
from dataclasses import dataclass

import pytest
import torch

import argparser
from helpers_e2e import (base_args, checkpoint_file, log_folder, results_csv, run_cli,  # noqa: F401
                         tiny_voc)
from train import build_recipe
from utils.checkpoint import load_checkpoint
from utils.results import read_results

STEP_LRS = {0: "0.01", 1: "0.001"}
MEMORY_SIZE = 6
DEEPLAB = ["--model", "deeplab", "--backbone", "resnet50", "--norm_act", "std", "--no_pretrained",
           "--output_stride", "16"]
DISTILLATION_TERMS = {"kd", "de", "icarl", "pod", "sats"}


@dataclass(frozen=True)
class Case:
    method: str
    own_step0: bool  # False: step 1 starts from the shared FT step-0 checkpoint
    step1_terms: frozenset  # the keys of the step-1 epoch line
    memory: bool = False
    criterion0: str = "ce"  # the main criterion's key at step 0

    @property
    def steps(self):
        return [0, 1] if self.own_step0 else [1]

    @property
    def step0_terms(self):
        return {self.criterion0, "reg"} if "reg" in self.step1_terms else {self.criterion0}


def case(method, own_step0, criterion, *terms, memory=False, criterion0="ce"):
    """``criterion``: the main criterion's log key at step 1 (its own name: ce, unce, bce, ssul)."""
    return Case(method, own_step0, frozenset((criterion,) + terms), memory, criterion0)


CASES = [
    case("FT", False, "ce"),
    case("LWF", False, "ce", "kd"),
    case("LWF-MC", True, "bce", "icarl", criterion0="bce"),
    case("ILT", False, "ce", "kd", "de"),
    case("EWC", True, "ce", "reg"),
    case("RW", True, "ce", "reg"),
    case("PI", True, "ce", "reg"),
    case("MiB", False, "unce", "kd"),
    case("PLOP", False, "ce", "pod"),
    case("SSUL", True, "ssul", criterion0="ssul"),
    case("SATS", False, "ce", "kd", "sats"),
    case("SATS-M", False, "ce", "kd", "sats", memory=True),
    case("SSUL-M", True, "ssul", memory=True, criterion0="ssul"),
]


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Working directory of every run of this module (checkpoints/, logs/, results/, data/)."""
    return tmp_path_factory.mktemp("methods_e2e")


@pytest.fixture(scope="module")
def shared_step0(tiny_voc, workspace):
    """The FT step-0 checkpoint that the plain-CE-at-step-0 methods start their step 1 from."""
    name = "shared-step0"
    run_cli(base_args(tiny_voc, name) + ["--step", "0"], workspace)
    assert step_rows(workspace, name).keys() == {0}
    return checkpoint_file(workspace, name, 0)


@pytest.fixture(scope="module")
def deeplab_plop(tiny_voc, workspace):
    """PLOP on DeepLab-v3/ResNet-50, steps 0 and 1 in one invocation: (name, args, scores)."""
    name = "deeplab-PLOP"
    args = base_args(tiny_voc, name, "PLOP") + DEEPLAB
    return name, args, run_cli(args + steps_args([0, 1]), workspace)


# ------------------------------------------------------------------------------- helpers
def steps_args(steps):
    return ["--step", *map(str, steps), "--lr", *(STEP_LRS[s] for s in steps)]


def step_rows(cwd, name):
    """{step: results row (strings)} of the run's CSV."""
    header, rows = read_results(results_csv(cwd, name))
    assert header[0] == "step" and header[-1] == "mIoU"
    return {int(row[0]): row for row in rows}


EPOCH_LINE = re.compile(r"epoch \d+/\d+: (?P<terms>.*) \([\d.]+s\)$")
STEP_LINE = re.compile(r"step (?P<step>\d+): \d+ train / \d+ val / \d+ test images")


def logged_epoch_losses(cwd, name):
    """{step: {term: value}} from the ``epoch i/n: ce 1.2345, kd 0.5, ...`` lines of log.txt."""
    losses, step = {}, None
    for line in (log_folder(cwd, name) / "log.txt").read_text().splitlines():
        if m := STEP_LINE.search(line):
            step = int(m["step"])
        elif m := EPOCH_LINE.search(line):
            pairs = (item.rsplit(" ", 1) for item in m["terms"].split(", "))
            losses[step] = {key: float(value) for key, value in pairs}
    return losses


def recipe_keys(args, step):
    """The loss keys the Trainer reports for these options: the criterion's name, every term the
    recipe declares and 'reg' with a regularizer."""
    recipe = build_recipe(argparser.parse_options(args), step)
    return {recipe.criterion.name} | {t.name for t in recipe.terms} | ({"reg"} if recipe.regularizer else set())


def retest_step1(cwd, name, args):
    """``--test --ckpt`` on the step-1 file; returns (its score, the CSV row before, after)."""
    before = step_rows(cwd, name)[1]
    ckpt = checkpoint_file(cwd, name, 1)
    written = ckpt.stat().st_mtime_ns
    scores = run_cli(args + ["--step", "1", "--test", "--ckpt", str(ckpt)], cwd)
    assert ckpt.stat().st_mtime_ns == written  # tested, not trained again
    return scores, before, step_rows(cwd, name)[1]


def changed_weights(step0_file, step1_file):
    """Names of the step-0 tensors that step 1 changed (step 1's new classifier left out)."""
    before = load_checkpoint(step0_file)["model_state"]
    after = load_checkpoint(step1_file)["model_state"]
    assert set(before) <= set(after)
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def assert_same_score(a, b):
    assert a["Mean IoU"] == b["Mean IoU"]
    assert a["Overall Acc"] == b["Overall Acc"]
    assert (a["Confusion Matrix"] == b["Confusion Matrix"]).all()


def check_run(cwd, name, args, steps, scores, step_terms):
    """Exit OK, a results row per step, every declared loss term logged and finite, and the
    ``--test --ckpt`` score and row equal to the end of step 1."""
    assert len(scores) == len(steps)
    rows = step_rows(cwd, name)
    assert sorted(rows) == steps
    for step in steps:
        assert math.isfinite(float(rows[step][-1]))
        assert float(rows[step][-1]) == pytest.approx(scores[steps.index(step)]["Mean IoU"])
    losses = logged_epoch_losses(cwd, name)
    assert sorted(losses) == steps
    for step in steps:
        assert set(losses[step]) == set(step_terms[step])
        assert recipe_keys(args, step) <= set(losses[step])
        assert all(math.isfinite(v) and v >= 0 for v in losses[step].values()), losses[step]
    # every distillation term has something to distil at step 1 (new and old outputs differ), and
    # the regularizers penalise the drift with the importance carried over in the step-0 file
    assert all(losses[1][k] > 0 for k in set(losses[1]) & (DISTILLATION_TERMS | {"reg"})), losses[1]
    assert any(p.name.startswith("events.out.tfevents") for p in log_folder(cwd, name).iterdir())

    test_scores, row_before, row_after = retest_step1(cwd, name, args)
    assert len(test_scores) == 1
    assert_same_score(test_scores[0], scores[-1])
    assert row_after == row_before
    return losses


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("c", CASES, ids=[c.method for c in CASES])
def test_method_trains_two_steps_and_retests(c, tiny_voc, workspace, request):
    name = f"e2e-{c.method}"
    args = base_args(tiny_voc, name, c.method)
    if c.memory:
        args += ["--mem_size", str(MEMORY_SIZE)]
    if c.own_step0:
        step0_file = checkpoint_file(workspace, name, 0)
        scores = run_cli(args + steps_args(c.steps), workspace)
    else:
        step0_file = request.getfixturevalue("shared_step0")
        scores = run_cli(args + steps_args(c.steps) + ["--step_ckpt", str(step0_file)], workspace)

    losses = check_run(workspace, name, args, c.steps, scores, {0: c.step0_terms, 1: c.step1_terms})
    if "reg" in c.step1_terms:  # no previous model at step 0: nothing to penalise yet
        assert losses[0]["reg"] == 0.0
    check_trained_weights(c.method, step0_file, checkpoint_file(workspace, name, 1))
    if c.memory:
        check_memory(workspace, name)


def check_trained_weights(method, step0_file, step1_file):
    changed = changed_weights(step0_file, step1_file)
    if method.startswith("SSUL"):  # frozen network and BN: only the unknown and bg classifiers move
        assert changed == {"cls.0.weight", "cls.0.bias", "cls.1.weight", "cls.1.bias"}
    else:
        assert any(k.startswith("body.") for k in changed)
        assert any(k.startswith("head.") for k in changed)


def check_memory(cwd, name):
    """The exemplar memory was chosen, saved beside the step-1 checkpoint and logged."""
    step1_file = checkpoint_file(cwd, name, 1)
    assert step1_file.with_name(step1_file.stem + "_memory.json").is_file()
    found = re.search(r"Exemplar memory: (\d+) images", (log_folder(cwd, name) / "log.txt").read_text())
    assert found and 0 < int(found[1]) <= MEMORY_SIZE


def test_plop_on_deeplab_distils_the_resnet_maps(deeplab_plop, workspace):
    name, args, scores = deeplab_plop
    losses = check_run(workspace, name, args, [0, 1], scores, {0: {"ce"}, 1: {"ce", "pod"}})
    assert losses[1]["pod"] > 0


def test_sats_feature_cnn_on_deeplab_runs_from_the_plop_step0(deeplab_plop, tiny_voc, workspace):
    plop_name = deeplab_plop[0]
    name = "deeplab-SATS-CNN"
    args = base_args(tiny_voc, name, "SATS") + DEEPLAB + ["--distill_object", "sats-feature-CNN"]
    step0_file = checkpoint_file(workspace, plop_name, 0)
    scores = run_cli(args + steps_args([1]) + ["--step_ckpt", str(step0_file)], workspace)
    check_run(workspace, name, args, [1], scores, {1: {"ce", "kd", "sats"}})


def test_sats_attention_transfer_on_deeplab_is_rejected(tiny_voc, workspace, capsys):
    args = base_args(tiny_voc, "deeplab-SATS", "SATS") + DEEPLAB + steps_args([1])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args, workspace)
    assert exit_info.value.code == 2
    assert "--distill_object sats-selfattn transfers self-attention maps" in capsys.readouterr().err
    assert not checkpoint_file(workspace, "deeplab-SATS", 1).exists()
