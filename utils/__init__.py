"""Engine utilities: schedulers, checkpoints, distributed helpers, logging, results files, losses.

Submodules are imported where they are used (``from utils.scheduler import PolyLR``); this package
file stays empty so that importing one helper does not pull in TensorBoard, matplotlib or the losses.
"""
