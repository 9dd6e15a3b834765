"""Plots and the Markdown report of a run: what the compression bought, and what it cost per task."""

from .markdown import write_report
from .plots import plot_metric_vs_macs, plot_width_trajectory, plot_widths

__all__ = ["plot_metric_vs_macs", "plot_width_trajectory", "plot_widths", "write_report"]
