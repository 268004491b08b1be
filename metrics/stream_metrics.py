"""Streaming confusion-matrix metrics for semantic segmentation (SATS/PLOP/MiB ``StreamSegMetrics``).

Notation: ``M`` is the n x n confusion matrix, rows = ground truth, columns = prediction,
``gt_c = sum_j M[c, j]``, ``pred_c = sum_i M[i, c]``, ``EPS = 1e-6`` (the originals' constant).

- Overall Acc = trace(M) / sum(M)
- Class Acc[c] = M[c, c] / (gt_c + EPS)
- Class IoU[c] = M[c, c] / (gt_c + pred_c - M[c, c] + EPS)
- Mean Acc, Mean IoU = means over the classes *present in the ground truth* (gt_c > 0); a class
  that is only predicted does not enter the means (its false positives still lower the IoU of the
  true classes). This is the published convention and is reproduced.
- FreqW Acc = sum_{c: gt_c > 0} (gt_c / sum(M)) * Class IoU[c]

Differences from the originals, none of which change a number:
- Class IoU / Class Acc hold ``float('nan')`` (not the string ``"X"``) for classes absent from the
  ground truth, so they can be averaged with ``nanmean``; the results CSV still writes ``X``.
- "Confusion Matrix" is the row-normalised matrix as a numpy array (what the originals drew into a
  matplotlib figure); draw it with ``utils.logger.confusion_matrix_figure``. Raw counts are in
  ``StreamSegMetrics.confusion_matrix``.
- ``synch`` all-reduces, so every rank holds the global numbers (the originals reduced to rank 0).
"""

import math

import numpy as np
import torch

__all__ = ["StreamSegMetrics", "summarize_step", "summary_labels", "harmonic_mean", "SUMMARY_KEYS"]

EPS = 1e-6
# ``summarize_step``'s keys in ``summary_labels``' order (the last three only on request).
SUMMARY_KEYS = ("base", "new", "all", "hIoU", "base_fg", "hIoU_fg")


class StreamSegMetrics:
    """Accumulates a confusion matrix over batches with ``torch.bincount`` on the labels' device."""

    def __init__(self, n_classes):
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
            raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
        self.n_classes = n_classes
        self.reset()

    def reset(self):
        self._matrix = None  # int64 tensor, allocated on the device of the first update
        self.total_samples = 0
        self._synched = False

    @property
    def confusion_matrix(self):
        """Raw counts as a float64 numpy array (n x n, rows = ground truth)."""
        if self._matrix is None:
            return np.zeros((self.n_classes, self.n_classes))
        return self._matrix.double().cpu().numpy()

    def update(self, label_trues, label_preds):
        """Add a batch ``(B, H, W)`` or one image ``(H, W)`` of ground truth and predictions.

        Accepts torch tensors (any device) or numpy arrays. Ground-truth pixels outside
        ``[0, n_classes)`` (255 = ignore) are skipped; a prediction outside that range is an error.
        """
        trues = _as_long_tensor(label_trues)
        preds = _as_long_tensor(label_preds, trues.device)
        if trues.shape != preds.shape:
            raise ValueError(f"label shape {tuple(trues.shape)} != prediction shape {tuple(preds.shape)}")
        if trues.dim() not in (2, 3):
            raise ValueError(f"expected (B, H, W) or (H, W) labels, got shape {tuple(trues.shape)}")
        n_samples = trues.shape[0] if trues.dim() == 3 else 1
        n = self.n_classes
        valid = (trues >= 0) & (trues < n)
        trues, preds = trues[valid], preds[valid]
        if preds.numel() and bool(((preds < 0) | (preds >= n)).any()):
            raise ValueError(
                f"predictions must lie in [0, {n}); got values in [{int(preds.min())}, {int(preds.max())}]")
        counts = torch.bincount(n * trues + preds, minlength=n * n).reshape(n, n)
        if self._matrix is None:
            self._matrix = torch.zeros((n, n), dtype=torch.long, device=counts.device)
        self._matrix += counts.to(self._matrix.device)
        self.total_samples += n_samples
        self._synched = False

    def synch(self, device):
        """Sum the confusion matrix and sample count over all ranks (every rank gets the totals).

        No-op without an initialised process group. Call once after the loop: a second call
        without a new update would count everything twice, so it raises.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if self._synched:
            raise RuntimeError("StreamSegMetrics.synch called twice without an update in between")
        matrix = (self._matrix if self._matrix is not None
                  else torch.zeros((self.n_classes,) * 2, dtype=torch.long)).to(device)
        samples = torch.tensor(self.total_samples, dtype=torch.long, device=device)
        torch.distributed.all_reduce(matrix)
        torch.distributed.all_reduce(samples)
        self._matrix = matrix
        self.total_samples = int(samples.item())
        self._synched = True

    def get_results(self, valid_cls=None):
        """Metrics dict with the originals' keys (formulas in the module docstring).

        ``valid_cls`` (SATS): optional class indices; if given, only those classes and background
        count as present (others get NaN). The caller's list is not modified.
        """
        hist = self.confusion_matrix
        gt_sum, pred_sum, diag = hist.sum(axis=1), hist.sum(axis=0), np.diag(hist)
        present = gt_sum > 0
        if valid_cls is not None:
            allowed = np.zeros(self.n_classes, dtype=bool)
            allowed[[0, *[int(c) for c in valid_cls if 0 <= int(c) < self.n_classes]]] = True
            present &= allowed
        total = hist.sum()
        acc_per_class = diag / (gt_sum + EPS)
        iou_per_class = diag / (gt_sum + pred_sum - diag + EPS)
        freq = gt_sum / total if total > 0 else np.zeros_like(gt_sum)
        return {
            "Total samples": self.total_samples,
            "Overall Acc": float(diag.sum() / total) if total > 0 else math.nan,
            "Mean Acc": _mean_or_nan(acc_per_class[present]),
            "FreqW Acc": float((freq[freq > 0] * iou_per_class[freq > 0]).sum()) if total > 0 else math.nan,
            "Mean IoU": _mean_or_nan(iou_per_class[present]),
            "Class IoU": _per_class(iou_per_class, present),
            "Class Acc": _per_class(acc_per_class, present),
            "Confusion Matrix": _row_normalised(hist),
        }

    @staticmethod
    def to_str(results):
        """Human-readable summary: scalar metrics, then per-class IoU and accuracy."""
        lines = [""]
        for key, value in results.items():
            if key not in ("Class IoU", "Class Acc", "Confusion Matrix"):
                lines.append(f"{key}: {value:f}" if isinstance(value, float) else f"{key}: {value}")
        for key in ("Class IoU", "Class Acc"):
            if key in results:
                lines.append(f"{key}:")
                lines += [f"\tclass {c}: {v}" for c, v in results[key].items()]
        return "\n".join(lines) + "\n"


def _as_long_tensor(labels, device=None):
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or numpy array, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must hold integers, got dtype {labels.dtype}")
    return labels.to(device=device if device is not None else labels.device, dtype=torch.long)


def _mean_or_nan(values):
    return float(values.mean()) if values.size else math.nan


def _per_class(values, present):
    return {c: float(v) if ok else math.nan for c, (v, ok) in enumerate(zip(values, present))}


def _row_normalised(hist):
    rows = hist.sum(axis=1, keepdims=True)
    return np.divide(hist, rows, out=np.zeros_like(hist), where=rows > 0)


def _iou_values(class_iou, n_seen):
    """IoUs of classes 0..n_seen-1 as floats; NaN for absent classes ("X"/"x"/NaN/None)."""
    if isinstance(class_iou, dict):
        values = [class_iou.get(c, math.nan) for c in range(n_seen)]
    else:
        values = list(class_iou)[:n_seen]
        if len(values) < n_seen:
            raise ValueError(f"class_iou has {len(values)} entries, n_seen={n_seen}")
    return np.array([math.nan if v is None or isinstance(v, str) else float(v) for v in values])


def _nanmean_or_nan(values):
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def harmonic_mean(a, b):
    """``2ab / (a + b)``: NaN when either is NaN, 0 when both are 0 (the limit of the formula)."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if a + b == 0:
        return 0.0
    return 2.0 * a * b / (a + b)


def summarize_step(class_iou, n_base, n_seen, hiou=False, old_without_background=False):
    """Paper-style summary of one step's per-class IoU.

    ``base`` = mean IoU over classes ``0..n_base-1`` (background counted among the base classes,
    as the SATS/PLOP tables and DKD's "old" do), ``new`` = mean over ``n_base..n_seen-1`` (NaN when
    there are none), ``all`` = mean over ``0..n_seen-1``. Means ignore classes absent from the
    ground truth (NaN or "X"), so ``all`` equals the step's Mean IoU. ``class_iou`` is a dict
    {class index: IoU} or a sequence, indexed in task order (the model's channel order).

    On request (the default keys stay base/new/all, which callers iterate):

    - ``hiou``: ``hIoU`` = ``2·base·new / (base + new)``, DKD's harmonic mean of old and new; NaN
      when ``new`` (step 0) or ``base`` is NaN.
    - ``old_without_background`` (MiB's and WILSON's tables, e.g. "1-15"): ``base_fg`` = mean over
      ``1..n_base-1`` and ``hIoU_fg`` = harmonic mean of ``base_fg`` and ``new``.
    """
    if not 1 <= n_base <= n_seen:
        raise ValueError(f"need 1 <= n_base <= n_seen, got n_base={n_base}, n_seen={n_seen}")
    values = _iou_values(class_iou, n_seen)
    summary = {
        "base": _nanmean_or_nan(values[:n_base]),
        "new": _nanmean_or_nan(values[n_base:n_seen]),
        "all": _nanmean_or_nan(values),
    }
    if hiou:
        summary["hIoU"] = harmonic_mean(summary["base"], summary["new"])
    if old_without_background:
        summary["base_fg"] = _nanmean_or_nan(values[1:n_base])
        summary["hIoU_fg"] = harmonic_mean(summary["base_fg"], summary["new"])
    return summary


def summary_labels(n_base, n_seen, hiou=False, old_without_background=False):
    """Column names for ``summarize_step``'s values as the papers print them, in the order of its
    keys (``SUMMARY_KEYS``): base, new, all, then ``"hIoU"`` with ``hiou``, then the foreground
    base classes and their hIoU with ``old_without_background``.

    ``summary_labels(16, 21) == ["0-15", "16-20", "all"]``; ``summary_labels(20, 21) == ["0-19",
    "20", "all"]``; with no new classes the middle name is "new";
    ``summary_labels(16, 21, hiou=True, old_without_background=True) == ["0-15", "16-20", "all",
    "hIoU", "1-15", "hIoU 1-15"]``.
    """
    if not 1 <= n_base <= n_seen:
        raise ValueError(f"need 1 <= n_base <= n_seen, got n_base={n_base}, n_seen={n_seen}")

    def span(first, last):
        return str(first) if first == last else f"{first}-{last}"

    new = span(n_base, n_seen - 1) if n_seen > n_base else "new"
    labels = [span(0, n_base - 1), new, "all"]
    if hiou:
        labels.append("hIoU")
    if old_without_background:
        foreground = span(1, n_base - 1) if n_base > 1 else "base fg"
        labels += [foreground, f"hIoU {foreground}"]
    return labels
