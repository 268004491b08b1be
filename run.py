"""Command-line entry: train and test the steps of a continual segmentation task.

    python run.py --data_root DIR --task 15-5 --step 0 1 --method MiB ...
    torchrun --nproc_per_node=N run.py ...          (or python -m torch.distributed.launch)

For each requested step: seed, build the data, the model and (step > 0) the frozen model of the
previous step, train, save the step's checkpoint atomically, reload it, test on every class seen so
far, append the results row and print the base / new / all mIoU table.
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: with DataLoader workers (or anything else) on the
# same cores, spinning threads made a training step up to 30x slower on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import random
import sys
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

import argparser
import dataset as datasets
import tasks
from metrics import StreamSegMetrics, summarize_step
from segmentation_module import make_model
from train import Trainer, amp_settings, build_recipe
from utils import distributed as dist_utils
from utils.checkpoint import checkpoint_path, load_checkpoint, options_to_dict, save_atomic, strip_prefix
from utils.logger import Logger, confusion_matrix_figure
from utils.results import append_results_row, write_run_info
from utils.scheduler import get_scheduler


# --------------------------------------------------------------------------------------------
# seeding
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def epoch_seed(opts, step: int, epoch: int) -> int:
    """Each epoch starts from a seed of its own, so a resumed run replays the same batches."""
    return opts.random_seed + 1_000_003 * step + 7919 * (epoch + 1)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
class ShardSampler(Sampler):
    """Rank r evaluates images r, r+W, r+2W, ...: no padding, so no image is counted twice."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_loaders(opts, step, rank, world):
    step_opts = deepcopy(opts)
    step_opts.step = step
    train_dst, val_dst, test_dst, n_classes = datasets.get_dataset(step_opts)
    random.seed(opts.random_seed)  # as the originals: dataset building must not shift the RNG
    if len(train_dst) < opts.batch_size * world and not opts.test:
        raise ValueError(
            f"step {step} has {len(train_dst)} training images, fewer than one global batch "
            f"({opts.batch_size} x {world} processes); lower --batch_size")
    train_loader = DataLoader(
        train_dst, batch_size=opts.batch_size,
        sampler=DistributedSampler(train_dst, num_replicas=world, rank=rank, seed=opts.random_seed),
        num_workers=opts.num_workers, drop_last=True, pin_memory=torch.cuda.is_available(),
        persistent_workers=False)
    eval_batch = opts.batch_size if opts.crop_val else 1
    val_loader = DataLoader(val_dst, batch_size=eval_batch,
                            sampler=ShardSampler(len(val_dst), rank, world), num_workers=opts.num_workers)
    test_loader = DataLoader(test_dst, batch_size=eval_batch,
                             sampler=ShardSampler(len(test_dst), rank, world), num_workers=opts.num_workers)
    return train_loader, val_loader, test_loader, train_dst, val_dst, test_dst, n_classes


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def previous_checkpoint_path(opts, step: int) -> str:
    return opts.step_ckpt if opts.step_ckpt else checkpoint_path(opts, step - 1)


def load_previous_step(opts, step, model, model_old, logger):
    """Load step-1 weights into the new model (all but the newest classifier) and the old model."""
    path = previous_checkpoint_path(opts, step)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"step {step} needs the checkpoint of step {step - 1}, expected at {path}. Train step "
            f"{step - 1} first (same --name, --task, --dataset, --checkpoint), or pass its file with "
            f"--step_ckpt PATH.")
    ckpt = load_checkpoint(path)
    state = strip_prefix(ckpt["model_state"] if "model_state" in ckpt else ckpt)
    _check_checkpoint_matches(ckpt, opts, tasks.get_per_task_classes(opts.dataset, opts.task, step - 1), path)
    model_old.load_state_dict(state, strict=opts.strict_weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    newest = f"cls.{len(model.cls) - 1}."
    wrong = [k for k in missing if not k.startswith(newest)] + list(unexpected)
    if wrong and opts.strict_weights:  # --no_strict_weights: load what fits, as SATS did
        raise RuntimeError(f"checkpoint {path} does not fit the step-{step} model: {wrong[:8]}")
    logger.info(f"Loaded step {step - 1} weights from {path}")
    return ckpt


def _check_checkpoint_matches(ckpt, opts, expected_classes, path):
    saved = ckpt.get("classes")
    if saved is not None and list(saved) != list(expected_classes):
        raise ValueError(
            f"checkpoint {path} was trained with classes {list(saved)} per step, but task "
            f"{opts.task} on {opts.dataset} expects {list(expected_classes)} here (another task or "
            f"dataset?)")


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def init_new_classifier(model, recipe_init, logger):
    if recipe_init == "balanced":
        model.init_new_classifier()
        logger.info("New classifier initialised from the background (MiB balanced init)")
    elif recipe_init == "unknown":
        model.init_unknown_classifier()
        logger.info("New classifier initialised from the unknown class (SSUL)")


def param_groups(model, opts, step):
    """SGD groups: body (skipped with --freeze), head and classifiers (x --lr_head, old ones x --lr_old)."""
    if opts.ssul and step > 0:
        from utils.ssul import ssul_trainable_parameters
        return ssul_trainable_parameters(model, opts.lr)
    groups = []

    def add(params, lr_scale):
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": opts.lr * lr_scale, "weight_decay": opts.weight_decay})

    if not (opts.freeze and step > 0):  # --freeze keeps the step-0 body (SSUL trains it at step 0)
        add(model.body.parameters(), 1.0)
    add(model.head.parameters(), opts.lr_head)
    if opts.lr_old is not None and step > 0:
        add([p for c in model.cls[:-1] for p in c.parameters()], opts.lr_head * opts.lr_old)
        add(model.cls[-1].parameters(), opts.lr_head)
    else:
        add(model.cls.parameters(), opts.lr_head)
    if getattr(model, "scalar", None) is not None:
        add([model.scalar], opts.lr_head)
    return groups


# --------------------------------------------------------------------------------------------
# one step
# --------------------------------------------------------------------------------------------
def run_step(opts, step, lr, device, rank, world):
    opts = deepcopy(opts)
    opts.step, opts.lr = step, lr
    logdir = os.path.join(opts.logdir, f"{opts.task}-{opts.dataset}", opts.name)
    logger = Logger(logdir, rank=rank, debug=opts.debug, summary=opts.visualize, step=step)
    try:
        return _run_step(opts, step, device, rank, world, logger)
    finally:
        logger.close()  # also on errors and --stop_after_epochs: no lost events, no open files


def _run_step(opts, step, device, rank, world, logger):
    for message in getattr(opts, "preset_overrides", []) + getattr(opts, "option_warnings", []):
        logger.info(message)
    seed_everything(opts.random_seed)

    train_loader, val_loader, test_loader, train_dst, val_dst, test_dst, n_classes = \
        build_loaders(opts, step, rank, world)
    logger.info(f"step {step}: {len(train_dst)} train / {len(val_dst)} val / {len(test_dst)} test "
                f"images; global batch {opts.batch_size * world} ({world} x {opts.batch_size})")

    classes = tasks.get_per_task_classes(opts.dataset, opts.task, step)
    model = make_model(opts, classes).to(device)
    ckpt_file = checkpoint_path(opts, step)
    if not opts.test:
        model_old, trainer_state = None, None
        if step > 0:
            old_opts = deepcopy(opts)
            old_opts.no_pretrained = True  # its weights come from the previous step's checkpoint
            model_old = make_model(old_opts, tasks.get_per_task_classes(opts.dataset, opts.task, step - 1))
            model_old.to(device)
            trainer_state = load_previous_step(opts, step, model, model_old, logger).get("trainer_state")
            freeze(model_old)
        ckpt_file = train_step(opts, step, model, model_old, trainer_state, classes, device, rank, world,
                               logger, train_loader, val_loader, train_dst, n_classes)

    # Test the saved file itself: what is carried to the next step is exactly what is scored.
    test_file = opts.ckpt if opts.test and opts.ckpt else ckpt_file
    if not os.path.isfile(test_file):
        raise FileNotFoundError(f"--test needs a checkpoint: {test_file} does not exist (pass --ckpt PATH)")
    ckpt = load_checkpoint(test_file)
    _check_checkpoint_matches(ckpt, opts, classes, test_file)
    model.load_state_dict(strip_prefix(ckpt["model_state"] if "model_state" in ckpt else ckpt), strict=True)
    model.to(device)
    tester = Trainer(model, None, device, opts, classes=classes, step=step, logger=logger)
    _, score = tester.validate(test_loader, StreamSegMetrics(n_classes), end_task=True)
    report_test(opts, step, score, n_classes, logger, world)
    return score


def train_step(opts, step, model, model_old, trainer_state, classes, device, rank, world, logger,
               train_loader, val_loader, train_dst, n_classes):
    recipe = build_recipe(opts, step)
    if step > 0:
        init_new_classifier(model, recipe.init, logger)
    if opts.fix_bn or (opts.bn_freeze and step > 0):  # SSUL freezes BN from step 1 on
        model.fix_bn()  # sticky: the model's train() keeps BN in eval

    optimizer = torch.optim.SGD(param_groups(model, opts, step), lr=opts.lr, momentum=opts.momentum,
                                nesterov=True, weight_decay=opts.weight_decay)
    scheduler = get_scheduler(opts, optimizer, max_iters=opts.epochs * len(train_loader))
    _, use_scaler = amp_settings(opts.opt_level, device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=opts.ssul)
    trainer = Trainer(model, model_old, device, opts, trainer_state=trainer_state, classes=classes,
                      step=step, logger=logger, scaler=scaler,
                      threshold_cache_dir=os.path.join(opts.checkpoint, "thresholds"))

    begin_epoch, best_score = 0, 0.0
    if opts.ckpt is not None:
        begin_epoch, best_score = resume(opts, opts.ckpt, model, optimizer, scheduler, scaler, trainer,
                                         classes, logger)

    exemplar_loader = build_memory_loader(opts, step, model_old, train_dst, device, rank, world, logger)
    trainer.before(train_loader, logger)
    ckpt_file = checkpoint_path(opts, step)
    unwrapped = getattr(model, "module", model)
    for epoch in range(begin_epoch, opts.epochs):
        seed_everything(epoch_seed(opts, step, epoch))
        t0 = time.time()
        losses = trainer.train(epoch, optimizer, train_loader, scheduler, logger, exemplar_loader)
        logger.info(f"epoch {epoch + 1}/{opts.epochs}: " +
                    ", ".join(f"{k} {v:.4f}" for k, v in losses.items()) + f" ({time.time() - t0:.1f}s)")
        for k, v in losses.items():
            logger.add_scalar(f"Epoch/{k}", v, epoch)
        last = epoch + 1 == opts.epochs
        if (epoch + 1) % opts.val_interval == 0 or last:
            metrics = StreamSegMetrics(n_classes)
            val_losses, score = trainer.validate(val_loader, metrics, logger)
            best_score = max(best_score, score["Mean IoU"])
            logger.info(f"validation: mIoU {score['Mean IoU']:.4f}, overall acc {score['Overall Acc']:.4f}")
            logger.add_scalar("Val/MeanIoU", score["Mean IoU"], epoch)
            logger.add_scalar("Val/Overall_Acc", score["Overall Acc"], epoch)
            for k, v in val_losses.items():
                logger.add_scalar(f"Val/{k}", v, epoch)
            log_samples(opts, logger, unwrapped, model_old, val_loader.dataset, trainer, device, epoch)
            save_checkpoint(ckpt_file, opts, step, epoch, unwrapped, optimizer, scheduler, scaler, trainer,
                            best_score, classes, rank)
        if opts.stop_after_epochs and epoch + 1 - begin_epoch >= opts.stop_after_epochs and not last:
            dist_utils.barrier()
            logger.info(f"--stop_after_epochs {opts.stop_after_epochs}: stopping; resume with --ckpt {ckpt_file}")
            sys.exit(0)
    if begin_epoch >= opts.epochs and not os.path.isfile(ckpt_file) and rank == 0:
        save_checkpoint(ckpt_file, opts, step, opts.epochs - 1, unwrapped, optimizer, scheduler, scaler,
                        trainer, best_score, classes, rank)
    dist_utils.barrier()  # the other ranks read the file rank 0 just wrote
    return ckpt_file


def log_samples(opts, logger, model, model_old, val_dst, trainer, device, epoch):
    """--sample_num prediction triplets; with SATS, the class-pooled attention maps (old | new)."""
    if not dist_utils.is_main_process() or not opts.visualize:
        return
    from utils import tensorboard_samples as tb

    indices = tb.sample_indices(len(val_dst), opts.sample_num, opts.random_seed)
    for idx, row in zip(indices, tb.prediction_triplets(model, val_dst, indices, device, trainer.predict)):
        logger.add_image(f"Samples/{idx}", row, epoch, dataformats="HWC")
    if model_old is not None and opts.distill_segformer and opts.distill_object != "sats-feature-CNN":
        with torch.no_grad():
            for tag, panel in tb.pooled_attention_panels(model.eval(), model_old, val_dst, indices[:2] or [0],
                                                         device, opts.sats_legacy_reshape):
                logger.add_image(f"SATS_attention/{tag}", panel[None], epoch, dataformats="CHW")
        model.train()


def save_checkpoint(path, opts, step, epoch, model, optimizer, scheduler, scaler, trainer, best_score,
                    classes, rank):
    if rank != 0:
        return
    state = {
        "epoch": epoch,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "scaler_state": scaler.state_dict() if scaler is not None else None,
        "best_score": float(best_score),
        "trainer_state": trainer.state_dict(),
        "classes": list(classes),
        "step": step,
        "task": opts.task,
        "dataset": opts.dataset,
        "opts": options_to_dict(opts),
    }
    save_atomic(state, path)


def resume(opts, path, model, optimizer, scheduler, scaler, trainer, classes, logger):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ckpt {path} does not exist")
    ckpt = load_checkpoint(path)
    _check_checkpoint_matches(ckpt, opts, classes, path)
    getattr(model, "module", model).load_state_dict(strip_prefix(ckpt["model_state"]), strict=True)
    if "optimizer_state" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer_state"])
    if "scheduler_state" in ckpt:
        scheduler.load_state_dict(ckpt["scheduler_state"])
    if scaler is not None and ckpt.get("scaler_state"):
        scaler.load_state_dict(ckpt["scaler_state"])
    if ckpt.get("trainer_state"):
        trainer.load_state_dict(ckpt["trainer_state"])
    begin = int(ckpt.get("epoch", -1)) + 1
    logger.info(f"Resuming from {path} at epoch {begin + 1}")
    return begin, float(ckpt.get("best_score", 0.0))


def memory_path(opts, step: int) -> str:
    return checkpoint_path(opts, step)[: -len(".pth")] + "_memory.json"


def build_memory_loader(opts, step, model_old, train_dst, device, rank, world, logger):
    """The class-balanced exemplar memory (SSUL-M; any method with --mem_size), chosen once per
    step with the previous model and saved beside the checkpoint (reused on resume)."""
    if not opts.mem_size or step == 0:
        return None
    from dataset import memory as mem

    path = memory_path(opts, step)
    if os.path.isfile(path):
        entries = mem.load_memory(path)
        logger.info(f"Exemplar memory of step {step} read from {path}")
    else:
        entries = choose_memory(opts, step, model_old, device, logger)
        if rank == 0:
            mem.save_memory(path, entries, meta={"task": opts.task, "dataset": opts.dataset, "step": step,
                                                 "mem_size": opts.mem_size, "seed": opts.random_seed})
    dist_utils.barrier()
    counts = {}
    for entry in entries:
        for c in entry.classes:
            counts[c] = counts.get(c, 0) + 1
    logger.info(f"Exemplar memory: {len(entries)} images; images per class {dict(sorted(counts.items()))}")
    memory_dst = mem.MemoryDataset(memory_base_dataset(opts, step, entries), min_len=opts.batch_size)
    return DataLoader(memory_dst, batch_size=opts.batch_size,
                      sampler=DistributedSampler(memory_dst, num_replicas=world, rank=rank,
                                                 seed=opts.random_seed),
                      num_workers=opts.num_workers, drop_last=True)


def choose_memory(opts, step, model_old, device, logger):
    """SSUL's selection: candidates are step-1's training images (centre crops); their classes come
    from the ground truth at step 1 and from the old model's pseudo-labels later."""
    from dataset import memory as mem

    prev_opts = deepcopy(opts)
    prev_opts.step = step - 1
    candidates = _unwrap_subset(datasets.get_dataset(prev_opts)[0])
    candidates.transform = datasets.transform.val_transform(opts.crop_size, True)
    previous = None
    if step > 1 and os.path.isfile(memory_path(opts, step - 1)):
        previous = mem.load_memory(memory_path(opts, step - 1))
    nb_old = sum(tasks.get_per_task_classes(opts.dataset, opts.task, step - 1))
    pseudo_fn = mem.ssul_memory_pseudo_labels if opts.ssul else mem.softmax_memory_pseudo_labels
    logger.info(f"Choosing {opts.mem_size} exemplars among {len(candidates)} images of step {step - 1}")
    return mem.build_memory(model_old, candidates, step, opts.mem_size, opts.random_seed, device, nb_old,
                            previous_memory=previous, pseudo_fn=pseudo_fn, batch_size=opts.batch_size)


def memory_base_dataset(opts, step, entries):
    """The memory images with this step's training treatment, old classes' ground truth kept."""
    mem_opts = deepcopy(opts)
    mem_opts.step = step
    mem_opts.data_masking = "current+old"
    mem_opts.cross_val = False
    base = datasets.get_dataset(mem_opts)[0]
    position = {path: i for i, path in enumerate(base.files.images)}
    missing = [e.name for e in entries if e.name not in position]
    if missing:
        raise FileNotFoundError(f"exemplar memory lists images that are not in the training split: {missing[:3]}")
    base.indices = np.array([position[e.name] for e in entries], dtype=np.int64)
    return base


def _unwrap_subset(dst):
    return dst.dataset if isinstance(dst, torch.utils.data.Subset) else dst


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def report_test(opts, step, score, n_classes, logger, world):
    n_base = tasks.get_per_task_classes(opts.dataset, opts.task, 0)[0]
    summary = summarize_step(score["Class IoU"], n_base, n_classes)
    logger.to_file(StreamSegMetrics.to_str(score))
    logger.add_scalar("Test/MeanIoU", score["Mean IoU"], step)
    logger.add_scalar("Test/Overall_Acc", score["Overall Acc"], step)
    logger.add_figure("Test/Confusion_Matrix", confusion_matrix_figure(score["Confusion Matrix"]), step)
    if not dist_utils.is_main_process():
        return
    csv_path = os.path.join("results", f"{opts.date}_{opts.dataset}_{opts.task}_{opts.name}.csv")
    append_results_row(csv_path, step, score["Class IoU"], opts.num_classes, n_classes, score["Mean IoU"])
    write_run_info(csv_path[:-4] + ".json", {
        "options": options_to_dict(opts), "seed": opts.random_seed, "world_size": world,
        "batch_size_per_process": opts.batch_size, "global_batch_size": opts.batch_size * world,
    }, step=step)
    print_summary(opts, step, summary, n_base, n_classes)
    print(f"Results appended to {csv_path}; TensorBoard logs in "
          f"{os.path.join(opts.logdir, f'{opts.task}-{opts.dataset}', opts.name)}")


def print_summary(opts, step, summary, n_base, n_seen):
    head_new = f"{n_base}-{n_seen - 1}" if n_seen > n_base else "new"
    rows = [("step", f"0-{n_base - 1}", head_new, "all"),
            (str(step),) + tuple("-" if np.isnan(summary[k]) else f"{100 * summary[k]:.2f}"
                                 for k in ("base", "new", "all"))]
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"\n{opts.method or 'FT'} on {opts.dataset} {opts.task}, test mIoU (%)")
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, width)))


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def main(argv=None):
    opts = argparser.parse_options(argv)
    device, rank, world = dist_utils.init_distributed(opts)
    opts.world_size = world
    if opts.batch_size < 1:
        raise ValueError("--batch_size must be at least 1 (it is per process)")
    steps = list(opts.step)
    lrs = list(opts.lr) * len(steps) if len(opts.lr) == 1 else list(opts.lr)
    Path(opts.checkpoint).mkdir(parents=True, exist_ok=True)
    scores = []
    try:
        for i, (step, lr) in enumerate(zip(steps, lrs)):
            step_opts = deepcopy(opts)
            if i > 0:
                step_opts.step_ckpt = None  # later steps chain on the checkpoints just written
                step_opts.ckpt = None
            scores.append(run_step(step_opts, step, lr, device, rank, world))
    finally:
        dist_utils.cleanup()
    return scores


if __name__ == "__main__":
    main()
