"""Segmentation metrics: streaming confusion matrix and paper-style old/new/all summaries."""

from .stream_metrics import SUMMARY_KEYS, StreamSegMetrics, harmonic_mean, summarize_step, summary_labels

__all__ = ["StreamSegMetrics", "summarize_step", "summary_labels", "harmonic_mean", "SUMMARY_KEYS"]
