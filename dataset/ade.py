"""ADE20K SceneParsing (``ADEChallengeData2016``) for class-incremental segmentation.

``data_root`` is the ``ADEChallengeData2016`` folder itself (SATS) or its parent (PLOP/MiB):
images ``images/{training,validation}/<stem>.jpg``, masks ``annotations/<same split>/<stem>.png``.
The file list is the sorted image folder, hidden and non-image files skipped (PLOP/MiB would index
a stray ``.DS_Store``). 151 classes: annotation 0 ("other") is the background class 0 and is
scored, 1..150 the objectInfo150 order, no shift (SATS/PLOP). With ``saliency=True`` the maps are
read from ``saliency_map/<split>/<stem>.png``; without that folder every pixel counts as salient,
which is what SSUL does on ADE (it has no ADE saliency maps).
"""

import logging
import os

from .incremental import IncrementalSegmentationDataset, SampleFiles, require_files

logger = logging.getLogger(__name__)

NUM_CLASSES = 151
# objectInfo150 order; 0 is ADE's unlabelled "other" pixels, used as background.
CLASSES = (
    "other", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
BASE_DIR = "ADEChallengeData2016"
SPLITS = {True: "training", False: "validation"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

HOW_TO_GET_ADE = """\
ADE20K is expected as ADEChallengeData2016/ (pass that folder or its parent as data_root) with
images/{training,validation}/*.jpg and annotations/{training,validation}/*.png; download and unpack
ADEChallengeData2016.zip from the MIT Scene Parsing benchmark (data.csail.mit.edu/places/ADEchallenge).
For a small generated stand-in with the same layout run:
  python -m dataset.synthetic --out DIR --dataset ade     (then pass --data_root DIR)"""


def detect_ade_root(data_root: str) -> str:
    """The ``ADEChallengeData2016`` folder: ``data_root`` itself or ``data_root/ADEChallengeData2016``."""
    root = os.path.expanduser(data_root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ADE data_root {root!r} does not exist.\n{HOW_TO_GET_ADE}")
    for candidate in (root, os.path.join(root, BASE_DIR)):
        if os.path.isdir(os.path.join(candidate, "images")):
            return candidate
    raise FileNotFoundError(
        f"no images/ folder in {root!r} nor in {os.path.join(root, BASE_DIR)!r}.\n{HOW_TO_GET_ADE}"
    )


def ade_sample_files(data_root: str, train: bool, saliency: bool = False) -> SampleFiles:
    """The training or validation images of the ADE copy under ``data_root``, sorted by name."""
    ade_root = detect_ade_root(data_root)
    split = SPLITS[train]
    image_dir = os.path.join(ade_root, "images", split)
    mask_dir = os.path.join(ade_root, "annotations", split)
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} does not exist.\n{HOW_TO_GET_ADE}")
    names = sorted(
        name for name in os.listdir(image_dir)
        if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not names:
        raise FileNotFoundError(f"{image_dir} holds no images.\n{HOW_TO_GET_ADE}")
    stems = [os.path.splitext(name)[0] for name in names]
    images = tuple(os.path.join(image_dir, name) for name in names)
    masks = tuple(os.path.join(mask_dir, stem + ".png") for stem in stems)
    require_files(masks, "annotation masks (one per image)", image_dir)
    saliency_maps = None
    if saliency:
        folder = os.path.join(ade_root, "saliency_map", split)
        if os.path.isdir(folder):
            saliency_maps = tuple(os.path.join(folder, stem + ".png") for stem in stems)
            require_files(saliency_maps, "saliency maps", image_dir)
        else:
            logger.warning(
                "no saliency maps in %s: every pixel is treated as salient (SSUL's ADE setting)",
                folder,
            )
            saliency_maps = (None,) * len(images)
    return SampleFiles(
        root=ade_root,
        split="train" if train else "val",
        source=image_dir,
        images=images,
        masks=masks,
        saliency=saliency_maps,
    )


class AdeSegmentationIncremental(IncrementalSegmentationDataset):
    """The ADE20K images of one incremental step (same arguments as the VOC class).

    PLOP's ADE class ignored ``data_masking`` and ``test_on_val``; here every option applies as for
    VOC, the shared core being the same.
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
            ade_sample_files(root, train, saliency),
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
