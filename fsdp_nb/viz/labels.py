"""Labels that stay readable: text drawn only where it fits, and legends sized to the figure.

Figures are read in a notebook's output area, about 950 px wide (see `AREA_INCHES`). A
label that would not fit its box is better left out than drawn over its neighbours or
cut off at the axes' edge: `FitText` picks, at every draw, the first of its forms that
fits inside its box, or draws nothing. The choice is made at draw time because only
then is the axes' final size known (constrained layout moves axes after they are drawn into).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.font_manager import FontProperties
from matplotlib.text import Text
from matplotlib.textpath import text_to_path
from matplotlib.transforms import Bbox, offset_copy

AREA_INCHES = 9.5
"""A notebook's output area: ~950 px, at the 100 dpi that figures are shown at."""
LABEL_PT = 7.0
"""The smallest text fsdp_nb draws: 7 pt is 9.7 px at 100 dpi, or in an SVG 9.5 in wide shown at 950 px."""


class FitText(Text):
    """A label that must lie inside `box` (x, y, width, height in data coordinates) and inside its axes.

    `forms` are (text, rotation) pairs, best first; each draw shows the first that fits,
    or nothing. After a draw, `get_text()` is what was drawn ("" for nothing).
    The label is centred in its box, or with `above` stands on the box's floor (a value over a bar).
    It stays out of layout computations: it never makes room for itself.
    """

    def __init__(
        self,
        ax: Axes,
        box: tuple[float, float, float, float],
        forms: Sequence[tuple[str, float]],
        *,
        above: bool = False,
        **kwargs,
    ):
        x0, y0, width, height = box
        kwargs.setdefault("fontsize", LABEL_PT)
        super().__init__(
            x0 + width / 2,
            y0 if above else y0 + height / 2,  # `above`: standing on the box's floor (height may be math.inf)
            forms[0][0],
            horizontalalignment="center",
            verticalalignment="bottom" if above else "center",
            **kwargs,
        )
        self.box = box
        self.forms = tuple(forms)
        self.set_in_layout(False)
        self.set_clip_on(False)  # it fits inside the axes, or is not drawn: nothing is left to clip
        if above:  # lifted clear of the floor by more than the breathing space `_room` keeps
            self.set_transform(offset_copy(ax.transData, ax.figure, y=2, units="points"))
        ax.add_artist(self)

    def _room(self) -> Bbox | None:
        """The box in display coordinates, cut to the axes, less a point of breathing space (and the white ground)."""
        x0, y0, width, height = self.box
        corners = self.axes.transData.transform([(x0, y0), (x0 + width, min(y0 + height, max(self.axes.get_ylim())))])
        room = Bbox.intersection(Bbox(corners), self.axes.bbox)
        if room is None:
            return None
        ground = self.get_bbox_patch()  # a white ground reaches `pad` beyond the text
        pad = 1.0 + (ground.get_boxstyle().pad * self.get_fontsize() if ground is not None else 0.0)  # points
        return room.padded(-pad * self.axes.figure.dpi / 72)

    def choose(self, renderer) -> str:
        """Set the first form that fits and return its text ("" if none does)."""
        callback, self.stale_callback = self.stale_callback, None  # choosing is part of drawing, not a change
        try:
            room = self._room()
            px = self.get_fontsize() * self.axes.figure.dpi / 72
            if room is not None and min(room.width, room.height) >= px:  # no form is thinner than a line
                for text, rotation in self.forms:
                    # Forms far too big by the font's metrics are skipped without laying them out (the redraw's
                    # cost); the renderer's extent has the last word on the others.
                    width, height = _size_em(text)
                    if rotation:
                        width, height = height, width
                    if width * px > 1.05 * room.width or height * px > 1.05 * room.height:
                        continue
                    self.set_text(text)
                    self.set_rotation(rotation)
                    extent = self.get_window_extent(renderer)
                    if room.x0 <= extent.x0 and extent.x1 <= room.x1 and room.y0 <= extent.y0 and extent.y1 <= room.y1:
                        return text
            self.set_text("")
            return ""
        finally:
            self.stale_callback = callback

    def draw(self, renderer):
        if self.get_visible() and self.choose(renderer):
            super().draw(renderer)


@functools.lru_cache(maxsize=4096)
def _size_em(text: str) -> tuple[float, float]:
    """(width, height) of upright text in ems (font sizes): the widest line, and lines 1.2 em apart."""
    lines = text.split("\n")
    return max(text_width_pt(line, 100.0) for line in lines) / 100.0, 1.2 * (len(lines) - 1) + 1.0


def text_width_pt(text: str, fontsize: float) -> float:
    """Width of one line of text in points, in matplotlib's default font (no renderer needed)."""
    width, _, _ = text_to_path.get_text_width_height_descent(text, FontProperties(size=fontsize), ismath=False)
    return width


def legend_grid(labels: Sequence[str], width_in: float, fontsize: float = LABEL_PT) -> tuple[int, float]:
    """(columns, height in inches) of a frameless legend of `labels` spread across `width_in`.

    Each entry is matplotlib's default handle (2 em), gap (0.8 em) and text, with 2 em between columns.
    """
    em = fontsize
    entry = 2.0 * em + 0.8 * em + max(text_width_pt(t, fontsize) for t in labels) + 2.0 * em
    columns = max(1, min(len(labels), int((width_in * 72 - 2 * em) // entry)))
    rows = math.ceil(len(labels) / columns)
    return columns, (rows * 1.2 * em + (rows - 1) * 0.5 * em + 2 * 0.4 * em) / 72 + 0.1
