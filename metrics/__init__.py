"""Segmentation metrics: streaming confusion matrix and paper-style old/new/all summaries."""

from .stream_metrics import StreamSegMetrics, summarize_step, summary_labels

__all__ = ["StreamSegMetrics", "summarize_step", "summary_labels"]
