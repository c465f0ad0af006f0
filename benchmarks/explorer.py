"""How long one explorer redraw takes, against baselines measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/explorer.py [--changes 50]

A "change" sets one widget the way a user would (slider step, checkbox, version);
the explorer's observer recomputes both layouts, draws the figure and serializes
it to the SVG the notebook shows. Baselines: the bare layout computation, and an
figure of the same size with two empty panels, serialized the same way. The goal is < 100 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

from matplotlib.figure import Figure

from fsdp_nb.layout import fsdp1_layout, fsdp2_layout
from fsdp_nb.viz.explorer import FIGURE_INCHES, Explorer, ExplorerSettings, layer_specs, svg_markup


def changes(n: int):
    """A deterministic walk over the controls: (control name, value) pairs."""
    steps = [
        ("world_size", 4),
        ("d_hidden", 7),
        ("freeze_l1", True),
        ("use_orig_params", True),
        ("world_size", 8),
        ("l2_bf16", True),
        ("fsdp2_per_layer", False),
        ("d_out", 2),
        ("version", "1"),
        ("version", "2"),
        ("version", "both"),
        ("world_size", 3),
        ("freeze_l1", False),
        ("l2_bf16", False),
        ("d_in", 9),
        ("world_size", 2),
        ("d_hidden", 6),
        ("use_orig_params", False),
        ("fsdp2_per_layer", True),
        ("d_out", 3),
    ]
    return [steps[i % len(steps)] for i in range(n)]


def median_ms(fn, n: int) -> float:
    times = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=50)
    n = parser.parse_args().changes

    explorer = Explorer()
    walk = changes(n)

    def change(i):
        name, value = walk[i]
        explorer.controls[name].value = value  # the observer redraws synchronously

    redraw = median_ms(change, n)
    specs = layer_specs(ExplorerSettings())
    layout = median_ms(lambda i: (fsdp1_layout(specs, 1 + i % 8), fsdp2_layout(specs, 1 + i % 8)), n)

    def empty_axes(i):
        fig = Figure(figsize=FIGURE_INCHES)
        for k in range(2):  # the explorer's two panels, drawing nothing
            fig.add_axes((0.5 * k + 0.1, 0.03, 0.39, 0.82)).set_axis_off()
        svg_markup(fig)

    empty = median_ms(empty_axes, n)
    print(f"explorer redraw: median {redraw:.1f} ms over {n} changes (goal < 100 ms)")
    print(f"  baseline two empty panels to SVG: {empty:.1f} ms -> redraw is {redraw / empty:.1f}x")
    print(f"  baseline both layouts alone:     {layout:.3f} ms -> redraw is {redraw / layout:.0f}x")


if __name__ == "__main__":
    main()
