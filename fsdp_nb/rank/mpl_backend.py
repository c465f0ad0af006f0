"""A matplotlib backend for ranks: plt.show() sends each open figure to the notebook.

Ranks set MPLBACKEND=module://fsdp_nb.rank.mpl_backend, so pyplot needs no change in user code.
Rendering is Agg's; only show() differs.
"""

from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg as FigureCanvas  # noqa: F401

FigureManager = FigureManagerBase


def show(*args, **kwargs) -> None:
    import matplotlib.pyplot as plt

    from fsdp_nb.rank.worker import display

    for num in plt.get_fignums():
        display(plt.figure(num))
    plt.close("all")
