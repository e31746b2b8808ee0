"""The report: a static HTML page with PNG figures of a run's outputs.

- :func:`run_report` (``rayscreen report CONFIG``, ``jobs/report.py``): reads what the
  stages wrote under ``<output>`` and writes ``<output>/report/index.html``.
- :mod:`.figures`: pure figure functions on arrays / DataFrames (matplotlib, no display).
- :mod:`.html`: the page, from sections of text, tables and figure references.
"""

from .html import FigureRef, Section, render_page
from .run import ReportError, run_report

__all__ = ["run_report", "ReportError", "render_page", "Section", "FigureRef"]
