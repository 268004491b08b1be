"""EWF endpoints weight fusion (utils/ewf.py): α from the task table, fusion of parameters, BN
buffers and integer buffers, key sets, the MiB-init background bias, chains of steps, the
threshold variant, idempotent in-place fusion of a checkpoint, and --fix_pre_cls freezing."""
import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tasks
from methods.common import default_param_groups
from segmentation_module import IncrementalSegmentationModule
from utils.checkpoint import load_checkpoint, save_atomic
from utils.ewf import (ewf_alpha, freeze_old_classifiers, fuse_checkpoint, fuse_state_dicts, is_fused,
                       old_classifier_names, unfused_path)

SQRT_1_17 = math.sqrt(1 / 17)


class PixelBody(nn.Module):
    def forward(self, x):
        return x, [x]


def bn_model(classes):
    """A small incremental model whose head has a BatchNorm (running stats, num_batches_tracked)."""
    head = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    return IncrementalSegmentationModule(PixelBody(), head, 2, list(classes))


# --- T1 alpha --------------------------------------------------------------------------------
def test_t1_alpha_by_hand():
    assert ewf_alpha([16, 1]) == pytest.approx(0.242536, abs=1e-6)
    assert ewf_alpha([6, 3]) == pytest.approx(0.577350, abs=1e-6)
    assert ewf_alpha([6, 3, 3, 3, 3, 3]) == pytest.approx(0.377964, abs=1e-6)
    assert ewf_alpha([101, 50]) == pytest.approx(0.575435, abs=1e-6)
    assert ewf_alpha([101] + [5] * 10) == pytest.approx(0.181969, abs=1e-6)
    with pytest.raises(ValueError, match="step > 0"):
        ewf_alpha([21])


@pytest.mark.parametrize("dataset, task, step, alpha", [
    ("voc", "19-1", 1, 0.218218), ("voc", "15-5s", 1, 0.242536), ("voc", "15-5s", 5, 0.218218),
    ("voc", "10-1", 1, 0.288675), ("voc", "10-1", 10, 0.218218), ("voc", "5-3", 1, 0.577350),
    ("voc", "5-3", 5, 0.377964), ("ade", "100-50", 1, 0.575435), ("ade", "100-10", 1, 0.300150),
    ("ade", "100-10", 5, 0.257343), ("ade", "100-5", 1, 0.217186), ("ade", "100-5", 10, 0.181969)])
def test_alpha_of_the_published_settings(dataset, task, step, alpha):
    """Background counted among the old classes (the task table's step-0 count)."""
    assert ewf_alpha(tasks.get_per_task_classes(dataset, task, step)) == pytest.approx(alpha, abs=1e-6)


# --- T2, T3 fusion -----------------------------------------------------------------------------
def test_t2_parameters():
    old, new = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    assert fuse_state_dicts(old, new, 0.5)["w"].tolist() == [2.0, 4.0]
    assert fuse_state_dicts(old, new, SQRT_1_17)["w"].tolist() == pytest.approx([1.485071, 2.970143], abs=1e-6)
    with pytest.raises(ValueError, match="--ewf_alpha"):
        fuse_state_dicts(old, new, 1.5)


def test_t3_batchnorm_buffers_and_integer_buffers():
    old = {"bn.running_mean": torch.tensor([0.0, 0.0]), "bn.running_var": torch.tensor([1.0, 1.0]),
           "bn.num_batches_tracked": torch.tensor(100)}
    new = {"bn.running_mean": torch.tensor([1.0, -1.0]), "bn.running_var": torch.tensor([3.0, 5.0]),
           "bn.num_batches_tracked": torch.tensor(250)}
    fused = fuse_state_dicts(old, new, 0.5)
    assert fused["bn.running_mean"].tolist() == [0.5, -0.5]
    assert fused["bn.running_var"].tolist() == [2.0, 3.0]  # linear, not the variance of a mixture
    assert fused["bn.num_batches_tracked"].item() == 250
    assert fused["bn.num_batches_tracked"].dtype == torch.int64


def test_dtypes_are_kept():
    old = {"h": torch.tensor([1.0, 2.0], dtype=torch.float16), "d": torch.tensor([1.0], dtype=torch.float64)}
    new = {"h": torch.tensor([3.0, 4.0], dtype=torch.float16), "d": torch.tensor([2.0], dtype=torch.float64)}
    fused = fuse_state_dicts(old, new, 0.25)
    assert fused["h"].dtype == torch.float16 and fused["h"].tolist() == [1.5, 2.5]
    assert fused["d"].dtype == torch.float64 and fused["d"].item() == 1.25


# --- T4 key sets ---------------------------------------------------------------------------------
def test_t4_key_sets_and_prefixes():
    old = {"module.w": torch.tensor([1.0]), "module.cls.0.weight": torch.tensor([2.0])}
    new = OrderedDict([("w", torch.tensor([3.0])), ("cls.0.weight", torch.tensor([4.0])),
                       ("cls.1.weight", torch.tensor([0.123456789]))])
    fused = fuse_state_dicts(old, new, 0.5)
    assert list(fused) == list(new)  # the new endpoint's names and order
    assert fused["w"].item() == 2.0 and fused["cls.0.weight"].item() == 3.0
    assert torch.equal(fused["cls.1.weight"], new["cls.1.weight"])  # newest classifier as trained
    prefixed_new = OrderedDict(("module." + k, v) for k, v in new.items())
    assert fuse_state_dicts({"w": torch.tensor([1.0])}, prefixed_new, 0.5)["module.w"].item() == 2.0

    with pytest.raises(ValueError, match="missing from the new one"):
        fuse_state_dicts({"extra": torch.tensor([1.0]), **old}, new, 0.5)
    with pytest.raises(ValueError, match="shape"):
        fuse_state_dicts({"w": torch.tensor([1.0, 2.0])}, new, 0.5)


# --- T5 background bias after MiB's init with frozen old classifiers ---------------------------
def test_t5_background_bias_through_balanced_init_and_fix_pre_cls():
    torch.manual_seed(0)
    old_model = bn_model([2])
    with torch.no_grad():
        old_model.cls[0].bias[0] = 0.7
    new_model = bn_model([2, 1])
    new_model.load_state_dict(old_model.state_dict(), strict=False)
    frozen = freeze_old_classifiers(new_model)
    new_model.init_new_classifier()  # MiB: b_0 - log(2) for background and new class
    assert frozen == ["cls.0.bias", "cls.0.weight"]
    new_state = new_model.state_dict()  # the old classifiers did not train: the file holds them as initialised
    assert new_state["cls.0.bias"][0].item() == pytest.approx(0.006853, abs=1e-6)
    old_state = old_model.state_dict()
    for alpha, expected in [(0.5, 0.353426), (SQRT_1_17, 0.531887)]:
        fused = fuse_state_dicts(old_state, new_state, alpha)
        assert fused["cls.0.bias"][0].item() == pytest.approx(expected, abs=1e-6)
        assert torch.equal(fused["cls.0.bias"][1:], old_state["cls.0.bias"][1:])
        assert torch.equal(fused["cls.0.weight"], old_state["cls.0.weight"])
        assert torch.equal(fused["cls.1.weight"], new_state["cls.1.weight"])


# --- T7 threshold variant ----------------------------------------------------------------------
def test_t7_threshold_variant():
    old = {"w": torch.zeros(10)}
    new = {"w": torch.arange(1, 11, dtype=torch.float32) / 10}
    fused = fuse_state_dicts(old, new, 0.5, threshold_fraction=0.45)
    expected = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.35, 0.4, 0.45, 0.5]
    assert fused["w"].tolist() == pytest.approx(expected, abs=1e-7)
    # pooled over every fused entry of the model, not per entry
    split = fuse_state_dicts({"a": torch.zeros(4), "b": torch.zeros(6)},
                             {"a": new["w"][:4], "b": new["w"][4:]}, 0.5, threshold_fraction=0.45)
    assert torch.cat([split["a"], split["b"]]).tolist() == pytest.approx(expected, abs=1e-7)
    with pytest.raises(ValueError, match="--ewf_threshold_fraction"):
        fuse_state_dicts(old, new, 0.5, threshold_fraction=0.0)


# --- checkpoints: T6 chain, T8 idempotence, T10 extremes ---------------------------------------
def write(path, state, **extra):
    save_atomic({"epoch": 0, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []}, **extra},
                path)
    return str(path)


def test_t6_chain_uses_the_fused_endpoint(tmp_path):
    step0 = write(tmp_path / "t_0.pth", {"w": torch.tensor([0.0])})
    step1 = write(tmp_path / "t_1.pth", {"w": torch.tensor([4.0])})
    report = fuse_checkpoint(step1, step0, 0.5)
    assert report.fused and report.mean_abs_delta == {"w": 4.0}
    assert load_checkpoint(step1)["model_state"]["w"].item() == 2.0
    step2 = write(tmp_path / "t_2.pth", {"w": torch.tensor([6.0])})  # trained from the fused step 1
    fuse_checkpoint(step2, step1, 0.5)
    assert load_checkpoint(step2)["model_state"]["w"].item() == 4.0  # (2 + 6) / 2, not (4 + 6) / 2


def test_t8_second_call_is_a_no_op_and_the_record(tmp_path):
    old = write(tmp_path / "old.pth", {"w": torch.tensor([1.0, 2.0])})
    new = write(tmp_path / "new.pth", {"w": torch.tensor([3.0, 6.0])}, trainer_state={"global_iter": 7})
    first = fuse_checkpoint(new, old, SQRT_1_17, keep_unfused=True)
    content = (tmp_path / "new.pth").read_bytes()
    second = fuse_checkpoint(new, old, 0.9)
    assert first.fused and not second.fused and second.alpha == pytest.approx(SQRT_1_17)
    assert (tmp_path / "new.pth").read_bytes() == content
    ckpt = load_checkpoint(new)
    assert is_fused(ckpt)
    assert ckpt["ewf"] == {"fused": True, "alpha": pytest.approx(SQRT_1_17), "old_checkpoint": old,
                           "threshold_fraction": None}
    assert ckpt["model_state"]["w"].tolist() == pytest.approx([1.485071, 2.970143], abs=1e-6)
    assert ckpt["trainer_state"] == {"global_iter": 7} and ckpt["epoch"] == 0  # the rest is kept
    unfused = load_checkpoint(unfused_path(new))
    assert unfused_path(new).endswith("new_unfused.pth") and not is_fused(unfused)
    assert unfused["model_state"]["w"].tolist() == [3.0, 6.0]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_t10_alpha_one_and_zero_on_a_model(tmp_path):
    torch.manual_seed(0)
    old_model, new_model = bn_model([2]), bn_model([2, 1])
    new_model.train()
    new_model(torch.randn(2, 2, 3, 3))  # running stats and num_batches_tracked move
    old_state, new_state = old_model.state_dict(), new_model.state_dict()
    for alpha, reference in [(1.0, new_state), (0.0, old_state)]:
        fused = fuse_state_dicts(old_state, new_state, alpha)
        for key in old_state:
            expected = new_state[key] if key.endswith("num_batches_tracked") else reference[key]
            assert torch.equal(fused[key], expected), key
        assert torch.equal(fused["cls.1.weight"], new_state["cls.1.weight"])
        assert torch.equal(fused["cls.1.bias"], new_state["cls.1.bias"])
    assert fuse_state_dicts(old_state, new_state, 0.0)["head.1.num_batches_tracked"].item() == 1
    new_model.load_state_dict(fuse_state_dicts(old_state, new_state, 0.3), strict=True)


def test_missing_files_are_named(tmp_path):
    new = write(tmp_path / "new.pth", {"w": torch.tensor([1.0])})
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        fuse_checkpoint(new, str(tmp_path / "nowhere.pth"), 0.5)


# --- --fix_pre_cls -------------------------------------------------------------------------------
def test_fix_pre_cls_freezes_the_old_classifiers_out_of_the_optimiser():
    model = bn_model([2, 1, 1])
    assert old_classifier_names(model) == ["cls.0.weight", "cls.0.bias", "cls.1.weight", "cls.1.bias"]
    assert freeze_old_classifiers(model) == ["cls.0.bias", "cls.0.weight", "cls.1.bias", "cls.1.weight"]
    opts = SimpleNamespace(lr=0.01, lr_head=1.0, lr_old=None, freeze=False, weight_decay=1e-4)
    in_optimizer = {id(p) for group in default_param_groups(model, opts, step=2) for p in group["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in in_optimizer}
    assert {"cls.2.weight", "cls.2.bias", "head.0.weight", "head.1.weight"} <= names
    assert not names & {"cls.0.weight", "cls.0.bias", "cls.1.weight", "cls.1.bias"}
    assert freeze_old_classifiers(bn_model([3])) == []
