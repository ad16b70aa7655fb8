"""FullSup: the upper bound — SupOnly's loss with every training sample labeled (ratio 1/1,
whatever ratio the run names), as the paper's fully supervised row."""
from __future__ import annotations

from typing import ClassVar

from semibench.methods.suponly import SupOnly
from semibench.registry import register_method


@register_method("fullsup")
class FullSup(SupOnly):
    display_name = "FullSup"
    report_rank = 1000
    in_paper = True
    colour = "#000000"
    fixed_ratio: ClassVar[int | None] = 1
