"""The EWC / PI / RW importance under mixed precision with a real ``GradScaler``.

Set-up: a SegFormer-B0 on 64 x 64 images, fp16 autocast on the CPU with a
``torch.amp.GradScaler("cpu")`` -- the configuration ``--opt_level O1`` gives on CUDA. The
scaler starts at 2^16, grows by 2^24 after every good iteration and backs off by 2^-24 after an
overflow, so its own dynamics produce:

    iteration 1  scale 2^16   finite gradients, step taken            -> scale 2^40
    iteration 2  scale 2^40   fp16 activation gradients overflow      -> step skipped, scale 2^16
    iteration 3  scale 2^16   finite gradients, step taken

The skipped iteration must leave the weights AND the importance untouched (an overflowed gradient
read by ``update()`` would put Inf/NaN into the Fisher / path score, and from there into the
checkpoint and every later step's penalty). So the run must equal, bit for bit, a run at a fixed
scale of 2^16 that never sees batch 2.

With ``--freeze`` at step 1 the body is outside the optimiser but still has gradients, which the
importance reads: they must be unscaled like the optimiser's (an fp32 run with a 2^20 scale gives
exactly the Fisher of the same run without a scaler).
"""
import copy

import pytest
import torch

import argparser
import methods
from segmentation_module import make_model
from train import Trainer
from utils.regularizer import check_finite_state

CPU = torch.device("cpu")
SIZE = 64
OLD_CLASSES, NEW_CLASSES = 16, 5
LOW_SCALE, HIGH_SCALE = 2.0 ** 16, 2.0 ** 40
REGULARIZER_TENSORS = {"EWC": ("fisher",), "PI": ("delta", "score"), "RW": ("fisher", "running_score")}


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def options(*args):
    opts = argparser.parse_options(["--task", "15-5", "--model", "segformer_b0", "--no_pretrained",
                                    "--crop_size", str(SIZE), *map(str, args)])
    opts.lr = 0.01  # run.py sets the step's learning rate
    return opts


def batch(seed, step=0):
    """Two images with labels of the step's label space (step 0: 0..15, step 1: 0 and 16..20)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, SIZE, SIZE, generator=g)
    labels = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    first = OLD_CLASSES if step else 1
    labels[0, 8:28, 12:40] = first + 1
    labels[1, 20:56, 4:24] = first + 3
    labels[:, :, -4:] = 255
    return images, labels


def growing_scaler():
    """2^16, x 2^24 after each finite iteration, x 2^-24 after an overflow (see the module docstring)."""
    return torch.amp.GradScaler("cpu", init_scale=LOW_SCALE, growth_factor=2.0 ** 24, backoff_factor=2.0 ** -24,
                                growth_interval=1)


def fixed_scaler(scale):
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10 ** 9)


def fp16_trainer(model, opts, scaler, step=0, model_old=None, state=None, classes=(OLD_CLASSES,)):
    """A Trainer with CUDA's ``--opt_level O1`` numerics on the CPU: fp16 autocast + the scaler."""
    trainer = Trainer(model, model_old, CPU, opts, trainer_state=state, classes=list(classes), step=step,
                      scaler=scaler)
    trainer.amp_dtype = torch.float16
    return trainer


def iterate(trainer, optim, data, seed):
    """One iteration; the seed fixes MiT's drop-path draws so that two runs can be compared."""
    torch.manual_seed(seed)
    return trainer.train_iteration(data, optim)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def importance(trainer, method):
    """The regularizer's tensors that a checkpoint stores (``state_dict``), by 'key.parameter'."""
    state = trainer.regularizer.state_dict()
    return {f"{key}.{n}": t for key in REGULARIZER_TENSORS[method] for n, t in state[key].items()}


def assert_all_equal(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, first {different[:3]}"


def assert_all_finite(tensors: dict):
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    assert not bad, f"{len(bad)} non-finite tensors, first {bad[:3]}"


def build(method):
    opts = options("--method", method, "--reg_iterations", "1")  # RW: a path-score sample every update
    torch.manual_seed(0)
    model = make_model(opts, [OLD_CLASSES]).train()
    return opts, model


def sgd(model, opts, step=0):
    return torch.optim.SGD(methods.param_groups(model, opts, step), lr=opts.lr, momentum=0.9)


# ============================================================================================
# An overflowing iteration: no weight change, no importance update, then a normal iteration
# ============================================================================================
@pytest.mark.parametrize("method", ["EWC", "PI", "RW"])
def test_an_overflowing_iteration_changes_neither_weights_nor_importance(method):
    opts, model = build(method)
    reference_model = copy.deepcopy(model)
    batches = [batch(seed) for seed in (1, 2, 3)]

    scaler = growing_scaler()
    trainer = fp16_trainer(model, opts, scaler)
    optim = sgd(model, opts)
    iterate(trainer, optim, batches[0], seed=11)
    assert scaler.get_scale() == HIGH_SCALE and trainer.scaler_skips == 0
    after_first = weights(model), {k: t.clone() for k, t in importance(trainer, method).items()}

    iterate(trainer, optim, batches[1], seed=12)
    assert scaler.get_scale() == LOW_SCALE  # the scaler saw the overflow and backed off
    assert_all_finite(importance(trainer, method))
    check_finite_state(trainer.regularizer.state_dict(), "checkpoint.pth")  # what would be saved loads
    assert_all_equal(weights(model), after_first[0])
    assert_all_equal(importance(trainer, method), after_first[1])
    assert trainer.scaler_skips == 1

    iterate(trainer, optim, batches[2], seed=13)
    assert trainer.scaler_skips == 1 and scaler.get_scale() == HIGH_SCALE
    assert_all_finite(importance(trainer, method))
    changed = [n for n, w in weights(model).items() if not torch.equal(w, after_first[0][n])]
    assert len(changed) == len(after_first[0])  # every parameter moved
    moved = [k for k, t in importance(trainer, method).items() if not torch.equal(t, after_first[1][k])]
    assert len(moved) > len(after_first[1]) // 2  # the importance took the third batch in

    # = a run at a constant, non-overflowing scale that never saw batch 2
    reference = fp16_trainer(reference_model, opts, fixed_scaler(LOW_SCALE))
    reference_optim = sgd(reference_model, opts)
    iterate(reference, reference_optim, batches[0], seed=11)
    iterate(reference, reference_optim, batches[2], seed=13)
    assert_all_equal(weights(model), weights(reference_model))
    assert_all_equal(importance(trainer, method), importance(reference, method))


# ============================================================================================
# --freeze: the body is outside the optimiser, its gradients are read unscaled all the same
# ============================================================================================
def step1_pair(opts):
    """(new, old) at step 1: the new model holds the old weights plus a new classifier; the body
    is nudged so that the EWC penalty is not 0."""
    torch.manual_seed(0)
    old = make_model(opts, [OLD_CLASSES])
    new = make_model(opts, [OLD_CLASSES, NEW_CLASSES])
    new.load_state_dict(old.state_dict(), strict=False)
    old.eval().requires_grad_(False)
    with torch.no_grad():
        for p in new.body.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in old.named_parameters()}
    return new.train(), old, {"regularizer": {"name": "ewc", "fisher": fisher, "alpha": 0.9}}


def test_with_freeze_the_importance_reads_unscaled_gradients_of_parameters_outside_the_optimiser():
    opts = options("--method", "EWC", "--freeze")
    new, old, state = step1_pair(opts)
    body = {n for n, _ in new.named_parameters() if n.startswith("body.")}
    runs = {}
    for name, scaler in (("fp32", None), ("scaled", fixed_scaler(2.0 ** 20))):
        model = copy.deepcopy(new)
        trainer = Trainer(model, old, CPU, opts, trainer_state=copy.deepcopy(state),
                          classes=[OLD_CLASSES, NEW_CLASSES], step=1, scaler=scaler)
        optim = sgd(model, opts, step=1)
        in_optim = {id(p) for g in optim.param_groups for p in g["params"]}
        assert body and all(id(p) not in in_optim for n, p in model.named_parameters() if n in body)
        values = iterate(trainer, optim, batch(5, step=1), seed=21)
        assert values["reg"] > 0
        runs[name] = trainer.regularizer.fisher, {n: p.grad for n, p in model.named_parameters()}, model

    fisher, grads, model = runs["scaled"]
    fisher_fp32, grads_fp32, model_fp32 = runs["fp32"]
    # A power-of-two scale on fp32 gradients is exact: the unscaled values are the fp32 ones.
    for n in body:
        torch.testing.assert_close(fisher[n], fisher_fp32[n], rtol=1e-6, atol=0, msg=lambda m: f"{n}: {m}")
        torch.testing.assert_close(grads[n], grads_fp32[n], rtol=1e-6, atol=0, msg=lambda m: f"{n}: {m}")
    frozen = {n: w for n, w in weights(new).items() if n in body}
    assert_all_equal({n: w for n, w in weights(model).items() if n in body}, frozen)  # not stepped
    torch.testing.assert_close(weights(model), weights(model_fp32), rtol=1e-6, atol=1e-9)


# ============================================================================================
# A stored importance with NaN/Inf is refused, naming the file
# ============================================================================================
def test_check_finite_state_accepts_a_trained_state_and_names_the_file_of_a_nan_one():
    opts, model = build("EWC")
    trainer = fp16_trainer(model, opts, fixed_scaler(LOW_SCALE))
    iterate(trainer, sgd(model, opts), batch(1), seed=11)
    state = trainer.regularizer.state_dict()
    check_finite_state(state, "ckpt/15-5-voc_EWC_0.pth")

    first = next(iter(state["fisher"]))
    state["fisher"][first] = state["fisher"][first].clone()
    state["fisher"][first].view(-1)[3] = float("nan")
    with pytest.raises(ValueError) as info:
        check_finite_state(state, "ckpt/15-5-voc_EWC_0.pth", step=0)
    message = str(info.value)
    assert "ckpt/15-5-voc_EWC_0.pth" in message and "non-finite" in message and "importance" in message
    assert f"fisher.{first}" in message and "(1 tensors" in message
    assert "Retrain step 0" in message and "--opt_level O0" in message


def test_check_finite_state_finds_inf_in_a_nested_rw_state():
    state = {"name": "rw", "iteration": 10, "alpha": 0.9,
             "fisher": {"w": torch.ones(3)},
             "score": {"w": torch.tensor([0.0, float("inf"), 1.0]), "b": torch.tensor([float("-inf")])},
             "running_score": {"w": torch.zeros(3)}}
    with pytest.raises(ValueError, match=r"run/x\.pth .*\(2 tensors, first score\.w\).*Retrain that step"):
        check_finite_state(state, "run/x.pth")
    state["score"] = {"w": torch.zeros(3), "b": torch.zeros(1)}
    check_finite_state(state, "run/x.pth")
