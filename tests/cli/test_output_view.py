"""What a person sees on a terminal while a step works in silence."""

from __future__ import annotations

import io
import re
import time

from rich.console import Console

from pipeline.cli.output import RichReporter


def test_the_spinner_counts_the_seconds_of_a_step_that_says_nothing() -> None:
    """During a long step with no progress events (a health wait), the terminal view's step and
    total times keep moving, refreshed by the spinner rather than by the next line."""
    screen = Console(file=io.StringIO(), force_terminal=True, width=100, highlight=False)
    reporter = RichReporter({"web": ["lab-1"]}, console=screen)
    try:
        reporter.line("web: lab-1: started web-1, checking health")
        time.sleep(1.2)
    finally:
        reporter.close([])
    shown = [
        float(t) for t in re.findall(r"\((\d+\.\d)s, \d+\.\ds total\)", screen.file.getvalue())
    ]
    assert shown and max(shown) >= 1.0, shown
