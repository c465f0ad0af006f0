"""One door for torch internals: `fsdp_nb/_torch.py` names every private torch symbol, nothing else does.

1. An AST scan of every other module refuses private torch imports (`torch.x._y`,
   `from torch... import _z`), private attributes (`obj._name`) that fsdp_nb does not
   define itself, and the same names spelled as strings (`getattr(obj, "_name")`).
2. Real FSDP1 and FSDP2 modules, built on torch's fake process group in this process,
   hold every attribute `_torch.SYMBOLS` lists, and every accessor of `_torch` works
   on them: a torch release that renames one fails here, naming it.
3. A renamed name is reported as such: symbol, purpose and supported range, one line.
"""

from __future__ import annotations

import ast
import contextlib
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fsdp_nb import _torch as T
from fsdp_nb.models import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fsdp_nb"
DOOR = PACKAGE / "_torch.py"
# Private names of the standard library and of IPython's display protocol, not of torch.
NOT_TORCH = {"_exit", "_getframe", "_repr_mimebundle_", "_asdict", "_replace", "_fields", "_current_frames"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != DOOR)


def _own_private_names() -> set[str]:
    """Every `_name` fsdp_nb defines itself: functions, classes, module variables, attributes, modules."""
    names = {p.stem for p in PACKAGE.rglob("_*.py")}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
        for match in re.finditer(r"__slots__ = \(([^)]*)\)", path.read_text()):
            names.update(re.findall(r'"(_\w+)"', match.group(1)))
    return {n for n in names if _private(n)}


def violations(path: Path, own: set[str]) -> list[str]:
    """Private torch names used in `path`, as `file:line: what`."""
    found = []
    tree = ast.parse(path.read_text())
    where = path.relative_to(ROOT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch" and any(_private(p) for p in alias.name.split(".")):
                    found.append(f"{where}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            if any(_private(p) for p in node.module.split(".")):
                found.append(f"{where}:{node.lineno}: from {node.module} import ...")
            found += [f"{where}:{node.lineno}: import {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own | NOT_TORCH:
            found.append(f"{where}:{node.lineno}: .{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
            and node.args[1].value not in own | NOT_TORCH
        ):
            found.append(f"{where}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_no_module_but_the_door_names_a_private_torch_symbol():
    own = _own_private_names()
    found = [v for path in _modules() for v in violations(path, own)]
    assert found == [], "private torch names outside fsdp_nb/_torch.py:\n" + "\n".join(found)


def test_the_scan_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch.distributed.fsdp._flat_param\n"
        "from torch.distributed.fsdp import _runtime_utils\n"
        "from torch.distributed._shard import sharded_tensor\n"
        "x = flat._fqns\n"
        "y = getattr(flat, '_shard_param_infos')\n"
        "z = self._mine\n"
    )
    bad = bad.rename(ROOT / "tests" / ".scan_probe.py")
    try:
        found = violations(bad, own={"_mine"})
    finally:
        bad.unlink()
    assert [f.split(": ", 1)[1] for f in found] == [
        "import torch.distributed.fsdp._flat_param",
        "import _runtime_utils",
        "from torch.distributed._shard import ...",
        "._fqns",
        "getattr(..., '_shard_param_infos')",
    ]


def test_every_private_name_the_door_uses_is_listed_with_a_reason():
    listed = " ".join(s.name for s in T.SYMBOLS)
    tree = ast.parse(DOOR.read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _private(n.attr)}
    used |= {
        part
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("torch.")
        for part in re.findall(r"\w+", n.value)
        if _private(part)
    }
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert sorted(u for u in used - defined if u not in listed) == []
    assert all(s.why for s in T.SYMBOLS)


def test_the_supported_range_is_the_one_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_spec = next(d for d in deps if re.match(r"torch\b", d))
    assert torch_spec.replace(" ", "") == "torch" + T.SUPPORTED_TORCH


# ---- the symbols exist on real modules ---------------------------------------------------


@contextlib.contextmanager
def fake_pg(world_size: int = 2):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized(), "a process group leaked from an earlier test"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fsdp1_objects(use_orig_params: bool) -> dict[str, object]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from fsdp_nb.models import Block

    model = FSDP(
        GPT(GPTConfig.debug()),
        device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy({Block}),
        use_orig_params=use_orig_params,
    )
    x = torch.randint(0, 256, (2, 8))
    model(x, x)[1].backward()  # lazy init: some attributes exist only from the first forward
    handle = T.fsdp1_handles(model)["blocks.0"]
    return {"model": model, "fsdp1_handle": handle, "fsdp1_flat": handle.flat_param, "fsdp1_root": model}


def fsdp2_objects() -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = GPT(GPTConfig.debug())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randint(0, 256, (2, 8))
    model(x, x)[1].backward()
    group = T.fsdp2_group(model.blocks[0])
    return {
        "model": model,
        "fsdp2_module": model.blocks[0],
        "fsdp2_state": model.blocks[0]._get_fsdp_state(),
        "fsdp2_group": group,
        "fsdp2_param": group.fsdp_params[0],
    }


def test_every_listed_symbol_exists_on_real_fsdp1_and_fsdp2_modules():
    with fake_pg():
        objects = {**fsdp1_objects(use_orig_params=False), **fsdp2_objects()}
        objects["fsdp1_flat_orig"] = fsdp1_objects(use_orig_params=True)["fsdp1_flat"]
        missing = []
        for symbol in T.SYMBOLS:
            if symbol.on == "torch":
                try:
                    T.resolve(symbol.name)
                except T.TorchInternalsError:
                    missing.append(symbol.name)
            elif not hasattr(objects[symbol.on], symbol.name.rsplit(".", 1)[1]):
                missing.append(symbol.name)
        assert missing == [], f"torch {torch.__version__} lacks {missing}"


def test_every_accessor_works_on_real_modules():
    with fake_pg():
        one = fsdp1_objects(use_orig_params=True)
        info = T.flat_info(one["fsdp1_handle"])
        assert info.names[0] == "ln_1.weight" and info.world_size == 2 and info.use_orig_params
        assert sum(p.stop - p.start for p in info.pieces if p is not None) <= info.local_numel
        assert T.fsdp1_gathered_bytes(one["fsdp1_handle"]) >= 0
        assert T.fsdp1_root_handle(one["model"]) is not None
        assert T.fsdp1_unit_module(one["fsdp1_handle"]) is one["model"].blocks[0].module
        two = fsdp2_objects()
        params = T.fsdp2_params(two["fsdp2_group"])
        assert [p.param_name for p in params][:2] == ["weight", "bias"] and params[0].shard_world == 2
        assert T.fsdp2_group_name(two["fsdp2_group"]) == "blocks.0"
        assert T.fsdp2_gathered_bytes(two["fsdp2_group"]) >= 0
        module, _ = T.functional_collective_functions()
        result = module.all_reduce(torch.ones(3), "sum", dist.group.WORLD)  # async: waited at first use
        pending = T.functional_pending(result)
        assert torch.is_tensor(pending) and pending.shape == (3,) and module.wait_tensor(pending) is not None
    for version in (1, 2):
        assert all(callable(getattr(owner, name)) for owner, name, _ in T.unit_entry_points(version))
    kinds = {kind for *_, kind in T.collective_functions()}
    assert kinds == {"all_gather", "reduce_scatter", "all_reduce"}
    module, functional = T.functional_collective_functions()
    assert {kind for _, kind in functional} == {"all_gather", "reduce_scatter", "all_reduce"}
    assert all(callable(getattr(module, name)) for name, _ in functional) and callable(module.wait_tensor)
    assert T.functional_pending(torch.ones(1)) is None  # a plain tensor: nothing left to wait for
    wrapped = T.checkpoint_wrapper(nn.Linear(2, 2))
    assert T.clean_name(next(n for n, _ in wrapped.named_parameters())) == "weight"
    assert T.in_backward() is False
    assert T.redistribute_logger() is T.resolve("torch.distributed.tensor._redistribute.logger")  # the same logger


def test_the_wrapper_names_are_torchs_own():
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    checkpointed = T.checkpoint_wrapper(nn.Linear(2, 2))
    compiled_prefix = "_orig_mod"  # torch.compile's OptimizedModule keeps the module under this name
    assert set(T.WRAPPER_NAMES) == {FSDP_WRAPPED_MODULE, next(iter(checkpointed._modules)), compiled_prefix}
    assert T.clean_name("blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module._orig_mod.ln.weight") == (
        "blocks.0.ln.weight"
    )
    assert T.clean_name("_fsdp_wrapped_module") == ""


def test_a_renamed_symbol_is_named_with_the_supported_range(monkeypatch):
    class Handle:  # what a future torch's FlatParamHandle might look like
        flat_param = object()
        _use_orig_params = False

    with pytest.raises(T.TorchInternalsError) as raised:
        T.flat_info(Handle())
    message = str(raised.value)
    assert "FlatParameter metadata" in message and T.SUPPORTED_TORCH in message and "\n" not in message
    with pytest.raises(T.TorchInternalsError, match=r"torch\.distributed\.fsdp\._nope"):
        T.resolve("torch.distributed.fsdp._nope.thing")
