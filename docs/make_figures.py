"""Draw the README's picture from the code: `make figures` writes docs/fsdp1_vs_fsdp2.png.

The seed's three-Linear `Layer` on 2 ranks, FSDP1's FlatParameter above FSDP2's row
shards, from the pure layout model (checked against torch for world sizes 1 to 8);
no process is started.
"""

from pathlib import Path

from fsdp_nb.layout import fsdp1_layout, fsdp2_layout, specs_of
from fsdp_nb.models import Layer
from fsdp_nb.viz import plot_comparison

OUT = Path(__file__).resolve().parent / "fsdp1_vs_fsdp2.png"

if __name__ == "__main__":
    specs = specs_of(Layer())
    fig = plot_comparison(fsdp1_layout(specs, 2), fsdp2_layout(specs, 2))
    fig.suptitle("The seed's Layer (Linear 4-6, 6-6, 6-3) on 2 ranks: FSDP1 above, FSDP2 below", fontsize=10)
    fig.savefig(OUT, dpi=100, metadata={"Software": None})
    print(f"wrote {OUT.relative_to(Path.cwd()) if OUT.is_relative_to(Path.cwd()) else OUT}")
