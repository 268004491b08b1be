"""Recorded POD inputs and results: the values ``utils.pod`` must keep across rewrites.

``tests/fixtures/pod_recorded.pt`` holds, for every case below, the loss and its gradients with
respect to the new maps (or the ``local_pod`` embedding), as computed by the window-by-window implementation that the
vectorised one replaced, and a fingerprint of the inputs (which are regenerated from their seeds). ``tests/test_pod.py`` recomputes them with today's code.

    python tests/pod_cases.py            # check today's code against the file (prints the max errors)
    python tests/pod_cases.py --write    # overwrite the file (only after an intended change)

The map sizes cover square power-of-two maps, widths that the scales do not divide (remainder
columns and rows dropped), maps taller than wide (rows below the pyramid dropped) and wider than
tall (the last row band of a scale is shorter than its windows).
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pod_recorded.pt"

# (channels, height, width) of the feature maps, batch 2
MAP_SHAPES = [(4, 16, 16), (6, 10, 10), (5, 9, 7), (3, 7, 10), (8, 12, 12)]
OLD_CLASSES, NEW_CLASSES = 5, 2          # logits map: 5 old channels, 7 new ones
LOGITS_SIZE = 12

PLOP_POD_OPTIONS = {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}
PLOP = dict(collapse_channels="local", pod_factor=0.01, prepro="pow", spp_scales=[1, 2, 4],
            pod_options=PLOP_POD_OPTIONS, use_pod_schedule=True,
            nb_current_classes=OLD_CLASSES + NEW_CLASSES, nb_new_classes=NEW_CLASSES,
            index_new_class=OLD_CLASSES)

# name -> (uses the logits map, keyword arguments of features_distillation)
LOSS_CASES = {
    "plop_with_logits": (True, PLOP),
    "plop_without_logits": (False, PLOP),
    "spm_norm_l1": (True, dict(PLOP, pod_options={
        "switch": {"normalize_per_scale": "spm", "before": {"norm": True},
                   "after": {"extra_channels": "trim", "factor": 0.5}},
        "difference_function_all": "l1"})),
    "per_scale_true_scales_1_3": (True, dict(PLOP, spp_scales=[1, 3], pod_options={
        "switch": {"normalize_per_scale": True, "after": {"factor": 0.2}}})),
    "adaptive_factor": (True, dict(PLOP, pod_options={
        "switch": {"before": {"use_adaptative_factor": True},
                   "after": {"use_adaptative_factor": True, "factor": 0.1}}})),
    "masked_upscaled_old": (True, dict(PLOP, pod_deeplab_mask=True, pod_options={
        "switch": {"mask_position": "all",
                   "after": {"apply_mask": "old", "upscale_mask_topk": 2,
                             "use_adaptative_factor": True}}})),
    "masked_downscaled": (True, dict(PLOP, pod_deeplab_mask=True, deeplabmask_upscale=False,
                                     pod_deeplab_mask_factor=0.3)),
    "spatial": (True, dict(PLOP, collapse_channels="spatial", pod_options=None)),
    "global": (False, dict(PLOP, collapse_channels="global", spp_scales=[2, 4], pod_options=None)),
}

# local_pod alone: (map shape, scales, normalize_per_scale)
EMBEDDING_CASES = {
    f"{c}x{h}x{w}_{'-'.join(map(str, scales))}_{norm}": ((2, c, h, w), scales, norm)
    for (c, h, w) in MAP_SHAPES + [(2, 5, 3)]
    for scales, norm in (([1, 2, 4], False), ([1, 2, 4], True), ([1, 2, 4], "spm"), ([3, 1, 2], "spm"))
}  # 2x5x3 with scale 4: windows of width 0, which add nothing (as in PLOP)


def make_inputs(with_logits: bool, seed: int = 0) -> dict:
    """Old and new maps, labels at twice the logits' size (a 255 corner), old full-size logits."""
    g = torch.Generator().manual_seed(seed)
    old = [torch.randn(2, *shape, generator=g) for shape in MAP_SHAPES]
    new = [torch.randn(2, *shape, generator=g) for shape in MAP_SHAPES]
    if with_logits:
        old.append(torch.randn(2, OLD_CLASSES, LOGITS_SIZE, LOGITS_SIZE, generator=g))
        new.append(torch.randn(2, OLD_CLASSES + NEW_CLASSES, LOGITS_SIZE, LOGITS_SIZE, generator=g))
    size = 2 * LOGITS_SIZE
    labels = torch.randint(0, OLD_CLASSES + NEW_CLASSES, (2, size, size), generator=g)
    labels[:, :3, :3] = 255
    outputs_old = torch.randn(2, OLD_CLASSES, size, size, generator=g)
    return {"old": old, "new": new, "labels": labels, "outputs_old": outputs_old}


def loss_and_grads(features_distillation, inputs: dict, kwargs: dict):
    new = [m.clone().requires_grad_(True) for m in inputs["new"]]
    loss = features_distillation(inputs["old"], new, labels=inputs["labels"],
                                 outputs_old=inputs["outputs_old"], **kwargs)
    loss.backward()
    return loss.detach(), [m.grad for m in new]


def embedding_and_grad(local_pod, shape, scales, norm, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).requires_grad_(True)
    embedding = local_pod(x, scales, normalize_per_scale=norm)
    weights = torch.randn(embedding.shape, generator=g)
    (embedding * weights).sum().backward()
    return x.detach(), embedding.detach(), x.grad


def fingerprint(tensors) -> torch.Tensor:
    """Sum and sum of squares of each input tensor: the recorded inputs are regenerated from their
    seed, and this catches a random generator that no longer gives the same numbers."""
    return torch.tensor([[t.double().sum(), t.double().pow(2).sum()] for t in tensors])


def input_tensors(inputs: dict) -> list:
    return inputs["old"] + inputs["new"] + [inputs["labels"], inputs["outputs_old"]]


def compute_all() -> dict:
    from utils.loss import features_distillation, local_pod

    record = {"loss": {}, "embedding": {}}
    for name, (with_logits, kwargs) in LOSS_CASES.items():
        inputs = make_inputs(with_logits)
        loss, grads = loss_and_grads(features_distillation, inputs, kwargs)
        record["loss"][name] = {"inputs": fingerprint(input_tensors(inputs)), "loss": loss,
                                "grads": grads}
    for name, (shape, scales, norm) in EMBEDDING_CASES.items():
        x, embedding, grad = embedding_and_grad(local_pod, shape, scales, norm)
        # its gradient is checked against the window-by-window restatement in test_pod.py
        record["embedding"][name] = {"inputs": fingerprint([x]), "embedding": embedding}
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"overwrite {FIXTURE.name}")
    args = parser.parse_args(argv)
    record = compute_all()
    if args.write:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        torch.save(record, FIXTURE)
        print(f"wrote {FIXTURE}")
        return
    stored = torch.load(FIXTURE, weights_only=True)
    for kind, cases in record.items():
        for name, values in cases.items():
            for key in ("inputs", "loss", "grads", "embedding"):
                if key in values:
                    got, want = values[key], stored[kind][name][key]
                    pairs = zip(got, want) if isinstance(got, list) else [(got, want)]
                    error = max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in pairs)
                    print(f"{kind:9s} {name:28s} {key:9s} max abs error {error:.3g}")


if __name__ == "__main__":
    main()
