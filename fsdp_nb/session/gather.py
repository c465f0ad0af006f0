"""Kernel-side reads of live sharded modules in a session: layouts and memory per rank, step traces.

Each rank reads what torch built on that rank (`fsdp_nb.layout.inspect`), the results travel
back as small dataclasses, and the kernel merges them: a layout whose every shard was
read from torch on its own rank.
"""

from __future__ import annotations

from fsdp_nb.layout import Fsdp1Layout, Fsdp2Layout, fsdp1_layout, fsdp2_layout
from fsdp_nb.session.errors import SessionError
from fsdp_nb.session.results import rank_list

_INSPECT = "__import__('fsdp_nb.inspect', fromlist=['inspect'])"  # the public path of layout_of, memory_of


def _check_name(name: str) -> str:
    if not name or not all(part.isidentifier() for part in name.split(".")):
        raise SessionError(
            f"{name!r} is not a variable name; give the name of a sharded module on the ranks, e.g. %fsdp_layout model"
        )
    return name


def _eval(session, expr: str, name: str) -> list:
    result = session.run(expr, output=_silent(), record=False)
    if result.errors:
        missing = [
            r for r, e in result.errors if e.type in ("NameError", "AttributeError") and name.split(".")[0] in e.message
        ]
        if missing:
            raise SessionError(
                f"{rank_list(missing)} {'has' if len(missing) == 1 else 'have'} no {name!r}; "
                "build and shard it in a %%fsdp cell first"
            )
        rank, err = result.errors[0]
        raise SessionError(f"reading {name!r} on rank {rank} failed: {err.headline()}")
    return result.raise_errors().values


def _silent():
    from fsdp_nb.session.output import Silent

    return Silent()


def layout(session, name: str) -> Fsdp1Layout | Fsdp2Layout:
    """The real layout of the sharded module `name`, every rank's shard read on that rank."""
    from fsdp_nb.layout.inspect import merge_observed

    per_rank = _eval(session, f"{_INSPECT}.layout_of({_check_name(name)})", name)
    return merge_observed(per_rank)


def memory(session, name: str, optimizer: str | None = None) -> list:
    """Real bytes of parameters, gradients (and `optimizer` state) on every rank, as MemoryReports."""
    opt = _check_name(optimizer) if optimizer else "None"
    return _eval(session, f"{_INSPECT}.memory_of({_check_name(name)}, {opt})", name)


def comparison(session, name: str, *, use_orig_params: bool = False) -> tuple[Fsdp1Layout | None, Fsdp2Layout]:
    """(FSDP1, FSDP2) layouts for the module `name`: its own version read from the ranks, the other modelled.

    Under tensor parallelism FSDP1 has no counterpart (`FSDP1_HAS_NO_TP`): the first is None.
    """
    real = layout(session, name)
    if isinstance(real, Fsdp2Layout) and real.tp > 1:
        return None, real
    if isinstance(real, Fsdp1Layout):
        return real, fsdp2_layout(real.params, real.world_size, dp_replicate=real.dp_replicate)
    return fsdp1_layout(
        real.params, real.world_size, use_orig_params=use_orig_params, dp_replicate=real.dp_replicate
    ), real


def trace(session, name: str, *, steps: int = 1, model: str | None = None, label: str | None = None):
    """Trace `steps` steps of the Trainer (or step callable) `name` on the ranks; the Trace, from rank 0.

    A step that raises comes back as a RankError with the rank's traceback; the
    recorder is off again on every rank either way.
    """
    from fsdp_nb.session.output import Silent

    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise SessionError(f"steps={steps!r} is not valid: give a whole number >= 1, e.g. --steps 2")
    target, model_arg = _check_name(name), f", model={_check_name(model)}" if model else ""
    code = (
        f"__import__('fsdp_nb.trace', fromlist=['trace']).trace_step({target}, steps={steps}{model_arg}, "
        f"label={label or name!r})"
    )
    result = session.run(code, output=Silent(), record=False)
    missing = [r for r, e in result.errors if e.type == "NameError" and name.split(".")[0] in e.message]
    if missing:
        raise SessionError(
            f"{rank_list(missing)} {'has' if len(missing) == 1 else 'have'} no {name!r}; "
            "make a Trainer (or a function that runs one step) in a %%fsdp cell first"
        )
    bad = [e for _, e in result.errors if e.type in ("ValueError", "TypeError") and "trace_step" in e.message]
    if bad:
        raise SessionError(bad[0].message)
    return result.raise_errors().values[0]
