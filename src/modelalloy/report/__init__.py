"""The HTML report: one self-contained file with tables and embedded PNG plots."""

from modelalloy.report.html import Report
from modelalloy.report.render import render, write_report

__all__ = ["Report", "render", "write_report"]
