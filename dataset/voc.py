"""Pascal-VOC 2012 (SegmentationClassAug) for class-incremental segmentation.

Three layouts are recognised from ``data_root``:

- SATS: ``data_root`` *is* the VOC folder: ``JPEGImages/``, ``SegmentationClassAug/``,
  ``splits/train_aug.txt``, ``splits/val.txt``;
- MiB: ``data_root`` is its parent and holds ``PascalVOC12/`` laid out as above;
- PLOP: ``data_root`` holds ``list/`` (the split files) and the masks; images are under
  ``VOCdevkit/VOC2012/`` (or beside the masks when that folder does not exist).

Split files list ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` per line; the leading
``/`` is dropped and each path is joined to its base folder. Train uses ``train_aug.txt``
(10 582 images), val/test ``val.txt`` (1 449). Index ``i`` of every cache file = line ``i``.
SSUL's saliency maps are read from ``saliency_map/<id>.png`` beside ``JPEGImages/``.
"""

import os
from dataclasses import dataclass

from .incremental import IncrementalSegmentationDataset, SampleFiles, require_files

NUM_CLASSES = 21
CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
SPLIT_FILES = {True: "train_aug.txt", False: "val.txt"}

HOW_TO_GET_VOC = """\
Pascal-VOC 2012 with the augmented masks is expected in one of these layouts:
  <data_root>/JPEGImages/, <data_root>/SegmentationClassAug/, <data_root>/splits/{train_aug,val}.txt
  (SATS; <data_root>/PascalVOC12/ with the same content also works, as in MiB), or PLOP's
  <data_root>/list/ + <data_root>/SegmentationClassAug/ + <data_root>/VOCdevkit/VOC2012/JPEGImages/.
To build it: unpack VOCtrainval_11-May-2012.tar (host.robots.ox.ac.uk/pascal/VOC/voc2012/), add
SegmentationClassAug/ (SBD masks converted to VOC ids) and the split lists (list.zip renamed to
splits/), as SATS's data/download_voc.sh does.
For a small generated stand-in with the same layout run:
  python -m dataset.synthetic --out DIR --dataset voc     (then pass --data_root DIR)"""


@dataclass(frozen=True)
class VOCLayout:
    """Where the split lists, images and masks of one VOC copy live."""

    name: str
    split_dir: str
    image_base: str
    mask_base: str


def detect_voc_layout(data_root: str) -> VOCLayout:
    """Recognise the SATS, MiB or PLOP layout under ``data_root`` (module docstring)."""
    root = os.path.expanduser(data_root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"VOC data_root {root!r} does not exist.\n{HOW_TO_GET_VOC}")
    if os.path.isdir(os.path.join(root, "splits")):
        return VOCLayout("sats", os.path.join(root, "splits"), root, root)
    nested = os.path.join(root, "PascalVOC12")
    if os.path.isdir(os.path.join(nested, "splits")):
        return VOCLayout("mib", os.path.join(nested, "splits"), nested, nested)
    if os.path.isdir(os.path.join(root, "list")):
        devkit = os.path.join(root, "VOCdevkit", "VOC2012")
        image_base = devkit if os.path.isdir(devkit) else root
        return VOCLayout("plop", os.path.join(root, "list"), image_base, root)
    raise FileNotFoundError(
        f"no VOC split folder under {root!r} (looked for splits/, PascalVOC12/splits/ and list/)."
        f"\n{HOW_TO_GET_VOC}"
    )


def parse_split_file(path: str) -> list:
    """``[(image_rel, mask_rel), ...]`` from a split list (one ``image mask`` pair per line).

    The originals cut the last character of every line, so a list without a final newline lost
    a character; lines are split on whitespace here.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split list {path} does not exist.\n{HOW_TO_GET_VOC}")
    pairs = []
    with open(path) as stream:
        for number, line in enumerate(stream, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(
                    f"{path}:{number}: expected '/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png',"
                    f" got {line.strip()!r}"
                )
            pairs.append((fields[0].lstrip("/"), fields[1].lstrip("/")))
    if not pairs:
        raise ValueError(f"split list {path} is empty")
    return pairs


def voc_sample_files(data_root: str, train: bool, saliency: bool = False) -> SampleFiles:
    """The ``train_aug`` (train) or ``val`` list of the VOC copy under ``data_root``."""
    layout = detect_voc_layout(data_root)
    split_file = os.path.join(layout.split_dir, SPLIT_FILES[train])
    pairs = parse_split_file(split_file)
    images = tuple(os.path.join(layout.image_base, image) for image, _ in pairs)
    masks = tuple(os.path.join(layout.mask_base, mask) for _, mask in pairs)
    require_files(images, "images", split_file)
    require_files(masks, "masks", split_file)
    saliency_maps = None
    if saliency:
        folder = os.path.join(layout.image_base, "saliency_map")
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"saliency maps requested (SSUL) but {folder} does not exist; it must hold "
                f"saliency_map/<id>.png for every image (SSUL's README links the off-line maps; "
                f"python -m dataset.synthetic writes them for the generated tree)"
            )
        stems = (os.path.splitext(os.path.basename(image))[0] for image, _ in pairs)
        saliency_maps = tuple(os.path.join(folder, stem + ".png") for stem in stems)
        require_files(saliency_maps, "saliency maps", split_file)
    return SampleFiles(
        root=layout.mask_base,
        split="train" if train else "val",
        source=split_file,
        images=images,
        masks=masks,
        saliency=saliency_maps,
    )


class VOCSegmentationIncremental(IncrementalSegmentationDataset):
    """The VOC images of one incremental step (selection, label mapping: ``dataset.incremental``).

    Arguments as the originals' class; ``saliency=True`` adds SSUL's saliency map to each sample;
    ``labels_future`` only matters for ``data_masking="all"``; ``scan_workers`` sets the pool size
    of the one-off class scan of the split's masks.
    """

    def __init__(
        self,
        root,
        train=True,
        transform=None,
        labels=None,
        labels_old=None,
        idxs_path=None,
        masking=True,
        overlap=True,
        data_masking="current",
        test_on_val=False,
        ignore_test_bg=False,
        saliency=False,
        labels_future=None,
        scan_workers=2,
    ):
        super().__init__(
            voc_sample_files(root, train, saliency),
            NUM_CLASSES,
            train=train,
            transform=transform,
            labels=labels,
            labels_old=labels_old,
            idxs_path=idxs_path,
            masking=masking,
            overlap=overlap,
            data_masking=data_masking,
            test_on_val=test_on_val,
            ignore_test_bg=ignore_test_bg,
            labels_future=labels_future,
            scan_workers=scan_workers,
        )
