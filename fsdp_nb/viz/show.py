"""Showing fsdp_nb's figures: in a notebook as PNG, in a terminal as their repr.

fsdp_nb's figures are plain matplotlib `Figure` objects, with no pyplot state, so
nothing is left open and a figure made on a rank or in the kernel looks the same.
"""

from __future__ import annotations


def show_figure(fig) -> None:
    """Show a matplotlib Figure made in the kernel (not pyplot-managed, so nothing is left open)."""
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is not None:
            display(fig)
            return
    except ImportError:
        pass
    print(repr(fig))


def register_figure_formatter(shell=None) -> None:
    """Let the notebook render matplotlib Figures as PNG without pyplot or `%matplotlib inline`.

    fsdp_nb's figures are plain `Figure` objects (no global pyplot state); IPython only
    knows how to show those once an inline backend registered a formatter.
    """
    try:
        from IPython import get_ipython
        from matplotlib.figure import Figure
    except ImportError:
        return
    shell = shell or get_ipython()
    if shell is None:
        return
    png = shell.display_formatter.formatters["image/png"]
    try:
        png.lookup_by_type(Figure)
        return  # an inline backend already handles figures
    except KeyError:
        pass

    def to_png(fig):
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()

    png.for_type(Figure, to_png)
