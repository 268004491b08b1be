"""PLOP (Douillard et al., CVPR 2021): pseudo-labels of the background from the old model with
per-class entropy thresholds, the adaptive per-image factor, and POD, a multi-scale pooled
distillation of the intermediate features (``utils/pod.py``).

``--pseudo`` (naive, confidence, threshold_<x>, median, entropy) is also SATS's pseudo-labelling.
"""
from __future__ import annotations

import functools
import json
from typing import Optional

from methods import register_component, register_method
from methods.base import Component, Context, LossTerm, MethodSpec, StepInfo, TargetBuilder, Targets
from methods.common import add_switch
from utils import distributed as dist_utils
from utils import loss as L
from utils import pseudo as pseudo_utils

PSEUDO_MODES = ("naive", "confidence", "median", "entropy")
_PLOP_POD_OPTIONS = {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}


def _json_dict(text):
    import argparse

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


# --------------------------------------------------------------------------------------------
# POD
# --------------------------------------------------------------------------------------------
class PodDistillation(LossTerm):
    """PLOP's POD on the backbone maps, the head output and (``pod_logits``) the small logits; its
    options are bound here once per step. Weight 1: ``pod_factor`` and the schedule are inside."""

    name = "pod"
    new_wants = old_wants = frozenset({"attentions", "sem_logits_small"})

    def __init__(self, opts, nb_old: int, nb_current: int):
        super().__init__(1.0)
        self.with_logits = bool(opts.pod_logits)
        self.pod = functools.partial(
            L.features_distillation, collapse_channels=opts.pod, index_new_class=nb_old,
            pod_apply=opts.pod_apply, pod_deeplab_mask=opts.pod_deeplab_mask,
            pod_deeplab_mask_factor=opts.pod_deeplab_mask_factor, interpolate_last=opts.pod_interpolate_last,
            pod_factor=opts.pod_factor, prepro=opts.pod_prepro, deeplabmask_upscale=not opts.deeplab_mask_downscale,
            spp_scales=opts.spp_scales, pod_options=opts.pod_options, use_pod_schedule=not opts.no_pod_schedule,
            nb_current_classes=nb_current, nb_new_classes=nb_current - nb_old)

    def __call__(self, ctx: Context):
        old_maps = list(ctx.old_extras["attentions"])
        new_maps = list(ctx.extras["attentions"])
        if self.with_logits:
            old_maps.append(ctx.old_extras["sem_logits_small"])
            new_maps.append(ctx.extras["sem_logits_small"])
        return self.pod([m.float() for m in old_maps], [m.float() for m in new_maps], labels=ctx.labels,
                        outputs_old=ctx.old_logits)


# --------------------------------------------------------------------------------------------
# pseudo-labels
# --------------------------------------------------------------------------------------------
class PseudoLabels(TargetBuilder):
    """Background pixels relabelled with the old model's prediction where it is confident
    (``pseudo_utils.pseudo_label``); per-class thresholds computed once before the first epoch."""

    def __init__(self, opts, step: int, nb_old: int, nb_current: int):
        self.name = opts.pseudo
        self.opts = opts
        self.step = step
        self.nb_old, self.nb_current = nb_old, nb_current
        self.shares_old_softmax = True
        self.thresholds = self.max_entropy = None

    def before(self, trainer, loader, logger=None) -> None:
        """Per-class thresholds (``median``/``entropy`` modes), cached under the trainer's
        ``threshold_cache_dir`` keyed by the old weights and everything else they depend on."""
        if trainer.model_old is None or pseudo_utils.threshold_statistic(self.name) is None:
            return
        o = self.opts

        if o.pseudo_raw_labels:  # the unmapped masks as well: only raw background pixels count
            from dataset import SkipAwareLoader, with_raw_labels

            loader = SkipAwareLoader(with_raw_labels(loader.dataset), batch_size=loader.batch_size,
                                     sampler=loader.sampler, num_workers=loader.num_workers,
                                     drop_last=loader.drop_last)

        def compute():
            return pseudo_utils.find_thresholds(
                trainer.model_old, loader, trainer.device, mode=self.name, nb_old_classes=self.nb_old,
                nb_current_classes=self.nb_current, nb_bins=o.pseudo_nb_bins, legacy=o.pseudo_median_legacy,
                threshold=o.threshold, step=self.step, step_threshold=o.step_threshold, logger=logger,
                raw_labels=o.pseudo_raw_labels)

        if trainer.threshold_cache_dir is None:
            found = compute()
        else:
            key = pseudo_utils.ThresholdKey(
                weights=pseudo_utils.weights_fingerprint(getattr(trainer.model_old, "module", trainer.model_old)),
                dataset=o.dataset, task=o.task, step=self.step, mode=self.name, nb_bins=o.pseudo_nb_bins,
                legacy=o.pseudo_median_legacy, threshold=o.threshold, step_threshold=o.step_threshold,
                nb_old_classes=self.nb_old, nb_current_classes=self.nb_current,
                dataset_len=len(loader.dataset),
                extra={"crop_size": o.crop_size, "seed": o.random_seed, "overlap": o.overlap,
                       "data_masking": o.data_masking, "world_size": dist_utils.get_world_size(),
                       "batch_size": o.batch_size, "raw_labels": o.pseudo_raw_labels})
            found = pseudo_utils.ThresholdCache(trainer.threshold_cache_dir).get_or_compute(
                key, compute, device=trainer.device)
        self.thresholds, self.max_entropy = found.thresholds, found.max_entropy

    def __call__(self, labels, old_logits, saliency=None, old_probs=None) -> Targets:
        if old_logits is None:
            return Targets(labels)
        o = self.opts
        out = pseudo_utils.pseudo_label(
            labels, old_logits, self.name, nb_old_classes=self.nb_old, nb_current_classes=self.nb_current,
            thresholds=self.thresholds, max_entropy=self.max_entropy,
            adaptive_factor=o.classif_adaptive_factor, adaptive_min_factor=o.classif_adaptive_min_factor,
            keep_old_gt=bool(o.mem_size),  # memory samples keep their old-class labels
            probs_old=old_probs)
        return Targets(out.labels, out.pixel_weights, out.adaptive_factor)


# --------------------------------------------------------------------------------------------
# the component
# --------------------------------------------------------------------------------------------
def _check_pseudo(mode):
    if mode is None or mode in PSEUDO_MODES or mode == "ssul":
        return
    if mode.startswith("threshold_"):
        try:
            value = float(mode[len("threshold_"):])
        except ValueError:
            value = None
        if value is not None and 0 < value <= 1:
            return
    raise ValueError(f"unknown --pseudo {mode!r}; valid: {', '.join(PSEUDO_MODES + ('ssul',))} or "
                     f"threshold_<x> with 0 < x <= 1 (PLOP's median_<x> never produced labels and "
                     f"is not supported)")


class PLOP(Component):
    name = "plop"
    priority = 20
    order = 40

    def add_options(self, parser):
        g = parser.add_argument_group("Method: PLOP (pseudo-labels, POD; also SATS's pseudo-labels)")
        g.add_argument("--pseudo", type=str, default=None,
                       help="pseudo-labelling of background pixels with the old model at step > 0: "
                            "naive, confidence, threshold_<x>, median, entropy (PLOP), ssul (SSUL)")
        g.add_argument("--threshold", type=float, default=0.9,
                       help="pseudo-label threshold (entropy mode: floor of the per-class thresholds)")
        g.add_argument("--pseudo_nb_bins", type=int, default=None,
                       help="histogram bins of the median thresholds (default 100 entropy / 20 others)")
        add_switch(g, "classif_adaptive_factor",
                   "multiply each image's CE by (confident old pixels / old pixels)")
        g.add_argument("--classif_adaptive_min_factor", type=float, default=0.0,
                       help="lower bound of the adaptive factor")
        g.add_argument("--pseudo_median_legacy", action="store_true", default=False,
                       help="thresholds as the SATS repository computes them: its median loop (adds the bin "
                            "index), float32 histograms per process, inf replaced by 0.005")
        g.add_argument("--pseudo_raw_labels", action="store_true", default=False,
                       help="threshold histograms on the unmapped masks, only raw background pixels (SATS "
                            "repository); default: every pixel mapped to 0 (PLOP)")
        g.add_argument("--pod", type=str, default=None, choices=["spatial", "local", "global"],
                       help="POD feature distillation: spatial, local (PLOP) or global pooling")
        g.add_argument("--pod_factor", type=float, default=5.0, help="POD weight")
        g.add_argument("--pod_options", type=_json_dict, default=None,
                       help="per-map POD options as JSON, e.g. PLOP's "
                            "'{\"switch\": {\"after\": {\"extra_channels\": \"sum\", "
                            "\"factor\": 0.0005, \"type\": \"local\"}}}'")
        g.add_argument("--pod_prepro", type=str, default="pow", help="POD feature pre-processing")
        g.add_argument("--no_pod_schedule", action="store_true", default=False,
                       help="do not scale POD by sqrt(seen classes / new classes)")
        g.add_argument("--pod_apply", type=str, default="all", choices=["all", "backbone", "deeplab"],
                       help="which feature maps POD distils")
        g.add_argument("--pod_deeplab_mask", action="store_true", default=False,
                       help="POD on the ASPP output restricted per class mask")
        g.add_argument("--pod_deeplab_mask_factor", type=float, default=None,
                       help="weight of the masked ASPP POD (default: --pod_factor)")
        g.add_argument("--deeplab_mask_downscale", action="store_true", default=False,
                       help="downscale the masks instead of upscaling the features")
        g.add_argument("--pod_interpolate_last", action="store_true", default=False,
                       help="interpolate the last POD map to the previous one's size")
        add_switch(g, "pod_logits", "also apply POD to the logits")
        g.add_argument("--spp_scales", type=int, nargs="+", default=[1, 2, 4], help="pyramid scales of local POD")
        g.add_argument("--cosine", action="store_true", default=False,
                       help="experiment: cosine-similarity classifier with a learned scale")
        g.add_argument("--cosine_legacy", action="store_true", default=False,
                       help="with --cosine: normalise only the classifier weights and never apply the "
                            "learned scale, as PLOP's and SATS's code")
        g.add_argument("--nb_background_modes", type=int, default=1,
                       help="experiment: number of background output channels")
        g.add_argument("--multimodal_fusion", type=str, default="sum",
                       help="experiment: how background channels are fused (nb_background_modes > 1)")
        g.add_argument("--align_weight", type=str, default=None, choices=["old", "background", "all"],
                       help="experiment: rescale the new classifier's weights to the norm of these")
        g.add_argument("--align_weight_frequency", type=str, default="never", choices=["never", "epoch", "task"],
                       help="when --align_weight is applied")

    def check(self, opts):
        _check_pseudo(opts.pseudo)

    def terms(self, info: StepInfo) -> list:
        if info.opts.pod is None:
            return []
        return [PodDistillation(info.opts, info.nb_old, info.nb_current)]

    def targets(self, info: StepInfo) -> Optional[TargetBuilder]:
        if info.opts.pseudo in (None, "ssul") or info.step == 0:  # no old model at step 0
            return None
        return PseudoLabels(info.opts, info.step, info.nb_old, info.nb_current)


register_component(PLOP())
register_method(MethodSpec(
    "PLOP", preset={"pod": "local", "pod_factor": 0.01, "pod_logits": True, "pod_options": _PLOP_POD_OPTIONS,
                    "pseudo": "entropy", "threshold": 0.001, "classif_adaptive_factor": True,
                    "init_balanced": True},
    memory=True, order=8, summary="entropy pseudo-labels + local POD",
    # PLOP's ADE scripts (also SATS's copies): weaker POD than the VOC preset
    sweep={"ade": {"args": ["--pod_factor", "0.001", "--pod_options",
                            '{"switch":{"after":{"extra_channels":"sum","factor":0.00001,"type":"local"}}}']}}))
