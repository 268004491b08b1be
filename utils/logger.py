"""Run logging: TensorBoard (tensorboardX) and a plain-text log, written by rank 0 only.

``Logger`` keeps the originals' interface (SATS/PLOP ``utils/logger.py``): TensorBoard tags get a
``/{step}`` suffix when the logger is built with ``step``, so all steps of a task share one log
folder. Rank 0 writes ``{logdir}/log.txt`` (or ``filename``) and prints ``LEVEL:rank0: message`` to
stderr; other ranks are silent except for errors and explicit ``print`` calls.

Also here: ``confusion_matrix_figure`` and the colour palette used to visualise label maps.
"""

import itertools
import logging
import os
import sys

import numpy as np

__all__ = ["Logger", "confusion_matrix_figure", "color_map", "label_to_color"]

_instances = itertools.count()


class Logger:
    """TensorBoard writer + text log of one process.

    Args:
        logdir: folder of the TensorBoard events and of ``log.txt``.
        rank: process rank; only rank 0 writes files.
        type: TensorBoard backend; only ``'tensorboardX'`` exists.
        debug: whether ``debug()`` messages are emitted (rank 0).
        filename: text log path instead of ``{logdir}/log.txt``.
        summary: whether rank 0 writes TensorBoard events (the originals' ``--visualize``).
        step: appended to every TensorBoard tag as ``tag/{step}``.
    """

    def __init__(self, logdir, rank, type="tensorboardX", debug=False, filename=None, summary=True,
                 step=None, deferred=False, world_size=1):
        if type != "tensorboardX":
            raise ValueError(f"unknown logger type {type!r}; valid: 'tensorboardX'")
        self.logdir = logdir
        self.rank = rank
        self.type = type
        self.step = step
        self.debug_flag = debug
        self.writer = None
        self._filename = filename
        self._summary = summary
        self._pending = []  # file lines logged before start() (deferred loggers)
        self._logger = logging.getLogger(f"css.logger.{next(_instances)}")
        self._logger.setLevel(logging.DEBUG)
        self._logger.propagate = False
        # the rank prefix only where there are several ranks to tell apart
        prefix = f"%(levelname)s:rank{rank}: " if world_size > 1 else "%(levelname)s: "
        self._formatter = logging.Formatter(prefix + "%(message)s")
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(self._formatter)
        # Other ranks only report errors; rank 0 reports everything.
        console.setLevel(logging.DEBUG if rank == 0 else logging.ERROR)
        self._logger.addHandler(console)
        self._file_logger = None
        self.started = False
        if not deferred:
            self.start()

    def start(self):
        """Create the log folder, ``log.txt`` and the TensorBoard writer (rank 0), and write the
        lines logged so far. A deferred logger that is never started leaves nothing on disk."""
        if self.started:
            return
        self.started = True
        if self.rank != 0:
            return
        os.makedirs(self.logdir, exist_ok=True)
        log_file = logging.FileHandler(self._filename or os.path.join(self.logdir, "log.txt"))
        log_file.setFormatter(self._formatter)
        self._file_logger = logging.getLogger(f"{self._logger.name}.file")
        self._file_logger.setLevel(logging.DEBUG)
        self._file_logger.propagate = False
        self._file_logger.addHandler(log_file)
        for line in self._pending:
            self._file_logger.info(line)
        self._pending = []
        self._logger.addHandler(log_file)
        if self._summary:
            import tensorboardX

            self.writer = tensorboardX.SummaryWriter(self.logdir)
        self.info(f"[!] starting logging at directory {self.logdir}")
        self.debug("[!] Entering DEBUG mode")

    # --- text log -------------------------------------------------------------------------
    def info(self, msg):
        """Rank 0 only."""
        if self.rank == 0:
            self._logger.info(msg)
            if not self.started:
                self._pending.append(msg)

    def to_file(self, msg):
        """Rank 0's text log only: long tables that would flood the console."""
        if self._file_logger is not None:
            self._file_logger.info(msg)
        elif self.rank == 0 and not self.started:
            self._pending.append(msg)

    def warning(self, msg):
        """Rank 0 only (every rank sees the same warnings in this code base)."""
        if self.rank == 0:
            self._logger.warning(msg)

    def debug(self, msg):
        """Rank 0 only, and only with ``debug=True``."""
        if self.rank == 0 and self.debug_flag:
            self._logger.info(msg)

    def error(self, msg):
        """Every rank."""
        self._logger.error(msg)

    def print(self, msg):
        """Every rank (e.g. per-rank device information); other ranks print to stderr only."""
        if self.rank == 0:
            self._logger.info(msg)
        else:
            print(f"INFO:rank{self.rank}: {msg}", file=sys.stderr, flush=True)

    # --- TensorBoard ----------------------------------------------------------------------
    def _tag(self, tag):
        return f"{tag}/{self.step}" if self.step is not None else tag

    def add_scalar(self, tag, scalar_value, step=None):
        if self.writer is not None:
            self.writer.add_scalar(self._tag(tag), scalar_value, step)

    def add_image(self, tag, image, step=None, dataformats="CHW"):
        if self.writer is not None:
            self.writer.add_image(self._tag(tag), image, step, dataformats=dataformats)

    def add_figure(self, tag, figure, step=None):
        """Logs and closes a matplotlib figure (e.g. ``confusion_matrix_figure(cm)``)."""
        if not hasattr(figure, "savefig"):
            raise TypeError(
                f"add_figure({tag!r}) needs a matplotlib Figure, got {type(figure).__name__}; "
                "draw a confusion matrix with utils.logger.confusion_matrix_figure")
        if self.writer is not None:
            self.writer.add_figure(self._tag(tag), figure, step)

    def add_text(self, tag, text, step=None):
        if self.writer is not None:
            self.writer.add_text(self._tag(tag), text, step)

    def add_table(self, tag, table, step=None):
        """A ``{term: value}`` dict as a two-column HTML table (text tab of TensorBoard)."""
        rows = "".join(f"<tr><td>{key}</td><td>{value}</td></tr>" for key, value in table.items())
        self.add_text(tag, f'<table width="100%"><tr><th>Term</th><th>Value</th></tr>{rows}</table>',
                      step)

    def add_results(self, results, step=None):
        """A ``{row name: {column: value}}`` dict as an HTML table under the tag ``Results``."""
        rows = "".join(
            f"<tr><td>{name}</td>" + "".join(f"<td>{value}</td>" for value in row.values()) + "</tr>"
            for name, row in results.items())
        self.add_text("Results", f'<table width="100%">{rows}</table>', step)

    def close(self):
        if self.started:
            self.info("Closing the Logger.")
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for handler in list(self._logger.handlers):
            handler.close()
            self._logger.removeHandler(handler)


def confusion_matrix_figure(cm, class_names=None, normalize=True, title="Confusion Matrix"):
    """Matplotlib figure (Agg canvas, no pyplot state) of a confusion matrix, rows = ground truth.

    With ``normalize`` each row is divided by its sum (rows without pixels stay 0), as the
    originals drew it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    if class_names is not None and len(class_names) != cm.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {cm.shape[0]}-class matrix")
    figure = Figure(figsize=(max(4.0, 0.3 * cm.shape[0]),) * 2)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(cm, interpolation="nearest", cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set(title=title, ylabel="True label", xlabel="Predicted label")
    if class_names is not None:
        ticks = np.arange(len(class_names))
        axes.set_xticks(ticks, labels=class_names, rotation=90, fontsize="small")
        axes.set_yticks(ticks, labels=class_names, fontsize="small")
    figure.tight_layout()
    return figure


def color_map(dataset="voc", n=256):
    """``(n, 3)`` uint8 palette: Pascal VOC's bit-interleaved colours.

    Colour of label ``i``: for bit ``k`` = 0..7 of ``i`` taken three at a time, bit ``3k`` sets bit
    ``7-k`` of red, ``3k+1`` of green, ``3k+2`` of blue. Used for ADE as well (the palette only
    needs to be distinct per class), so ``dataset`` is validated but does not change the colours.
    """
    if dataset not in ("voc", "ade"):
        raise ValueError(f"unknown dataset {dataset!r}; valid: 'voc', 'ade'")
    labels = np.arange(n)
    palette = np.zeros((n, 3), dtype=np.uint8)
    for k in range(8):
        for channel in range(3):
            bit = (labels >> (3 * k + channel)) & 1
            palette[:, channel] |= (bit << (7 - k)).astype(np.uint8)
    return palette


def label_to_color(label, cmap):
    """``(..., H, W)`` integer labels -> ``(..., H, W, 3)`` uint8 colours (tensors or arrays)."""
    if hasattr(label, "detach"):
        label = label.detach().cpu().numpy()
    label = np.asarray(label)
    if not np.issubdtype(label.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() >= len(cmap)):
        raise ValueError(f"labels must lie in [0, {len(cmap)}), got [{label.min()}, {label.max()}]")
    return np.asarray(cmap)[label]
