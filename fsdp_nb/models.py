"""Models used by the tutorials and tests.

`Layer` is the seed's module: three `nn.Linear` layers whose default sizes make
a clear picture of how FSDP1 and FSDP2 cut parameters across ranks.
"""
from __future__ import annotations

import torch
from torch import nn


class Layer(nn.Module):
    """Three Linear layers: `l1 (d_in -> d_hidden)`, `l2 (d_hidden -> d_hidden)`, `l3 (d_hidden -> d_out)`.

    The defaults `Linear(4, 6)`, `Linear(6, 6)`, `Linear(6, 3)` hold 30 + 42 + 21 = 93
    elements: odd, so FSDP1 must pad, and `l3.weight` has 3 rows, so FSDP2's
    row split is uneven on 2 ranks.
    """

    def __init__(self, d_in: int = 4, d_hidden: int = 6, d_out: int = 3, *, bias: bool = True):
        super().__init__()
        for name, value in (("d_in", d_in), ("d_hidden", d_hidden), ("d_out", d_out)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Layer: {name}={value!r} must be a positive int")
        self.l1 = nn.Linear(d_in, d_hidden, bias=bias)
        self.l2 = nn.Linear(d_hidden, d_hidden, bias=bias)
        self.l3 = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, d_in)
        x = torch.relu(self.l1(x))  # (B, d_hidden)
        x = torch.relu(self.l2(x))  # (B, d_hidden)
        return self.l3(x)  # (B, d_out)
