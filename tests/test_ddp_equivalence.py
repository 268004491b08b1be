"""One training iteration on 8 images gives the same weights with 1 process x batch 8 and with
2 processes x batch 4 (gloo on the CPU, the model wrapped in DistributedDataParallel as run.py
wraps it).

Why they must agree: the criterion is a mean over the pixels of the local batch; with equal local
batches the global mean is the average of the two local means, and DDP averages the gradients
over the ranks. Layers whose output depends on the other images of the batch must see the whole
batch: SegFormer's LayerNorm is per token (nothing to share); DeepLab's ``--norm_act iabn_sync``
computes the batch statistics over both ranks (``SyncABN``), with gradients flowing back across
ranks through them. The control: a training forward of the same DeepLab with per-rank statistics
(``iabn``) moves the BatchNorm running statistics, which the comparison includes, elsewhere (by
0.5 % to 140 % of their update), so the comparison does detect unsynchronised BatchNorm.

Determinism: both runs start from the same saved weights and images. MiT's stochastic depth
(drop path, rate 0.1 in training) draws one mask entry per image from each process's generator, so
the two layouts cannot draw the same masks; its rate is set to 0 (``DropPath.drop_prob``), which
leaves every other computation of the training forward unchanged; dropout layers (none in these
two models) get probability 0 likewise. DeepLab has no randomness in training.

Precision: models and images are float64. In float32 the two layouts differ only in summation
order, but at this random initialisation some gradients are sums that nearly cancel (the gradient
reaching a layer that a BatchNorm follows sums to ~0 over the batch): the 1 x 8 float32 update
alone is off from the float64 one by up to ~40 % of its size for some weights of ResNet-50's last
blocks (2.5e-3 for MiT's attention weights), which would hide a real difference. In float64 the
two layouts agree to ~1e-11 of the update; the bound asserted is 1e-9.
"""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.layers import DropPath
from torch.nn.parallel import DistributedDataParallel

import argparser
import methods
from segmentation_module import make_model
from train import Trainer

CPU = torch.device("cpu")
SIZE = 64
CLASSES = [16]
GLOBAL_BATCH, WORLD = 8, 2
UPDATE_FLOOR = 1e-8  # see update_error
MODELS = {
    "segformer_b0": ["--model", "segformer_b0"],
    "segformer_mlp": ["--model", "segformer_b0", "--segformer_head", "mlp"],
    "deeplab": ["--model", "deeplab", "--backbone", "resnet50", "--norm_act", "iabn_sync",
                "--output_stride", "16"],
}


def options(model, world_size=1, norm_act=None):
    args = ["--task", "15-5", "--method", "FT", "--no_pretrained", "--crop_size", str(SIZE), *MODELS[model]]
    if norm_act is not None:
        args += ["--norm_act", norm_act]
    opts = argparser.parse_options(args)
    opts.lr = 0.01  # run.py sets the step's rate
    opts.world_size = world_size  # run.py sets it; make_model reads it (iabn_sync -> SyncABN when > 1)
    return opts


def build_model(opts):
    model = make_model(opts, CLASSES)
    for module in model.modules():
        if isinstance(module, DropPath):
            module.drop_prob = 0.0  # see the module docstring
        elif isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return model.double().train()


def one_iteration(model, opts, images, labels):
    """One ``Trainer.train_iteration`` with run.py's optimiser (DDP-wrapped when a group exists);
    returns the loss terms."""
    trainer_model = model
    if dist.is_initialized():
        recipe = methods.build_recipe(opts, 0, CLASSES)
        trainer_model = DistributedDataParallel(model, device_ids=None,
                                                find_unused_parameters=recipe.find_unused_parameters)
    optim = torch.optim.SGD(methods.param_groups(model, opts, 0), lr=opts.lr, momentum=opts.momentum,
                            nesterov=True, weight_decay=opts.weight_decay)
    trainer = Trainer(trainer_model, None, CPU, opts, classes=CLASSES, step=0)
    try:
        return trainer.train_iteration((images, labels), optim)
    finally:
        trainer.close()


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ workers
def _worker(rank, workdir, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=WORLD)
    try:
        data = torch.load(Path(workdir) / "data.pt", weights_only=True)
        local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        images, labels = data["images"][local], data["labels"][local]
        opts = options(data["model"], world_size=WORLD)
        model = build_model(opts)
        model.load_state_dict(data["initial"])
        losses = one_iteration(model, opts, images, labels)
        after = state(model)
        result = {"losses": losses, "checksums": {k: float(v.double().sum()) for k, v in after.items()},
                  "sync_layers": sum(type(m).__name__ == "SyncABN" for m in model.modules())}
        if rank == 0:
            result["state"] = after
        if data["control_norm_act"] and rank == 0:
            result["control"] = local_statistics(data, images)
        torch.save(result, Path(workdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def local_statistics(data, images):
    """The BatchNorm running statistics after a training forward of this rank's images with
    per-rank statistics (``--norm_act {control}``)."""
    model = build_model(options(data["model"], world_size=WORLD, norm_act=data["control_norm_act"]))
    model.load_state_dict(data["initial"])
    with torch.no_grad():
        model(images)
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_ranks(tmp_path, model, initial, images, labels, control_norm_act=None):
    torch.save({"model": model, "initial": initial, "images": images, "labels": labels,
                "control_norm_act": control_norm_act}, tmp_path / "data.pt")
    mp.spawn(_worker, args=(str(tmp_path), free_port()), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


# ------------------------------------------------------------------------------------ data
def batch():
    """8 images with background, two objects per image (classes 1..15) and an ignored strip."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    labels = torch.zeros(GLOBAL_BATCH, SIZE, SIZE, dtype=torch.long)
    for i in range(GLOBAL_BATCH):
        labels[i, 4 + 2 * i:30 + 2 * i, 8:40] = 1 + i
        labels[i, 36:60, 20 + i:50] = 8 + i
    labels[:, :, -4:] = 255
    return images, labels


def update_error(after, reference, initial):
    """max over tensors of |θ − θ_ref|_max / max(|θ_ref − θ_0|_max, 1e-8) for the floating tensors
    that the reference iteration changed (weights and BN running statistics). The floor: a
    parameter whose exact gradient is 0 (e.g. a bias that a BatchNorm cancels) moves by float64
    rounding noise only, which no layout can reproduce."""
    errors = {}
    for k, ref in reference.items():
        if not ref.is_floating_point() or torch.equal(ref, initial[k]):
            continue
        errors[k] = float((after[k] - ref).abs().max() / (ref - initial[k]).abs().max().clamp_min(UPDATE_FLOOR))
    return errors


def reference_run(model_name):
    opts = options(model_name)
    torch.manual_seed(0)
    model = build_model(opts)
    initial = state(model)
    images, labels = batch()
    losses = one_iteration(model, opts, images, labels)
    return initial, images, labels, losses, state(model)


def check_equivalent(ranks, initial, reference, reference_losses):
    assert ranks[0]["checksums"] == ranks[1]["checksums"]  # DDP kept the ranks identical
    errors = update_error(ranks[0]["state"], reference, initial)
    assert len(errors) > 0.9 * sum(v.is_floating_point() for v in reference.values())  # the step moved them
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-9, f"{worst}: update differs by {errors[worst]:.2e} of its size"
    # the logged loss is the mean over the ranks' means: the 1 x 8 loss
    mean_ce = sum(r["losses"]["ce"] for r in ranks) / WORLD
    assert mean_ce == pytest.approx(reference_losses["ce"], rel=1e-6)


# ------------------------------------------------------------------------------------ tests
def test_segformer_one_iteration_1x8_equals_2x4(tmp_path):
    initial, images, labels, losses, reference = reference_run("segformer_b0")
    ranks = two_ranks(tmp_path, "segformer_b0", initial, images, labels)
    check_equivalent(ranks, initial, reference, losses)


def test_deeplab_iabn_sync_one_iteration_1x8_equals_2x4_and_local_statistics_do_not(tmp_path):
    initial, images, labels, losses, reference = reference_run("deeplab")
    ranks = two_ranks(tmp_path, "deeplab", initial, images, labels, control_norm_act="iabn")
    assert ranks[0]["sync_layers"] == 53 + 3  # every BN of the ResNet-50 body and of the ASPP head
    check_equivalent(ranks, initial, reference, losses)
    # control: per-rank statistics (what an unsynchronised BN computes) move the running statistics
    # elsewhere, by far more than the tolerance above
    control = ranks[0]["control"]
    errors = update_error({**ranks[0]["state"], **control}, reference, initial)
    assert min(errors[k] for k in control) > 1e-3 and max(errors[k] for k in control) > 0.1


def test_segformer_mlp_head_one_iteration_1x8_equals_2x4(tmp_path):
    initial, images, labels, losses, reference = reference_run("segformer_mlp")
    assert any(k.endswith("running_var") for k in initial)  # the head's BatchNorm, synchronised over gloo
    ranks = two_ranks(tmp_path, "segformer_mlp", initial, images, labels)
    check_equivalent(ranks, initial, reference, losses)
