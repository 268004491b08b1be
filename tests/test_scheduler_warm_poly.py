"""--lr_policy warm_poly: linear warm-up from 0.001 over 10 % of the step, times poly 0.9."""
import argparse

import pytest
import torch

from utils.scheduler import PolyLR, WarmupPolyLR, get_scheduler


def _sgd(*lrs):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def _lrs(scheduler, optimizer, n, group=0):
    """The learning rate of ``group`` before each of ``n`` iterations and after the last."""
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[group]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs + [optimizer.param_groups[group]["lr"]]


def _opts(policy="warm_poly"):
    return argparse.Namespace(lr_policy=policy, lr_power=0.9, lr_decay_step=3, lr_decay_factor=0.1)


def test_warm_poly_values_100_iterations():
    # W = int(0.1 * 100) = 10; lr_k = 0.01 * (0.001 (1 - k/10) + k/10) * (1 - k/100) ** 0.9
    optimizer = _sgd(0.01)
    scheduler = get_scheduler(_opts(), optimizer, max_iters=100)
    assert isinstance(scheduler, WarmupPolyLR) and scheduler.warmup_iters == 10
    lrs = _lrs(scheduler, optimizer, 101)
    assert lrs[0] == pytest.approx(1e-5, rel=1e-9)                # 0.01 * 0.001 * 1
    assert lrs[3] == pytest.approx(0.0029256878554, rel=1e-9)        # 0.01 * 0.3007 * 0.97^0.9
    assert lrs[5] == pytest.approx(0.0047792013, rel=1e-8)        # 0.01 * 0.5005 * 0.95^0.9
    assert lrs[9] == pytest.approx(0.0082685244, rel=1e-8)        # 0.01 * 0.9001 * 0.91^0.9
    # the warm-up ends on the poly curve of the whole step: no restart at k = W
    assert lrs[10] == pytest.approx(0.0090953258, rel=1e-8)       # 0.01 * 0.9^0.9
    assert lrs[50] == pytest.approx(0.0053588673, rel=1e-8)       # 0.01 * 0.5^0.9
    assert lrs[100] == 0.0 and lrs[101] == 0.0


def test_warm_poly_equals_poly_after_the_warmup():
    optimizer, poly_optimizer = _sgd(0.01), _sgd(0.01)
    warm = _lrs(get_scheduler(_opts(), optimizer, max_iters=40), optimizer, 40)
    poly = _lrs(PolyLR(poly_optimizer, max_iters=40), poly_optimizer, 40)
    assert warm[4:] == pytest.approx(poly[4:], rel=1e-12)         # W = 4
    assert all(w < p for w, p in zip(warm[:4], poly[:4]))


def test_warm_poly_rounds_the_warmup_down_and_scales_every_group():
    # 25 iterations: W = int(2.5) = 2; two groups (SSUL's step 0: body 0.001, head 0.01)
    optimizer = _sgd(0.001, 0.01)
    scheduler = get_scheduler(_opts(), optimizer, max_iters=25)
    assert scheduler.warmup_iters == 2
    head = _lrs(scheduler, optimizer, 3, group=1)
    assert head[1] == pytest.approx(0.0048244542, rel=1e-8)       # 0.01 * 0.5005 * 0.96^0.9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * head[3], rel=1e-12)


def test_warm_poly_shorter_than_ten_iterations_is_poly():
    optimizer = _sgd(0.01)
    scheduler = get_scheduler(_opts(), optimizer, max_iters=9)     # W = 0
    lrs = _lrs(scheduler, optimizer, 2)
    assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.01 * (8 / 9) ** 0.9)


def test_warm_poly_state_dict_resumes_mid_warmup():
    optimizer = _sgd(0.01)
    scheduler = get_scheduler(_opts(), optimizer, max_iters=100)
    _lrs(scheduler, optimizer, 4)
    resumed_optimizer = _sgd(0.01)
    resumed = get_scheduler(_opts(), resumed_optimizer, max_iters=100)
    resumed.load_state_dict(scheduler.state_dict())
    resumed_optimizer.step()
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.0047792013, rel=1e-8)


def test_warm_poly_rejects_bad_arguments():
    with pytest.raises(ValueError, match="warmup_iters"):
        WarmupPolyLR(_sgd(0.01), max_iters=10, warmup_iters=11)
    with pytest.raises(ValueError, match="max_iters > 0"):
        WarmupPolyLR(_sgd(0.01), max_iters=0, warmup_iters=0)
    with pytest.raises(ValueError, match="'poly', 'step', 'warm_poly'"):
        get_scheduler(_opts("cosine"), _sgd(0.01), 10)
