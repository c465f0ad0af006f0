"""Checkpoints that say when their bytes are wrong, merges that read only the model, and warnings kept local.

- checksums: recorded at save, checked at load (on every rank at once), by `verify`
  and by `fsdp-nb verify`; older manifests without them still load;
- `merge_weights`: peak memory about one copy of the weights (measured in a fresh
  process), and on one rank of a live job without touching its process group;
- warnings: importing the package installs no filter; torch's chatter stays inside
  our calls, and a merge raises no warning at all.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from fsdp_nb import cli
from fsdp_nb.checkpoint import CheckpointError, inspect, load_checkpoint, merge_weights, save_checkpoint, verify
from fsdp_nb.checkpoint.quiet import CHATTER, quiet
from fsdp_nb.checkpoint.store import MANIFEST
from fsdp_nb.models import GPT, GPTConfig


def _quiet_output():
    from fsdp_nb.session.output import Silent

    return Silent()


def run(session, source: str) -> None:
    session.run(textwrap.dedent(source), output=_quiet_output()).raise_errors()


def flip_byte(file, inside: torch.Tensor | None = None) -> None:
    """Damage one byte of a file (in the middle of `inside`'s bytes, if given): the size stays, only a checksum
    can tell."""
    data = bytearray(file.read_bytes())
    start, length = 0, len(data)
    if inside is not None:
        raw = inside.contiguous().view(torch.uint8).numpy().tobytes()
        start, length = data.find(raw), len(raw)  # both formats store tensor bytes as they are
        assert start >= 0, f"{file.name} does not hold the tensor's bytes"
    data[start + length // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def small_checkpoint(path, kind="SHARDED_STATE_DICT"):
    model = GPT(GPTConfig.debug(), seed=0)
    save_checkpoint(model, None, path, state_dict_type=kind)
    return model


# ---- checksums ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_the_manifest_records_the_sha256_of_every_file(tmp_path, kind):
    small_checkpoint(tmp_path / "ck", kind)
    body = json.loads((tmp_path / "ck" / MANIFEST).read_text())
    files = sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name != MANIFEST)
    assert sorted(body["sha256"]) == sorted(body["files"]) == files
    for name in files:
        assert body["sha256"][name] == hashlib.sha256((tmp_path / "ck" / name).read_bytes()).hexdigest(), name
    manifest = verify(tmp_path / "ck")
    assert manifest.sha256 == body["sha256"] and manifest.files == body["files"]


@pytest.mark.parametrize("kind, damaged", [("SHARDED_STATE_DICT", "__0_0.distcp"), ("FULL_STATE_DICT", "full.pt")])
def test_a_damaged_byte_stops_load_verify_and_merge_in_one_line_naming_the_file(tmp_path, capsys, kind, damaged):
    model = small_checkpoint(tmp_path / "ck", kind)
    flip_byte(tmp_path / "ck" / damaged, inside=model.blocks[0].mlp.fc.weight.detach())
    inspect(tmp_path / "ck")  # same size: the size check alone cannot see it
    calls = [
        lambda: load_checkpoint(GPT(GPTConfig.debug(), seed=1), None, tmp_path / "ck"),
        lambda: verify(tmp_path / "ck"),
        lambda: merge_weights(tmp_path / "ck", tmp_path / "merged"),
    ]
    for call in calls:
        with pytest.raises(CheckpointError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"checkpoint {tmp_path / 'ck'} is damaged: {damaged} does not match") and (
            "\n" not in message
        )
    assert not (tmp_path / "merged").exists()
    code = cli.main(["verify", str(tmp_path / "ck")])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "") and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"fsdp-nb: error: checkpoint {tmp_path / 'ck'} is damaged: {damaged} does not match")
    # verify=False reads the bytes as they are: the load goes through, and the damage shows in the weights.
    other = GPT(GPTConfig.debug(), seed=1)
    load_checkpoint(other, None, tmp_path / "ck", verify=False)
    same = [torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values())]
    assert not all(same) and sum(same) >= len(same) - 2  # the one damaged tensor (and its tied twin) differ


def test_fsdp_nb_verify_says_ok_in_one_line_and_names_a_missing_file(tmp_path, capsys):
    small_checkpoint(tmp_path / "ck")
    code = cli.main(["verify", str(tmp_path / "ck")])
    out, err = capsys.readouterr()
    sizes = json.loads((tmp_path / "ck" / MANIFEST).read_text())["files"]
    assert (code, err) == (0, "") and out.count("\n") == 1
    assert out.startswith(f"ok: {tmp_path / 'ck'}: 2 files, {sum(sizes.values())} bytes, checksums match, ")
    (tmp_path / "ck" / "__0_0.distcp").unlink()
    code = cli.main(["verify", str(tmp_path / "ck")])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.strip().endswith("incomplete or damaged: __0_0.distcp is missing")
    (tmp_path / "ck" / MANIFEST).write_text(json.dumps({"format": "fsdp_nb.checkpoint", "files": []}))
    code = cli.main(["verify", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert code == 2 and f"checkpoint {tmp_path / 'ck'} has a damaged {MANIFEST}" in err and err.count("\n") == 1


def test_a_manifest_from_before_checksums_still_loads_by_size(tmp_path, capsys):
    model = small_checkpoint(tmp_path / "old")
    body = json.loads((tmp_path / "old" / MANIFEST).read_text())
    del body["sha256"]  # what every save wrote before checksums
    (tmp_path / "old" / MANIFEST).write_text(json.dumps(body))
    fresh = GPT(GPTConfig.debug(), seed=1)
    manifest = load_checkpoint(fresh, None, tmp_path / "old")
    assert manifest.sha256 == {} and manifest.files == body["files"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert cli.main(["verify", str(tmp_path / "old")]) == 0
    assert "sizes match (saved without checksums)" in capsys.readouterr().out
    truncated = tmp_path / "old" / "__0_0.distcp"
    truncated.write_bytes(truncated.read_bytes()[:-1])  # sizes are still checked
    with pytest.raises(CheckpointError, match="incomplete or damaged: __0_0.distcp is"):
        load_checkpoint(fresh, None, tmp_path / "old")


def test_publication_syncs_the_temporary_directory_and_the_parent_after_each_rename(tmp_path, monkeypatch):
    from fsdp_nb.checkpoint import store

    events = []
    rename = type(tmp_path).rename

    def renamed(self, to):
        if self.parent == tmp_path:  # a checkpoint directory (DCP renames files inside the temporary one too)
            events.append(("rename", self.name))
        return rename(self, to)

    monkeypatch.setattr(store, "sync_dir", lambda d: events.append(("sync", d.name)))
    monkeypatch.setattr(type(tmp_path), "rename", renamed)
    for _ in range(2):  # the second save replaces the first: two renames
        events.clear()
        small_checkpoint(tmp_path / "ck")
    tmp = events[0][1]
    assert tmp.startswith(".ck.tmp-")
    parent = tmp_path.name
    assert events == [("sync", tmp), ("rename", "ck"), ("sync", parent), ("rename", tmp), ("sync", parent)]
    monkeypatch.undo()
    store.sync_dir(tmp_path)  # the real one, on a real directory: no error


@pytest.mark.timeout(120)
def test_a_damaged_file_raises_the_same_error_on_every_rank_at_once(session, tmp_path):
    """Rank 1 hashes __0_0.distcp (files are split across ranks): rank 0 must raise its finding too, and no rank
    may be left inside a collective: the next collective works."""
    session.push(root=str(tmp_path))
    run(
        session,
        """
        import time, torch
        from fsdp_nb import FSDPConfig, shard, save_checkpoint, load_checkpoint
        from fsdp_nb.models import GPT, GPTConfig
        model = shard(GPT(GPTConfig.debug(), seed=0), FSDPConfig(fsdp_version=2))
        opt = torch.optim.AdamW(model.parameters())
        for kind in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
            save_checkpoint(model, opt, f"{root}/{kind}", state_dict_type=kind)
        """,
    )
    for kind, damaged in (("SHARDED_STATE_DICT", "__0_0.distcp"), ("FULL_STATE_DICT", "full.pt")):
        flip_byte(tmp_path / kind / damaged)
    run(
        session,
        """
        errors, seconds = {}, {}
        for kind in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
            start = time.perf_counter()
            try:
                load_checkpoint(model, opt, f"{root}/{kind}")
            except Exception as e:
                errors[kind] = f"{type(e).__name__}: {e}"
            seconds[kind] = time.perf_counter() - start
        ones = torch.ones(1)
        dist.all_reduce(ones)  # every rank left the load's collectives: this one matches up
        after = ones.item()
        """,
    )
    errors, seconds = session.eval("errors"), session.eval("seconds")
    assert errors[0] == errors[1] and session.eval("after") == [2.0, 2.0]
    for kind, damaged in (("SHARDED_STATE_DICT", "__0_0.distcp"), ("FULL_STATE_DICT", "full.pt")):
        assert errors[0][kind].startswith(f"CheckpointError: checkpoint {tmp_path / kind} is damaged: {damaged}")
        assert max(s[kind] for s in seconds) < 20  # at once: nobody waited for a process-group timeout


# ---- merge_weights --------------------------------------------------------------------------------------------

PEAK = """
import resource, sys
import torch, torch.distributed.checkpoint, safetensors.torch  # imported before the baseline: not the merge's cost
from fsdp_nb.checkpoint import merge_weights

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))  # KiB

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident size, to what is resident now
    before, peak = status("VmRSS:"), lambda: status("VmHWM:")
except OSError:  # no clear_refs: the peak so far, in a process that has only imported
    before, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, None
merge_weights(sys.argv[1], sys.argv[2], safe_serialization=sys.argv[3] == "safetensors")
after = peak() if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory):
    """A GPT of ~49 MiB of weights with AdamW state (3x the weights in all), saved both ways."""
    root = tmp_path_factory.mktemp("big")
    model = GPT(GPTConfig(block_size=64, n_layer=4, n_head=8, n_embd=512, vocab_size=256), seed=0)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, 256, (1, 64))
    model(x, x)[1].backward()
    opt.step()  # AdamW state exists: the files hold 3x the weights
    for kind in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        save_checkpoint(model, opt, root / kind, state_dict_type=kind)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return root, weights


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "kind, form",
    [("SHARDED_STATE_DICT", "safetensors"), ("FULL_STATE_DICT", "safetensors"), ("FULL_STATE_DICT", "bin")],
)
def test_merge_peak_memory_is_about_one_copy_of_the_weights(big_checkpoints, tmp_path, kind, form):
    root, weights = big_checkpoints
    model_bytes = sum(v.numel() * v.element_size() for v in weights.values())
    files = sum(p.stat().st_size for p in (root / kind).iterdir())
    assert files > 2.9 * model_bytes  # the optimizer state is there to be (not) read
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(root / kind), str(tmp_path / "out"), form],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peak = int(done.stdout.split()[-1])
    print(f"{kind} {form}: peak {peak / 2**20:.1f} MiB above baseline, model {model_bytes / 2**20:.1f} MiB")
    assert peak <= 1.5 * model_bytes, f"peak {peak / 2**20:.1f} MiB for {model_bytes / 2**20:.1f} MiB of weights"
    if form == "safetensors":
        from safetensors.torch import load_file

        merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    else:
        merged = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    assert sorted(merged) == sorted(weights)
    for key, value in weights.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.timeout(120)
def test_merge_on_one_rank_of_a_live_job_leaves_its_process_group_alone(session, tmp_path):
    """`if rank == 0: merge_weights(...)` while rank 1 idles: done in seconds, no warning, exact weights."""
    session.push(root=str(tmp_path))
    run(
        session,
        """
        import threading, warnings, torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from fsdp_nb import FSDPConfig, shard, save_checkpoint, merge_weights
        from fsdp_nb.models import GPT, GPTConfig
        config = FSDPConfig(fsdp_version=1, use_orig_params=False, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
        model = shard(GPT(GPTConfig.debug(), seed=4), config)  # FSDP1: ShardedTensors, flat params, tied weights
        opt = torch.optim.AdamW(model.parameters())
        save_checkpoint(model, opt, f"{root}/sharded")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
            expected = {k: v.clone() for k, v in expected.items()}
        """,
    )
    run(
        session,
        """
        finished, caught = None, []
        if rank == 0:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                worker = threading.Thread(target=merge_weights, args=(f"{root}/sharded", f"{root}/merged"))
                worker.start()
                worker.join(30)  # the wall limit: a merge waiting on rank 1 would still be inside a collective
            finished = not worker.is_alive()
            caught = [f"{w.category.__name__}: {w.message}" for w in caught]
        """,
    )
    finished, caught = session.eval("finished")[0], session.eval("caught")[0]
    if not finished:
        session.restart()  # rank 0 is stuck in a collective that rank 1 never joins
        pytest.fail("merge_weights on rank 0 alone did not finish in 30 s")
    assert caught == []
    run(session, "ones = torch.ones(1); dist.all_reduce(ones)")  # the job's process group still matches up
    assert session.eval("ones.item()") == [2.0, 2.0]
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    expected = session.eval("expected")[0]
    assert sorted(merged) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=0, msg=key)
    GPT(GPTConfig.debug(), seed=0).load_state_dict(merged, strict=True)  # a plain model takes it as it is


# ---- warnings -------------------------------------------------------------------------------------------------


def test_importing_the_checkpoint_package_installs_no_warning_filter():
    code = textwrap.dedent("""
        import sys, warnings
        import torch, torch.distributed.checkpoint, torch.distributed.checkpoint.state_dict, torch.distributed.fsdp
        before, loaded = list(warnings.filters), set(sys.modules)  # torch's own filters are torch's business
        import fsdp_nb.checkpoint
        assert {m.split(".")[0] for m in set(sys.modules) - loaded} == {"fsdp_nb"}, "imports beyond fsdp_nb"
        print(len(warnings.filters) - len(before), warnings.filters == before)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["0", "True"]


def test_quiet_hides_torch_chatter_only_and_only_inside():
    before = list(warnings.filters)
    chatter = [
        "Please use DTensor instead and we are deprecating ShardedTensor.",
        "Multiple backends are registered with this ProcessGroup. We cannot determine the device",
        "`_get_pg_default_device` will be deprecated, it only stays for backward-compatiblity reason.",
        "FSDP.state_dict_type() and FSDP.set_state_dict_type() are being deprecated.",
        "TypedStorage is deprecated. It will be removed in the future and UntypedStorage will be the only storage",
    ]
    assert len(chatter) == len(CHATTER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet():
            for message in chatter:
                warnings.warn(message, UserWarning, stacklevel=1)
            warnings.warn("torch.distributed is unavailable or uninitialized", UserWarning, stacklevel=1)
        warnings.warn(chatter[0], FutureWarning, stacklevel=1)  # outside: the user's own code sees it
    assert [str(w.message) for w in caught] == ["torch.distributed is unavailable or uninitialized", chatter[0]]
    assert warnings.filters == before


@pytest.mark.timeout(120)
def test_fsdp1_save_and_load_keep_torch_chatter_inside_and_filters_unchanged(session, tmp_path):
    session.push(root=str(tmp_path))
    run(
        session,
        """
        import warnings, torch
        from fsdp_nb import FSDPConfig, shard, save_checkpoint, load_checkpoint
        from fsdp_nb.models import GPT, GPTConfig
        config = FSDPConfig(fsdp_version=1, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
        model = shard(GPT(GPTConfig.debug(), seed=0), config)
        opt = torch.optim.AdamW(model.parameters())
        before = list(warnings.filters)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for kind in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
                save_checkpoint(model, opt, f"{root}/{kind}", state_dict_type=kind)
                load_checkpoint(model, opt, f"{root}/{kind}")
            inside = list(warnings.filters)
            warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning)
        seen = [str(w.message) for w in caught]
        unchanged = warnings.filters == before and inside[0][0] == "always"
        """,
    )
    for seen in session.eval("seen"):
        assert seen == ["Please use DTensor instead and we are deprecating ShardedTensor."]  # the user's own only
    assert session.eval("unchanged") == [True, True]
