"""Source text that tests run on the ranks, shared by several test files."""

# Calls every reduce-scatter FSDP makes on this torch go through `on_reduce_scatter(input)`:
# torch 2.13 on call `dist.reduce_scatter_single`, 2.11 `dist.reduce_scatter_tensor` (in 2.13 a
# deprecated name that forwards inside torch, not through `dist`, so nothing is counted twice).
# `unpatch_reduce_scatter()` puts torch's own functions back.
PATCH_REDUCE_SCATTER = """
import torch.distributed as dist
_rs_originals = {n: getattr(dist, n) for n in ("reduce_scatter_single", "reduce_scatter_tensor") if hasattr(dist, n)}
def _rs_patched(name):
    def call(output, input, *args, **kwargs):
        on_reduce_scatter(input)
        return _rs_originals[name](output, input, *args, **kwargs)
    return call
def patch_reduce_scatter():
    for name in _rs_originals:
        setattr(dist, name, _rs_patched(name))
def unpatch_reduce_scatter():
    for name, fn in _rs_originals.items():
        setattr(dist, name, fn)
"""
