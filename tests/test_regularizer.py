"""Tests of the EWC / PI / RW weight regularizers (utils/regularizer.py)."""

import copy
import io
import os
from argparse import Namespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from utils.regularizer import EPS, EWC, PI, RW, get_regularizer, normalize_fn

W, B, HEAD = "body.weight", "body.bias", "head_new"


class Tiny(nn.Module):
    """body.weight (1, 3), body.bias (1,), a frozen parameter, optionally a new head."""

    def __init__(self, with_new_head=False):
        super().__init__()
        self.body = nn.Linear(3, 1)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        if with_new_head:
            self.head_new = nn.Parameter(torch.zeros(2))
        with torch.no_grad():
            self.body.weight.zero_()
            self.body.bias.zero_()


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the model lives in ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def set_grads(model, weight=None, bias=None, head=None):
    model.body.weight.grad = None if weight is None else torch.tensor([weight])
    model.body.bias.grad = None if bias is None else torch.tensor([bias])
    if hasattr(model, "head_new"):
        model.head_new.grad = None if head is None else torch.tensor(head)


def move(model, weight=(0.0, 0.0, 0.0), bias=0.0, head=None):
    """An optimiser step by hand: add displacements to the parameters."""
    with torch.no_grad():
        model.body.weight += torch.tensor([weight])
        model.body.bias += bias
        if head is not None:
            model.head_new += torch.tensor(head)


def round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def next_step(model):
    """(new model with a new head, starting from the old weights; frozen old model)."""
    old = copy.deepcopy(model)
    for p in old.parameters():
        p.requires_grad_(False)
    new = Tiny(with_new_head=True)
    new.load_state_dict(model.state_dict(), strict=False)
    return new, old


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# EWC
# ----------------------------------------------------------------------------------------------

def ewc_step0():
    """F starts at 1. Update 1: g_w = [2, 1, 0], g_b = 3 -> F_w = 0.9 [4, 1, 0] + 0.1 = [3.7, 1.0, 0.1],
    F_b = 8.2. Update 2: g_w = [1, 1, 0], no bias grad -> F_w = 0.9 [1, 1, 0] + 0.1 F_w =
    [1.27, 1.0, 0.01], F_b stays 8.2."""
    model = Tiny()
    reg = EWC(model, None, "cpu")
    set_grads(model, [2.0, 1.0, 0.0], 3.0)
    reg.update()
    close(reg.fisher[W], [[3.7, 1.0, 0.1]])
    close(reg.fisher[B], [8.2])
    set_grads(model, [1.0, 1.0, 0.0], None)
    reg.update()
    return model, reg


def test_ewc_fisher_moving_average_and_skips():
    model, reg = ewc_step0()
    close(reg.fisher[W], [[1.27, 1.0, 0.01]])
    close(reg.fisher[B], [8.2])
    assert "frozen" not in reg.fisher
    assert not reg.penalize and reg.penalty().item() == 0.0


def test_ewc_penalty_from_the_previous_fisher():
    model, reg = ewc_step0()
    state = round_trip(reg.state_dict())
    assert state["name"] == "ewc" and state["alpha"] == pytest.approx(0.9)
    new, old = next_step(model)
    ewc = EWC(new, old, "cpu", fisher=state["fisher"])
    # Omega_w = normalize([1.27, 1.0, 0.01]) = [1.26, 0.99, 0] / 1.26; Omega_b = normalize([8.2]) = 0.
    close(ewc.importance[W], [[1.26 / (1.26 + EPS), 0.99 / (1.26 + EPS), 0.0]])
    close(ewc.importance[B], [0.0])
    assert ewc.penalty().item() == 0.0
    move(new, weight=(1.0, 2.0, 3.0), bias=0.5, head=(5.0, 5.0))
    # 1 * 1 + (0.99 / 1.26) * 4 + 0 * 9 = 29 / 7 (the new head has no old value: not penalised).
    assert ewc.penalty().item() == pytest.approx(29 / 7, rel=1e-6)
    # The running Fisher restarts from the un-normalised previous one; the new head from ones.
    close(ewc.fisher[W], [[1.27, 1.0, 0.01]])
    close(ewc.fisher[HEAD], [1.0, 1.0])


def test_ewc_penalty_without_normalisation_skips_frozen_parameters():
    model, reg = ewc_step0()
    new, old = next_step(model)
    new.body.bias.requires_grad_(False)
    ewc = EWC(new, old, "cpu", fisher=reg.state_dict()["fisher"], normalize=False)
    move(new, weight=(1.0, 2.0, 3.0), bias=0.5)
    # 1.27 * 1 + 1.0 * 4 + 0.01 * 9 = 5.36; the frozen bias (8.2 * 0.25 = 2.05) is skipped.
    penalty = ewc.penalty()
    assert penalty.item() == pytest.approx(5.36, rel=1e-6)
    penalty.backward()
    # d/dθ Σ Ω (θ − θ*)² = 2 Ω (θ − θ*)
    close(new.body.weight.grad, [[2 * 1.27, 2 * 1.0 * 2, 2 * 0.01 * 3]])


def test_ewc_load_state_dict_round_trip():
    model, reg = ewc_step0()
    restored = EWC(model, None, "cpu", alpha=0.1)
    restored.load_state_dict(round_trip(reg.state_dict()))
    close(restored.fisher[W], [[1.27, 1.0, 0.01]])
    assert restored.alpha == pytest.approx(0.9)
    with pytest.raises(ValueError, match="'rw'"):
        restored.load_state_dict({"name": "rw"})


# ----------------------------------------------------------------------------------------------
# PI
# ----------------------------------------------------------------------------------------------

def pi_step0():
    """θ0 = 0. update (g0, snapshot θ0); step d0 = [-1, 1, 0.5], b +1; update with g1 = [2, 1, 1],
    g_b = -1: δ += g1 (θ0 − θ1) = [2, -1, -0.5], δ_b = 1; step d1 = [-1, 0, 0.5], b +1;
    update with g2 = [1, 3, 2], g_b = -3: δ += [1, 0, -1], δ_b += 3 -> δ = [3, -1, -1.5], δ_b = 4.
    θ − θ* = [-2, 1, 1], b 2 -> S = max([3/4, -1, -1.5], 0) = [0.75, 0, 0], S_b = 1."""
    model = Tiny()
    reg = PI(model, None, "cpu")
    set_grads(model, [5.0, 5.0, 5.0], 5.0)
    reg.update()
    move(model, weight=(-1.0, 1.0, 0.5), bias=1.0)
    set_grads(model, [2.0, 1.0, 1.0], -1.0)
    reg.update()
    close(reg.delta[W], [[2.0, -1.0, -0.5]])
    move(model, weight=(-1.0, 0.0, 0.5), bias=1.0)
    set_grads(model, [1.0, 3.0, 2.0], -3.0)
    reg.update()
    return model, reg


def test_pi_path_integral_and_score():
    model, reg = pi_step0()
    close(reg.delta[W], [[3.0, -1.0, -1.5]])
    close(reg.delta[B], [4.0])
    score = reg.get()
    close(score[W], [[0.75, 0.0, 0.0]])
    close(score[B], [1.0])
    close(score["frozen"], [0.0, 0.0])
    assert reg.penalty().item() == 0.0


def test_pi_next_step_penalty_and_summed_score():
    model, reg = pi_step0()
    state = round_trip(reg.state_dict())
    new, old = next_step(model)
    pi = PI(new, old, "cpu", score=state["score"], normalize=True)
    close(pi.importance[W], [[0.75 / (0.75 + EPS), 0.0, 0.0]])
    assert pi.penalty().item() == 0.0
    close(pi.starting_new[HEAD], [0.0, 0.0])
    # Step 1: update (snapshot), move w by [1, 1, 0] and head by [0.5, 0.5], update with
    # g_w = [-2, 3, 5], g_b = 1, g_head = [-1, 1]: δ_w = [2, -3, 0], δ_b = 0, δ_head = [0.5, -0.5].
    set_grads(new, [1.0, 1.0, 1.0], 1.0, [1.0, 1.0])
    pi.update()
    move(new, weight=(1.0, 1.0, 0.0), head=(0.5, 0.5))
    set_grads(new, [-2.0, 3.0, 5.0], 1.0, [-1.0, 1.0])
    pi.update()
    assert pi.penalty().item() == pytest.approx(0.75 / (0.75 + EPS), rel=1e-6)  # Ω_w0 * 1²
    score = pi.get()
    close(score[W], [[2.0 + 0.75, 0.0, 0.0]])  # max(2 / 1, 0) + 0.75 (summed over steps)
    close(score[B], [0.0 + 1.0])
    close(score[HEAD], [0.5 / 0.25, 0.0])  # θ* of the new head is its initial value
    restored = PI(new, old, "cpu", score=state["score"], normalize=True)
    restored.load_state_dict(round_trip(pi.state_dict()))
    for key in (W, B, HEAD):
        close(restored.get()[key], score[key])


# ----------------------------------------------------------------------------------------------
# RW
# ----------------------------------------------------------------------------------------------

def rw_step0(iterations=2):
    """iterations = 2. Call 0: snapshot θ0; F_w = 0.9 [1, 0, 4] + 0.1 = [1.0, 0.1, 3.7], F_b = 1.0.
    Step D/2 twice (D = [1, -1, 2]). Call 1: no score; F_w = 0.9 [0, 1, 1] + 0.1 F_w =
    [0.1, 0.91, 1.27]. Call 2 (count 2): s += g2 (θ0 − θ2) / (0.5 F (θ2 − θ0)² + 1e-8) with
    g2 = [-2, 1, 1]: [2 / (0.05 + 1e-8), 1 / (0.455 + 1e-8), -2 / (2.54 + 1e-8)];
    then F_w = 0.9 g2² + 0.1 F_w = [3.61, 0.991, 1.027]. Bias has a gradient only at call 0."""
    model = Tiny()
    reg = RW(model, None, "cpu", iterations=iterations)
    set_grads(model, [1.0, 0.0, 2.0], 1.0)
    reg.update()
    close(reg.fisher[W], [[1.0, 0.1, 3.7]])
    move(model, weight=(0.5, -0.5, 1.0))
    set_grads(model, [0.0, 1.0, 1.0], None)
    reg.update()
    close(reg.score[W], [[0.0, 0.0, 0.0]])
    move(model, weight=(0.5, -0.5, 1.0))
    set_grads(model, [-2.0, 1.0, 1.0], None)
    reg.update()
    return model, reg


RW_S = [2 / (0.05 + EPS), 1 / (0.455 + EPS), -2 / (2.54 + EPS)]


def test_rw_score_fisher_and_schedule():
    model, reg = rw_step0()
    close(reg.score[W], [RW_S])
    close(reg.score[B], [0.0])
    close(reg.fisher[W], [[3.61, 0.991, 1.027]])
    close(reg.fisher[B], [1.0])
    close(reg.get_score()[W], [[RW_S[0], RW_S[1], 0.0]])
    # Call 3 (count 3) only updates the Fisher; call 4 (count 4) samples the path again:
    # θ4 − θ2 = [1, 0, 0], g4 = [-1, 0, 0] -> s_w0 += 1 / (0.5 * F_w0 + 1e-8), F_w0 after call 3.
    set_grads(model, [1.0, 0.0, 0.0], None)
    reg.update()
    close(reg.score[W], [RW_S])
    fisher_after_call3 = 0.9 * 1.0 + 0.1 * 3.61
    move(model, weight=(1.0, 0.0, 0.0))
    set_grads(model, [-1.0, 0.0, 0.0], None)
    reg.update()
    close(reg.score[W], [[RW_S[0] + 1 / (0.5 * fisher_after_call3 + EPS), RW_S[1], RW_S[2]]])


def test_rw_samples_every_call_with_one_iteration():
    model = Tiny()
    reg = RW(model, None, "cpu", iterations=1, alpha=0.5)
    set_grads(model, [1.0, 1.0, 1.0], None)
    reg.update()
    close(reg.fisher[W], [[1.0, 1.0, 1.0]])  # 0.5 * 1 + 0.5 * 1
    move(model, weight=(1.0, 2.0, 0.0))
    set_grads(model, [-1.0, -1.0, 3.0], None)
    reg.update()
    # s = g (θ0 − θ1) / (0.5 F (θ1 − θ0)² + 1e-8) = [1 / 0.5, 2 / 2, 0]
    close(reg.score[W], [[1 / (0.5 + EPS), 2 / (2 + EPS), 0.0]])
    with pytest.raises(ValueError, match="iterations"):
        RW(model, None, "cpu", iterations=0)


def test_rw_next_step_penalty_and_averaged_score():
    model, reg = rw_step0()
    state = round_trip(reg.state_dict())
    assert state["iteration"] == 2
    new, old = next_step(model)
    rw = RW(new, old, "cpu", score=state["score"], fisher=state["fisher"])
    # Ω_w = normalize([3.61, 0.991, 1.027]) + normalize([S0, S1, 0]); Ω_b = normalize(1) + normalize(0) = 0.
    omega = [2.619 / (2.619 + EPS) + RW_S[0] / (RW_S[0] + EPS),
             RW_S[1] / (RW_S[0] + EPS),
             0.036 / (2.619 + EPS)]
    close(rw.importance[W], [omega])
    close(rw.importance[B], [0.0])
    assert rw.penalty().item() == 0.0
    move(new, weight=(1.0, 2.0, 3.0), bias=1.0, head=(1.0, 1.0))
    assert rw.penalty().item() == pytest.approx(omega[0] + 4 * omega[1] + 9 * omega[2], rel=1e-6)
    # No path sample yet in this step: S = 0.5 (0 + S_old).
    close(rw.get_score()[W], [[0.5 * RW_S[0], 0.5 * RW_S[1], 0.0]])
    close(rw.get_score()[HEAD], [0.0, 0.0])


def test_rw_state_round_trip_keeps_the_raw_running_score():
    model, reg = rw_step0()
    new, old = next_step(model)
    rw = RW(new, old, "cpu", score=reg.get_score(), fisher=reg.fisher)
    set_grads(new, [1.0, 1.0, 1.0], None)
    rw.update()
    move(new, weight=(1.0, 0.0, 0.0))
    set_grads(new, [-1.0, 0.0, 0.0], None)
    rw.update()
    rw.update()
    restored = RW(new, old, "cpu", score=reg.get_score(), fisher=reg.fisher)
    restored.load_state_dict(round_trip(rw.state_dict()))
    for key in (W, B):
        close(restored.score[key], rw.score[key])
        close(restored.get_score()[key], rw.get_score()[key])
        close(restored.fisher[key], rw.fisher[key])


# ----------------------------------------------------------------------------------------------
# Common behaviour
# ----------------------------------------------------------------------------------------------

def test_normalize_fn_per_tensor():
    close(normalize_fn(torch.tensor([2.0, 4.0, 3.0])), [0.0, 2 / (2 + EPS), 1 / (2 + EPS)])
    close(normalize_fn(torch.tensor([5.0])), [0.0])


def test_wrapped_models_use_unprefixed_names_and_accept_prefixed_states():
    model, reg = ewc_step0()
    new, old = next_step(model)
    prefixed = {"module." + k: v for k, v in reg.state_dict()["fisher"].items()}
    ewc = EWC(Wrapper(new), Wrapper(old), "cpu", fisher=prefixed)
    assert set(ewc.state_dict()["fisher"]) == {W, B, HEAD}
    move(new, weight=(1.0, 2.0, 3.0))
    assert ewc.penalty().item() == pytest.approx(29 / 7, rel=1e-6)


def test_factory_reads_options_and_state():
    model = Tiny()
    opts = Namespace(regularizer="rw", reg_alpha=0.5, reg_no_normalize=True, reg_iterations=3)
    rw = get_regularizer(model, None, "cpu", opts)
    assert isinstance(rw, RW) and rw.alpha == 0.5 and rw.iterations == 3 and not rw.normalize
    opts.regularizer = "pi"
    assert isinstance(get_regularizer(model, None, "cpu", opts), PI)
    opts.regularizer = None
    assert get_regularizer(model, None, "cpu", opts) is None
    opts.regularizer = "si"
    with pytest.raises(ValueError, match="unknown regularizer"):
        get_regularizer(model, None, "cpu", opts)

    _, ewc_state = ewc_step0()
    new, old = next_step(model)
    opts = Namespace(regularizer="ewc", reg_alpha=0.9, reg_no_normalize=False, reg_iterations=10)
    ewc = get_regularizer(new, old, "cpu", opts, round_trip(ewc_state.state_dict()))
    assert ewc.penalize and ewc.normalize
    opts.regularizer = "rw"
    with pytest.warns(UserWarning, match="'ewc'"), pytest.raises(ValueError, match="'score'"):
        get_regularizer(new, old, "cpu", opts, ewc_state.state_dict())


# ----------------------------------------------------------------------------------------------
# Distributed: rank 0 owns the importance
# ----------------------------------------------------------------------------------------------

def _sync_worker(rank, world, init_file, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Tiny()
        reg = EWC(model, None, "cpu")
        set_grads(model, [2.0, 1.0, 0.0], 3.0)
        reg.update()  # only rank 0 accumulates
        queue.put((rank, reg.fisher[W].tolist()))
    finally:
        dist.destroy_process_group()


def test_only_rank0_accumulates_the_importance(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = os.path.join(tmp_path, "store")
    mp.start_processes(_sync_worker, args=(2, init_file, queue), nprocs=2, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    assert results[0][0] == pytest.approx([3.7, 1.0, 0.1])  # 0.9 * [4, 1, 0] + 0.1
    assert results[1] == [[1.0, 1.0, 1.0]]  # rank 1 did not accumulate (rank 0 saves the checkpoint)
