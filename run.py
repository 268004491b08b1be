"""Command-line entry: train and test the steps of a continual segmentation task.

    python run.py --data_root DIR --task 15-5 --step 0 1 --method MiB+EWF ...
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
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler
from torch.utils.data.distributed import DistributedSampler

import argparser
import dataset as datasets
import tasks
from dataset import SkipAwareLoader, report_skips
import methods
from methods.memory import build_memory_loader
from metrics import StreamSegMetrics, summarize_step
from segmentation_module import make_model
from train import Trainer, amp_settings
from utils import distributed as dist_utils
from utils.distributed import unwrap
from utils.errors import UserError, run_cli
from utils.io import check_writable, remove_orphan_temp_files
from utils.regularizer import check_finite_state
from utils.checkpoint import checkpoint_path, load_checkpoint, options_to_dict, save_atomic, strip_prefix
from utils.logger import Logger
from utils.visualize import confusion_matrix_figure, task_class_names
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
    limit = opts.max_skipped_samples  # unreadable files are left out and counted, never replaced
    train_loader = SkipAwareLoader(
        train_dst, batch_size=opts.batch_size,
        sampler=DistributedSampler(train_dst, num_replicas=world, rank=rank, seed=opts.random_seed),
        num_workers=opts.num_workers, drop_last=True, pin_memory=torch.cuda.is_available(),
        persistent_workers=False, max_skipped=limit)
    eval_batch = opts.batch_size if opts.crop_val else 1
    val_loader = SkipAwareLoader(val_dst, batch_size=eval_batch, sampler=ShardSampler(len(val_dst), rank, world),
                                 num_workers=opts.num_workers, max_skipped=limit)
    test_loader = SkipAwareLoader(test_dst, batch_size=eval_batch, sampler=ShardSampler(len(test_dst), rank, world),
                                  num_workers=opts.num_workers, max_skipped=limit)
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
    check_checkpoint_identity(ckpt, opts, step - 1, path, logger)
    _load_weights(model_old, state, path, opts, strict=opts.strict_weights)
    missing, unexpected = _load_weights(model, state, path, opts, strict=False)
    newest = f"cls.{len(model.cls) - 1}."
    wrong = [k for k in missing if not k.startswith(newest)] + list(unexpected)
    if wrong and opts.strict_weights:  # --no_strict_weights: load what fits, as SATS did
        raise UserError(f"checkpoint {path} does not fit the step-{step} model ({len(wrong)} tensors differ, "
                        f"first {wrong[:4]}); is it a step {step - 1} checkpoint of this --model?")
    regularizer_state = (ckpt.get("trainer_state") or {}).get("regularizer")
    if regularizer_state is not None:
        check_finite_state(regularizer_state, path, step=step - 1)
    logger.info(f"Loaded step {step - 1} weights from {path}")
    return ckpt


def _load_weights(model, state, path, opts, strict):
    """``model.load_state_dict`` with a one-line error for tensors of another shape."""
    own = model.state_dict()
    mis_shaped = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if mis_shaped:
        first = mis_shaped[0]
        raise UserError(f"checkpoint {path} does not fit --model {opts.model}: {len(mis_shaped)} tensors have "
                        f"another shape (first {first}: {tuple(state[first].shape)} in the file, "
                        f"{tuple(own[first].shape)} here); pass the --model (and --backbone) it was trained with")
    return model.load_state_dict(state, strict=strict)


def checkpoint_identity(opts, step: int) -> dict:
    """What a checkpoint of ``step`` records about its run: dataset, task, the labels of every
    step up to ``step`` (the class order) and the model."""
    labels = [list(tasks.get_task_labels(opts.dataset, opts.task, s)) for s in range(step + 1)]
    model = opts.model if opts.model != "deeplab" else f"deeplab-{opts.backbone}"
    tags = [tag for c in methods.components() if (tag := c.model_tag(opts))]
    return {"dataset": opts.dataset, "task": opts.task, "labels": labels, "model": "+".join([model] + tags)}


def check_checkpoint_identity(ckpt, opts, step, path, logger=None):
    """Refuse a checkpoint of another dataset, class order or model (``--allow_checkpoint_mismatch``
    logs the difference instead). Files without a record (the originals') are accepted with a note."""
    expected_classes = tasks.get_per_task_classes(opts.dataset, opts.task, step)
    saved = ckpt.get("classes")
    if saved is not None and list(saved) != list(expected_classes):
        raise UserError(
            f"checkpoint {path} was trained with classes {list(saved)} per step, but task "
            f"{opts.task} on {opts.dataset} expects {list(expected_classes)} here (another task or "
            f"dataset?)")
    recorded = ckpt.get("identity")
    if recorded is None:
        if logger is not None:
            logger.info(f"{path} records no dataset/task/class order (a file of the original code?): "
                        f"only its class counts were checked")
        return
    expected = checkpoint_identity(opts, step)
    differences = [f"{key}: {recorded.get(key)!r} in the file, {expected[key]!r} here"
                   for key in ("dataset", "labels", "model") if recorded.get(key) != expected[key]]
    if not differences:
        return
    message = (f"checkpoint {path} (task {recorded.get('task')}) is not a step-{step} checkpoint of this run "
               f"(task {opts.task}): " + "; ".join(differences))
    if not opts.allow_checkpoint_mismatch:
        raise UserError(message + ". Pass the right file, or --allow_checkpoint_mismatch if you mean it")
    if logger is not None:
        logger.info("--allow_checkpoint_mismatch: " + message)


def check_output_folders(opts) -> None:
    """Before anything is trained: the folders a run writes to can be written (nothing is created)."""
    for folder, option in ((opts.checkpoint, "--checkpoint"), ("results", "the results folder (./results)"),
                           (opts.logdir, "--logdir")):
        check_writable(folder, option, create=False)  # nothing is created before the checks pass


def remove_debris(opts, min_age_s: float = 60.0) -> None:
    """Remove the temporary files of atomic writes that a killed run left in the folders runs
    write to (only the project's temp-name pattern; files younger than ``min_age_s`` may belong to
    a run writing right now)."""
    for folder in (opts.checkpoint, os.path.join(opts.checkpoint, "thresholds"), "results"):
        remove_orphan_temp_files(folder, min_age_s=min_age_s)


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# one step
# --------------------------------------------------------------------------------------------
def run_step(opts, step, lr, device, rank, world):
    opts = deepcopy(opts)
    opts.step, opts.lr = step, lr
    logdir = os.path.join(opts.logdir, f"{opts.task}-{opts.dataset}", opts.name)
    # deferred: the log folder and the TensorBoard run appear once the checks have passed
    logger = Logger(logdir, rank=rank, debug=opts.debug, summary=opts.visualize, step=step, deferred=True,
                    world_size=world)
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
        resumed_ckpt = read_resume_checkpoint(opts, logger) if opts.ckpt is not None else None
        logger.start()
        ckpt_file = train_step(opts, step, model, model_old, trainer_state, classes, device, rank, world,
                               logger, train_loader, val_loader, train_dst, n_classes, resumed_ckpt)

    # Test the saved file itself: what is carried to the next step is exactly what is scored.
    test_file = opts.ckpt if opts.test and opts.ckpt else ckpt_file
    if not os.path.isfile(test_file):
        raise FileNotFoundError(f"--test needs a checkpoint: {test_file} does not exist (pass --ckpt PATH)")
    ckpt = load_checkpoint(test_file)
    check_checkpoint_identity(ckpt, opts, step, test_file, logger)
    _load_weights(model, strip_prefix(ckpt["model_state"] if "model_state" in ckpt else ckpt), test_file, opts,
                  strict=True)
    logger.start()
    model.to(device)
    tester = Trainer(model, None, device, opts, classes=classes, step=step, logger=logger)
    _, score = tester.validate(test_loader, StreamSegMetrics(n_classes), end_task=True)
    skipped = gathered_skips({"train": train_loader, "val": val_loader, "test": test_loader})
    report = report_skips(skipped, logger, step=step)
    report_test(opts, step, score, n_classes, logger, world, skipped, report)
    return score


def gathered_skips(loaders) -> dict:
    """``{split: SkipCounter}`` over every rank (collective), each checked against its limit."""
    counters = {split: loader.skips.gathered() for split, loader in loaders.items()}
    for counter in counters.values():
        counter.check()
    return counters


@dataclass
class StepRun:
    """What a method's step hooks may read and change (``methods.Component.setup_model`` etc.)."""

    opts: object
    step: int
    device: torch.device
    rank: int
    world: int
    logger: object
    classes: list
    model: object = None  # the unwrapped model being trained
    model_old: object = None
    trainer: object = None
    train_loader: object = None
    previous_checkpoint: str = None  # the file the previous step's weights were read from
    checkpoint: str = None  # this step's checkpoint file
    resumed: bool = False
    resumed_state: dict = None  # {component name: state} of the checkpoint resumed with --ckpt
    recipe: object = None


def train_step(opts, step, model, model_old, trainer_state, classes, device, rank, world, logger,
               train_loader, val_loader, train_dst, n_classes, resumed_ckpt=None):
    os.makedirs(opts.checkpoint, exist_ok=True)
    run = StepRun(opts, step, device, rank, world, logger, list(classes), model=model, model_old=model_old,
                  train_loader=train_loader, checkpoint=checkpoint_path(opts, step),
                  previous_checkpoint=previous_checkpoint_path(opts, step) if step > 0 else None)
    recipe = methods.build_recipe(opts, step, classes)
    run.recipe = recipe
    if resumed_ckpt is not None:  # hooks may need to know what was done already
        run.resumed_state = dict(resumed_ckpt.get("methods") or {})
    if step > 0 and recipe.init_classifier is not None:
        recipe.init_classifier(model, logger)
    if opts.fix_bn:
        model.fix_bn()  # sticky: the model's train() keeps BN in eval
    for component in recipe.components:
        component.setup_model(run, model, methods.step_info(opts, step, classes))

    optimizer = torch.optim.SGD(methods.param_groups(model, opts, step), lr=opts.lr, momentum=opts.momentum,
                                nesterov=True, weight_decay=opts.weight_decay)
    scheduler = get_scheduler(opts, optimizer, max_iters=opts.epochs * len(train_loader))
    _, use_scaler = amp_settings(opts.opt_level, device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=recipe.find_unused_parameters)
    trainer = Trainer(model, model_old, device, opts, trainer_state=trainer_state, classes=classes,
                      step=step, logger=logger, scaler=scaler,
                      threshold_cache_dir=os.path.join(opts.checkpoint, "thresholds"))
    run.trainer = trainer

    begin_epoch, best_score = 0, 0.0
    if resumed_ckpt is not None:
        begin_epoch, best_score = resume(resumed_ckpt, opts, model, optimizer, scheduler, scaler, trainer, logger)
        run.resumed = True

    exemplar_loader = build_memory_loader(opts, step, model_old, train_dst, device, rank, world, logger)
    for component in recipe.components:
        component.before_training(run, methods.step_info(opts, step, classes))
    trainer.before(train_loader, logger)
    ckpt_file = checkpoint_path(opts, step)
    unwrapped = unwrap(model)
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
            gathered_skips({"train": train_loader, "val": val_loader})
            best_score = max(best_score, score["Mean IoU"])
            logger.info(f"validation: mIoU {score['Mean IoU']:.4f}, overall acc {score['Overall Acc']:.4f}")
            logger.add_scalar("Val/MeanIoU", score["Mean IoU"], epoch)
            logger.add_scalar("Val/Overall_Acc", score["Overall Acc"], epoch)
            for k, v in val_losses.items():
                logger.add_scalar(f"Val/{k}", v, epoch)
            log_samples(opts, logger, unwrapped, model_old, val_loader.dataset, trainer, device, epoch)
            save_checkpoint(run, epoch, optimizer, scheduler, scaler, best_score)
        if opts.stop_after_epochs and epoch + 1 - begin_epoch >= opts.stop_after_epochs and not last:
            dist_utils.barrier()
            logger.info(f"--stop_after_epochs {opts.stop_after_epochs}: stopping; resume with --ckpt {ckpt_file}")
            sys.exit(0)
    if begin_epoch >= opts.epochs and not os.path.isfile(ckpt_file) and rank == 0:
        save_checkpoint(run, opts.epochs - 1, optimizer, scheduler, scaler, best_score)
    dist_utils.barrier()  # the other ranks read the file rank 0 just wrote
    for component in recipe.components:
        component.after_step(run, methods.step_info(opts, step, classes))
    dist_utils.barrier()
    return ckpt_file


def log_samples(opts, logger, model, model_old, val_dst, trainer, device, epoch):
    """--sample_num prediction triplets, then each method's own panels."""
    if not dist_utils.is_main_process() or not opts.visualize:
        return
    from utils import tensorboard_samples as tb

    indices = tb.sample_indices(len(val_dst), opts.sample_num, opts.random_seed)
    for idx, row in zip(indices, tb.prediction_triplets(model, val_dst, indices, device, trainer.predict)):
        logger.add_image(f"Samples/{idx}", row, epoch, dataformats="HWC")
    run = StepRun(opts, trainer.step, device, 0, 1, logger, trainer.classes, model=model, model_old=model_old,
                  trainer=trainer)
    for component in trainer.recipe.components:
        component.log_samples(run, model, model_old, val_dst, indices, epoch)


def save_checkpoint(run, epoch, optimizer, scheduler, scaler, best_score):
    """Rank 0 writes the step's checkpoint atomically: weights, optimiser, schedule, scaler, trainer
    and method state, and the run's identity (dataset, task, class order, model)."""
    if run.rank != 0:
        return
    opts = run.opts
    extra = {c.name: c.checkpoint_state(run) for c in run.recipe.components}
    state = {
        "epoch": epoch,
        "model_state": run.model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "scaler_state": scaler.state_dict() if scaler is not None else None,
        "best_score": float(best_score),
        "trainer_state": run.trainer.state_dict(),
        "methods": {name: value for name, value in extra.items() if value is not None},
        "classes": list(run.classes),
        "step": run.step,
        "task": opts.task,
        "dataset": opts.dataset,
        "identity": checkpoint_identity(opts, run.step),
        "opts": options_to_dict(opts),
    }
    save_atomic(state, run.checkpoint)


def read_resume_checkpoint(opts, logger) -> dict:
    """The ``--ckpt`` file a training step resumes from, read once and checked (present, readable,
    of this run's dataset, class order and model) before anything of the step is created."""
    if not os.path.isfile(opts.ckpt):
        raise FileNotFoundError(f"--ckpt {opts.ckpt} does not exist")
    ckpt = load_checkpoint(opts.ckpt)
    check_checkpoint_identity(ckpt, opts, opts.step, opts.ckpt, logger)
    return ckpt


def resume(ckpt, opts, model, optimizer, scheduler, scaler, trainer, logger):
    """Restore the model, optimiser, schedule, AMP scaler and trainer state of ``ckpt`` (from
    :func:`read_resume_checkpoint`); returns ``(first epoch to train, best score so far)``."""
    path = opts.ckpt
    _load_weights(unwrap(model), strip_prefix(ckpt["model_state"]), path, opts, strict=True)
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


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def report_test(opts, step, score, n_classes, logger, world, skipped=None, skip_report=None):
    n_base = tasks.get_per_task_classes(opts.dataset, opts.task, 0)[0]
    summary = summarize_step(score["Class IoU"], n_base, n_classes, hiou=True)
    logger.to_file(StreamSegMetrics.to_str(score))
    logger.add_scalar("Test/MeanIoU", score["Mean IoU"], step)
    logger.add_scalar("Test/Overall_Acc", score["Overall Acc"], step)
    cm = score["Confusion Matrix"]
    names = task_class_names(opts.dataset, opts.task, cm.shape[0]) if cm.shape[0] <= opts.num_classes else None
    logger.add_figure("Test/Confusion_Matrix", confusion_matrix_figure(cm, names), step)
    if not dist_utils.is_main_process():
        return
    csv_path = os.path.join("results", f"{opts.date}_{opts.dataset}_{opts.task}_{opts.name}.csv")
    replaced = append_results_row(csv_path, step, score["Class IoU"], opts.num_classes, n_classes,
                                  score["Mean IoU"])
    write_run_info(csv_path[:-4] + ".json", {
        "options": options_to_dict(opts), "seed": opts.random_seed, "world_size": world,
        "batch_size_per_process": opts.batch_size, "global_batch_size": opts.batch_size * world,
        "skipped_samples": skip_report or {},
    }, step=step)
    print_summary(opts, step, summary, n_base, n_classes)
    for counter in (skipped or {}).values():
        if counter.count:
            print(counter.summary())  # "test: 1 image skipped: <path> (<reason>)"
    print(f"Results {'replaced (step ' + str(step) + ' again)' if replaced else 'appended'} in {csv_path}; "
          f"TensorBoard logs in "
          f"{os.path.join(opts.logdir, f'{opts.task}-{opts.dataset}', opts.name)}")


def print_summary(opts, step, summary, n_base, n_seen):
    """The step's base / new / all / hIoU test mIoU, with the same columns at every step."""
    n_all = sum(tasks.get_per_task_classes(opts.dataset, opts.task, tasks.get_num_steps(opts.dataset, opts.task) - 1))
    keys = ("base", "new", "all", "hIoU")
    rows = [("step", f"0-{n_base - 1}", f"{n_base}-{n_all - 1}", "all", "hIoU"),
            (str(step),) + tuple("-" if np.isnan(summary[k]) else f"{100 * summary[k]:.2f}" for k in keys)]
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{_trained_by(opts, step)} on {opts.dataset} {opts.task}, test mIoU (%)")
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, width)))


def _trained_by(opts, step) -> str:
    """What trained the model: the method, or at step 0 the family that shares that model."""
    label = getattr(opts, "method_label", None) or opts.method or "FT"
    if step > 0:
        return label
    family = methods.step0_family(label)
    sharing = [m for m in methods.names() if methods.get(m).step0_family == family]
    return f"step 0 ({label}; the model {', '.join(sharing)} share)" if len(sharing) > 1 else label


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def main(argv=None):
    """Train and test the requested steps; returns the list of per-step test scores. User errors
    raise (``utils.errors.UserError``, ``ValueError``, ``OSError``); the command line prints them."""
    opts = argparser.parse_options(argv)
    check_output_folders(opts)
    remove_debris(opts)
    device, rank, world = dist_utils.init_distributed(opts)
    opts.world_size = world
    steps = list(opts.step)
    lrs = list(opts.lr) * len(steps) if len(opts.lr) == 1 else list(opts.lr)
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
    sys.exit(run_cli(main))
