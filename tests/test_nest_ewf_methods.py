"""The NeST and EWF techniques through ``run.py`` (VOC 15-5 on the tiny generated tree).

(a) MiB+NeST, SATS+NeST, MiB+EWF and SATS+EWF train step 1 from one shared FT step-0 file
    (``--step_ckpt``) and ``--test --ckpt`` on the step-1 file reproduces the end-of-step scores;
(b) EWF: the step-1 file is ``(1 − α)·step0 + α·trained`` (α = sqrt(5/21)) for every tensor the
    step-0 model has, the newest classifier as trained, the frozen background bias at
    ``b − α·log 6`` (MiB's balanced init moved it by −log 6), the ``ewf`` record; a run that died
    between the last save and the fusion fuses once on ``--ckpt``, a fused file is never fused again;
(c) NeST resumed mid-step with ``--ckpt`` does not pre-tune again;
(e) the refused combinations end with exit status 2 and the reason;
and PLOP+NeST with every hidden NeST switch plus EWF's, composed in one run.

(d) The SATS head folds the classifier into its linear maps; that the folded forward gives the
same logits with NeST's generated weights (during pre-tuning and once installed) is tested in
``tests/test_nest.py`` (``test_folded_head_path_equals_the_unfolded_one``,
``test_installed_classifier_gives_the_same_logits_folded_and_unfolded``). The fusion arithmetic
itself (BatchNorm statistics, dtypes, key sets, the threshold variant) is in ``tests/test_ewf.py``.
"""
import math
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

import argparser
import methods
from helpers_e2e import base_args, checkpoint_file, log_folder, results_csv, run_cli, tiny_voc  # noqa: F401
from utils import nest as nest_utils
from utils.checkpoint import load_checkpoint, save_atomic
from utils.results import read_results

ALPHA = math.sqrt(5 / 21)  # VOC 15-5, step 1: 5 new classes, 16 old (background included)
NEST_ARGS = ["--nest_epochs", "1"]
METHODS = ["MiB+NeST", "SATS+NeST", "MiB+EWF", "SATS+EWF"]
STEP1 = ["--step", "1", "--lr", "0.001"]


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("nest_ewf")


@pytest.fixture(scope="module")
def shared_step0(tiny_voc, workspace):
    run_cli(base_args(tiny_voc, "step0") + ["--step", "0"], workspace)
    return checkpoint_file(workspace, "step0", 0)


def method_args(root, name, method, step0):
    extra = NEST_ARGS if "NeST" in method else ["--ewf_keep_unfused"]
    return base_args(root, name, method) + extra + ["--step_ckpt", str(step0)]


@pytest.fixture(scope="module")
def trained(tiny_voc, workspace, shared_step0):
    """``trained(method)`` -> (args, step-1 score): step 1 trained once per module."""
    done = {}

    def train(method):
        if method not in done:
            args = method_args(tiny_voc, method, method, shared_step0)
            done[method] = args, run_cli(args + STEP1, workspace)[0]
        return done[method]

    return train


# ------------------------------------------------------------------------------- helpers
def log_text(cwd, name):
    return (log_folder(cwd, name) / "log.txt").read_text()


def step1_row(cwd, name):
    _, rows = read_results(results_csv(cwd, name))
    return [row for row in rows if row[0] == "1"]


def assert_same_score(a, b):
    assert a["Mean IoU"] == b["Mean IoU"] and a["Overall Acc"] == b["Overall Acc"]
    assert (a["Confusion Matrix"] == b["Confusion Matrix"]).all()


def states(cwd, name):
    """(step-0 state, trained step-1 state, fused step-1 checkpoint)."""
    step0 = load_checkpoint(checkpoint_file(cwd, "step0", 0))["model_state"]
    path = checkpoint_file(cwd, name, 1)
    unfused = load_checkpoint(str(path)[:-4] + "_unfused.pth")["model_state"]
    return step0, unfused, load_checkpoint(path)


# ------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("method", METHODS)
def test_a_step1_trains_and_retests_to_the_same_numbers(method, trained, workspace):
    args, score = trained(method)
    rows = step1_row(workspace, method)
    assert len(rows) == 1 and float(rows[0][-1]) == pytest.approx(score["Mean IoU"])
    log = log_text(workspace, method)
    recipe = methods.build_recipe(argparser.parse_options(args + STEP1), 1, [16, 5])
    ckpt = load_checkpoint(checkpoint_file(workspace, method, 1))
    if "NeST" in method:
        assert recipe.init_name == "nest"  # wins over MiB's balanced init
        assert "MiB balanced init" not in log
        assert log.count("NeST pre-tuning epoch 1/1: loss ") == 1 and log.count("NeST installed") == 1
        counts = [int(c) for c in re.search(r"pixels per new class \[([\d, ]+)\]", log)[1].split(",")]
        record = ckpt["methods"]["nest"]
        assert record["done"] is True and (record["epochs"], record["lr"], record["loss"]) == (1, 0.001, "unce")
        assert record["counts"] == counts and len(counts) == 5 and min(counts) > 0
        assert "ewf" not in ckpt
    else:
        assert recipe.init_name == "balanced"
        assert log.count("EWF: fused ") == 1 and f"alpha {ALPHA:.6f}" in log
        assert "frozen for this step" in log and "nest" not in ckpt["methods"]

    written = checkpoint_file(workspace, method, 1).stat().st_mtime_ns
    retest = run_cli(args + STEP1 + ["--test", "--ckpt", str(checkpoint_file(workspace, method, 1))], workspace)
    assert checkpoint_file(workspace, method, 1).stat().st_mtime_ns == written  # tested, not fused again
    assert_same_score(retest[0], score)
    assert step1_row(workspace, method) == rows


# ------------------------------------------------------------------------------- (b)
@pytest.mark.parametrize("method", ["MiB+EWF", "SATS+EWF"])
def test_b_fused_checkpoint_is_the_weighted_mean_of_the_endpoints(method, trained, workspace, shared_step0):
    trained(method)
    step0, unfused, ckpt = states(workspace, method)
    fused = ckpt["model_state"]
    assert ckpt["ewf"] == {"fused": True, "alpha": pytest.approx(ALPHA), "old_checkpoint": str(shared_step0),
                           "threshold_fraction": None}
    assert set(fused) == set(unfused) == set(step0) | {"cls.1.weight", "cls.1.bias"}
    for key, old in step0.items():
        assert old.is_floating_point()  # SegFormer-B0 has no integer buffer (see the after_step test)
        expected = (1 - ALPHA) * old.float() + ALPHA * unfused[key].float()
        assert torch.allclose(fused[key], expected, rtol=1e-6, atol=1e-7), key
    moved = [k for k in step0 if not torch.allclose(step0[k], unfused[k])]
    assert any(k.startswith("body.") for k in moved) and any(k.startswith("head.") for k in moved)
    for key in ("cls.1.weight", "cls.1.bias"):  # the newest classifier has no old endpoint: as trained
        assert torch.equal(fused[key], unfused[key])
    # --fix_pre_cls kept the old classifier as the balanced init left it: the weights as in step 0,
    # the background bias shifted by -log(5 + 1); fused, the shift is alpha * log 6
    assert torch.equal(unfused["cls.0.weight"], step0["cls.0.weight"])
    assert torch.equal(unfused["cls.0.bias"][1:], step0["cls.0.bias"][1:])
    b0 = float(step0["cls.0.bias"][0])
    assert float(unfused["cls.0.bias"][0]) == pytest.approx(b0 - math.log(6), abs=1e-6)
    assert float(fused["cls.0.bias"][0]) == pytest.approx(b0 - ALPHA * math.log(6), abs=1e-6)


def test_b_a_run_killed_between_save_and_fusion_fuses_once_on_resume(trained, tiny_voc, workspace,
                                                                      shared_step0):
    args, score = trained("MiB+EWF")
    name = "ewf-killed"
    target = checkpoint_file(workspace, name, 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    # the state of a run that saved its last epoch and died before after_step: the unfused file
    shutil.copyfile(str(checkpoint_file(workspace, "MiB+EWF", 1))[:-4] + "_unfused.pth", target)
    resume = base_args(tiny_voc, name, "MiB+EWF") + ["--step_ckpt", str(shared_step0), "--ckpt", str(target)] + STEP1
    resumed = run_cli(resume, workspace)[0]
    assert_same_score(resumed, score)
    fused = load_checkpoint(checkpoint_file(workspace, "MiB+EWF", 1))
    again = load_checkpoint(target)
    assert again["ewf"] == fused["ewf"]
    assert all(torch.equal(again["model_state"][k], v) for k, v in fused["model_state"].items())

    written = target.stat().st_mtime_ns  # the fused file resumed once more: not fused a second time
    run_cli(resume, workspace)
    assert target.stat().st_mtime_ns == written
    log = log_text(workspace, name)
    assert log.count("EWF: fused ") == 1 and log.count("is fused already") == 1

    with pytest.raises(ValueError, match="holds fused weights .* would fuse twice"):
        run_cli(resume + ["--epochs", "2"], workspace)  # training on from fused weights
    assert target.stat().st_mtime_ns == written


def test_b_after_step_keeps_integer_buffers_and_fuses_once(tmp_path):
    component = next(c for c in methods.components() if c.name == "ewf")
    old = {"body.w": torch.tensor([1.0, -2.0]), "body.bn.num_batches_tracked": torch.tensor(3),
           "cls.0.bias": torch.tensor([0.5])}
    new = {"body.w": torch.tensor([3.0, 2.0]), "body.bn.num_batches_tracked": torch.tensor(7),
           "cls.0.bias": torch.tensor([0.5]), "cls.1.bias": torch.tensor([-1.0, 4.0])}
    save_atomic({"model_state": old}, str(tmp_path / "old.pth"))
    save_atomic({"model_state": new, "epoch": 0}, str(tmp_path / "new.pth"))
    messages = []
    opts = SimpleNamespace(weight_fusion=True, ewf_alpha=None, ewf_threshold_fraction=None, ewf_keep_unfused=False)
    logger = SimpleNamespace(info=messages.append, add_scalar=lambda *a: None)
    run = SimpleNamespace(opts=opts, rank=0, classes=[3, 1], checkpoint=str(tmp_path / "new.pth"),
                          previous_checkpoint=str(tmp_path / "old.pth"), logger=logger)
    info = methods.StepInfo(opts=opts, step=1, classes=[3, 1], nb_old=3, nb_current=4)
    component.after_step(run, info)
    fused = load_checkpoint(tmp_path / "new.pth")
    state = fused["model_state"]
    # alpha = sqrt(1/4) = 0.5
    assert state["body.w"].tolist() == [2.0, 0.0] and state["cls.0.bias"].tolist() == [0.5]
    assert state["body.bn.num_batches_tracked"].dtype == torch.int64
    assert int(state["body.bn.num_batches_tracked"]) == 7
    assert state["cls.1.bias"].tolist() == [-1.0, 4.0]
    assert fused["ewf"]["alpha"] == 0.5 and fused["epoch"] == 0
    written = (tmp_path / "new.pth").stat().st_mtime_ns
    component.after_step(run, info)
    assert (tmp_path / "new.pth").stat().st_mtime_ns == written
    assert torch.equal(load_checkpoint(tmp_path / "new.pth")["model_state"]["body.w"], state["body.w"])
    assert "fused already" in messages[-1] and "alpha 0.500000" in messages[0]
    run.rank = 1  # only rank 0 writes
    save_atomic({"model_state": new}, str(tmp_path / "new.pth"))
    component.after_step(run, info)
    assert "ewf" not in load_checkpoint(tmp_path / "new.pth")


# ------------------------------------------------------------------------------- (c)
def test_c_nest_resumed_mid_step_does_not_pretune_again(tiny_voc, workspace, shared_step0, monkeypatch):
    name = "nest-resume"
    args = method_args(tiny_voc, name, "MiB+NeST", shared_step0) + STEP1 + ["--epochs", "2"]
    with pytest.raises(SystemExit) as stopped:
        run_cli(args + ["--stop_after_epochs", "1"], workspace)
    assert stopped.value.code == 0
    path = checkpoint_file(workspace, name, 1)
    middle = load_checkpoint(path)
    assert middle["epoch"] == 0 and middle["methods"]["nest"]["done"] is True

    def pretune_again(*args, **kwargs):
        raise AssertionError("NeST pre-tuned a resumed step a second time")

    monkeypatch.setattr(nest_utils, "run_nest", pretune_again)
    run_cli(args + ["--ckpt", str(path)], workspace)
    final = load_checkpoint(path)
    assert final["epoch"] == 1 and final["methods"]["nest"] == middle["methods"]["nest"]
    assert not torch.equal(final["model_state"]["cls.1.weight"], middle["model_state"]["cls.1.weight"])
    log = log_text(workspace, name)
    assert log.count("NeST pre-tuning epoch 1/1") == 1 and log.count("NeST installed") == 1
    assert log.count("pre-tuned already; not pre-tuning again") == 1


def test_expert_switches_reach_the_run_and_nest_composes_with_ewf(tiny_voc, workspace, shared_step0):
    """PLOP+NeST with every hidden NeST switch, and EWF's by hand (NeST at the start, EWF at the end)."""
    name = "plop-nest-switches"
    switches = ["--nest_lr_scale", "10", "--nest_loss", "ce", "--nest_unkd", "1", "--nest_grid", "8",
                "--nest_legacy_bias_init", "--nest_legacy_schedule", "--nest_bias_norm", "mean_abs",
                "--nest_empty_class", "uniform", "--weight_fusion", "--ewf_alpha", "0.3",
                "--ewf_threshold_fraction", "0.45"]
    run_cli(method_args(tiny_voc, name, "PLOP+NeST", shared_step0) + switches + STEP1, workspace)
    ckpt = load_checkpoint(checkpoint_file(workspace, name, 1))
    record = ckpt["methods"]["nest"]
    assert (record["lr"], record["loss"], record["unkd"], record["bias_norm"]) == (0.01, "ce", 1.0, "mean_abs")
    assert record["legacy"] == {"bias_init": True, "schedule": True}
    assert sum(record["counts"]) > 0 and len(record["counts"]) == 5  # an 8 x 8 grid: fewer pixels
    assert ckpt["ewf"]["alpha"] == 0.3 and ckpt["ewf"]["threshold_fraction"] == 0.45
    assert "frozen for this step" not in log_text(workspace, name)  # --weight_fusion alone: no --fix_pre_cls


# ------------------------------------------------------------------------------- (e)
REFUSALS = [
    (["--method", "SSUL+NeST"],
     "--method SSUL+NeST: NeST cannot be combined with SSUL: SSUL's channel 0 is its unknown class"),
    (["--method", "DKD+NeST"],
     "--method DKD+NeST: NeST cannot be combined with DKD: DKD's network has sigmoid channels"),
    (["--method", "LWF-MC+NeST"], "--method LWF-MC+NeST: NeST cannot be combined with LWF-MC: the pre-tuning fits"),
    (["--method", "SSUL+EWF"],
     "--method SSUL+EWF: EWF cannot be combined with SSUL: SSUL trains its unknown and background"),
    (["--method", "MiB", "--nest", "--cosine"], "--cosine cannot be combined with NeST"),
    (["--method", "FT", "--nest", "--bce"], "--bce cannot be combined with NeST"),
    (["--method", "SSUL", "--fix_pre_cls"], "--fix_pre_cls cannot be combined with SSUL"),
    (["--method", "MiB", "--nest_epochs", "3"], "--nest_epochs needs --nest (--method BASE+NeST)"),
    (["--method", "MiB+NeST", "--nest_epochs", "0"], "--nest_epochs must be a positive integer, got 0"),
    (["--method", "MiB", "--ewf_alpha", "0.5"], "--ewf_alpha needs --weight_fusion (--method BASE+EWF)"),
    (["--method", "MiB+EWF", "--ewf_alpha", "1.5"], "--ewf_alpha must be in [0, 1]"),
]


@pytest.mark.parametrize("extra,message", REFUSALS, ids=[" ".join(r[0][1:]) for r in REFUSALS])
def test_e_refused_combinations_exit_2_with_the_reason(extra, message, tiny_voc, tmp_path, capsys):
    args = [a for a in base_args(tiny_voc, "refused") if a != "--method"] + extra + ["--step", "1"]
    with pytest.raises(SystemExit) as refused:
        run_cli(args, tmp_path)
    assert refused.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(tmp_path / "logs")


# ------------------------------------------------------------------------------- sweeps
def test_sweep_values_are_the_authors():
    def settings(method, dataset, task):
        s = methods.sweep_settings(method, dataset, task)
        return s["epochs"], s["lr0"], s["lr"], s["args"]

    assert settings("MiB+NeST", "voc", "15-5s") == (30, 0.02, 0.001, ["--loss_kd", "10"])
    assert settings("MiB+NeST", "ade", "100-10") == (60, 0.02, 0.001, ["--loss_kd", "10"])
    assert settings("PLOP+NeST", "voc", "10-1") == (30, 0.02, 0.001, ["--fix_pre_cls"])
    assert settings("PLOP+NeST", "ade", "100-50")[:3] == (60, 0.02, 0.001)
    assert "--pod_factor" in settings("PLOP+NeST", "ade", "100-50")[3]
    assert settings("SATS+NeST", "voc", "15-5") == settings("SATS", "voc", "15-5")
    assert settings("MiB+EWF", "voc", "15-5s") == (30, 0.01, 0.001, ["--loss_kd", "10"])
    assert settings("MiB+EWF", "ade", "100-50") == (60, 0.01, 0.001, ["--loss_kd", "10"])
    assert settings("MiB+EWF", "ade", "100-10") == (60, 0.01, 0.001, ["--loss_kd", "100"])
    assert settings("MiB+EWF-M", "ade", "100-5")[3] == ["--loss_kd", "100"]
    assert settings("SATS+EWF", "ade", "100-10") == settings("SATS", "ade", "100-10")
    assert methods.sweep_settings("MiB+NeST", "voc", "15-5")["step0_family"] == "ce"
