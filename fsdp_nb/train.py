"""`Trainer`: one training loop for a single process, FSDP1 and FSDP2.

The same code runs in a `%%fsdp` cell (the session already made the process
group), in a plain script, and under torchrun (RANK / WORLD_SIZE / LOCAL_RANK
in the environment: the Trainer makes the process group itself).

One optimizer step, and why each part is there:
1. every rank takes its rows of the step's global batch (`fsdp_nb.data`): on a
   2-D (replicate, shard) mesh too, where all R·S ranks are data parallel; with
   tensor parallelism the T ranks of a TP group take the same rows (rank // T);
2. the rows are cut into `grad_accum_steps` micro-batches; gradients are only
   reduced across ranks on the last one (FSDP1 `no_sync()`, FSDP2
   `set_requires_gradient_sync(False)`), since reducing earlier is wasted traffic;
3. the gradient norm is clipped over the *whole* model: FSDP1's
   `clip_grad_norm_` and FSDP2's DTensor grads both all-reduce the shard norms
   (within one shard group on a 2-D mesh: each of its rows holds the whole model);
4. AdamW steps on the local shards only (it was built after sharding).
Each micro-batch loss is a mean over its rows, divided by the number of
micro-batches, and FSDP averages over ranks: the gradient is the full-batch
gradient, so a run matches one process on the whole batch.

Rank-0 side effects (progress, printed lines) go through `Trainer._report` only.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from fsdp_nb.data import ByteBlocks, ShardedBatches, check_batch_split
from fsdp_nb.layout.memory import memory_of
from fsdp_nb.model_forms import choose_form, compute_loss
from fsdp_nb.optim import clip_sharded_grads, lr_at, make_adamw
from fsdp_nb.rank import events
from fsdp_nb.sharding import fsdp_version_of
from fsdp_nb.tensor_parallel import data_parallel_rank
from fsdp_nb.validate import is_int

if TYPE_CHECKING:
    from fsdp_nb.config import FSDPConfig

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train: steps, batch, optimizer, schedule, evaluation."""

    steps: int = 100
    """Number of optimizer steps."""
    global_batch_size: int = 8
    """Rows per optimizer step summed over all ranks and micro-batches."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; gradients are reduced on the last one only."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr: float = 0.0
    """Learning rate the cosine schedule decays to at the last step."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr/warmup_steps to lr."""
    schedule: str = "cosine"
    """After warm-up: 'cosine' (decay to min_lr) or 'constant'."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to every trainable parameter (FSDP1's flat
    parameters cannot be told apart by shape, so there is a single group)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    clip_norm: float | None = None
    """Clip the global gradient norm to this value; None records the norm without clipping."""
    eval_interval: int = 0
    """Evaluate on the validation data every this many steps and after the last; 0 never."""
    eval_batches: int = 2
    """Global batches of validation data per evaluation."""
    seed: int = 0
    """Seed of the data order (and of the model in `cli_train`)."""
    log_interval: int = 1
    """Print (or emit) a progress line every this many steps (and at the last); 0 never."""

    def __post_init__(self):
        for name in ("steps", "global_batch_size", "grad_accum_steps", "eval_batches"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"TrainConfig: {name}={value!r} must be an int >= 1")
        for name in ("warmup_steps", "eval_interval", "seed", "log_interval"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"TrainConfig: {name}={value!r} must be an int >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig: schedule={self.schedule!r}; accepted: {SCHEDULES}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"TrainConfig: need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"TrainConfig: clip_norm={self.clip_norm!r} must be > 0 or None")
        object.__setattr__(self, "betas", tuple(self.betas))


def init_distributed() -> tuple[int, int]:
    """(rank, world_size). Uses the existing process group (a session rank), makes one
    from torchrun's environment variables, or returns (0, 1) for a plain process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


class Trainer:
    """Trains a model on `(x, y)` batches: `model(x, y) -> (logits, loss)`, a Hugging Face causal LM
    (`model(input_ids=..., labels=...).loss`), or any model with `loss_fn=fn`, `fn(model, (x, y)) -> loss`
    (`fsdp_nb.model_forms`: an explicit `loss_fn` wins, then a Transformers model, then `(x, y)`).

    `Trainer(model, data, TrainConfig(...), fsdp=FSDPConfig(...))` shards the
    model first (see `fsdp_nb.shard`) and builds AdamW afterwards, from the
    sharded parameters. Without `fsdp`, `model` is used as given: a plain module
    in a single process, or a model you sharded yourself. `fit()` returns the
    history: one dict per step with loss (the global-batch mean, identical on
    every rank), lr, grad_norm, step_time_s, tokens_per_s and this rank's memory
    (`fsdp_nb.inspect.memory_of`). `name` labels the run's curve in the notebook,
    so runs from several cells overlay in one live plot.

    Checkpoints: with `checkpoint_dir`, every `checkpoint_every` steps (and after the
    last) the model, the optimizer and the history go to `checkpoint_dir/step-NNNNNN`
    (`async_checkpoint=True` writes them in the background). `resume_from` (a
    checkpoint, or a directory of them: the latest is taken) restores all three
    before the first step, so `fit()` carries on where that run stopped.
    """

    def __init__(
        self,
        model: nn.Module,
        data: ByteBlocks,
        config: TrainConfig,
        *,
        fsdp: FSDPConfig | None = None,
        val_data: ByteBlocks | None = None,
        mesh=None,
        name: str | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        resume_from: str | os.PathLike | None = None,
        async_checkpoint: bool = False,
        loss_fn: Callable | None = None,
    ):
        if not (isinstance(checkpoint_every, int) and checkpoint_every >= 0) or isinstance(checkpoint_every, bool):
            raise ValueError(f"Trainer: checkpoint_every={checkpoint_every!r} must be an int >= 0 (steps; 0: never)")
        if checkpoint_every and checkpoint_dir is None:
            raise ValueError("Trainer: checkpoint_every needs checkpoint_dir, the directory to write checkpoints to")
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.async_checkpoint = async_checkpoint
        self.config = config
        self.name = name  # labels this run's curve in the notebook's live plot
        self.form = choose_form(model, loss_fn)  # on the model as given: sharding wraps it
        self.loss_fn = loss_fn
        self.rank, self.world_size = init_distributed()
        self.master_process = self.rank == 0  # gates every rank-0 side effect, in _report
        # TP peers compute one model together and take the same rows [Note: TP ranks]
        tp = fsdp.tp_size if fsdp is not None else 1
        self.dp_rank, self.dp_world_size = data_parallel_rank(self.rank, self.world_size, tp)
        check_batch_split(config.global_batch_size, self.dp_world_size, config.grad_accum_steps)
        if fsdp is not None:
            from fsdp_nb.sharding import compute_device, shard

            self.device = compute_device()
            model = shard(model, fsdp, mesh=mesh)
        elif self.world_size > 1 and not (fsdp_version_of(model) or _is_ddp(model)):
            raise ValueError(
                f"Trainer: world_size={self.world_size} but the model is neither sharded nor "
                "DDP-wrapped, so ranks would train apart; pass fsdp=FSDPConfig(...)"
            )
        else:
            self.device = next(model.parameters()).device
        self.model = model
        self.fsdp_version = fsdp_version_of(model)
        # AdamW after sharding, from the sharded parameters [Note: stale optimizers]
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_adamw(trainable, config)
        split = dict(
            global_batch_size=config.global_batch_size,
            rank=self.dp_rank,
            world_size=self.dp_world_size,
            seed=config.seed,
        )
        self.train_batches = ShardedBatches(data, **split)
        self.val_batches = ShardedBatches(val_data, shuffle=False, **split) if val_data is not None else None
        self.history: list[dict] = []
        self._memory = None  # this rank's parameter, gradient and optimizer bytes, read after the first step
        if resume_from is not None:
            self.resume(resume_from)

    # ---- checkpoints -------------------------------------------------------------

    def resume(self, path: str | os.PathLike) -> None:
        """Load model, optimizer and history from a checkpoint (or the latest in a directory of them)."""
        from fsdp_nb.checkpoint import load_checkpoint, resolve

        manifest = load_checkpoint(self.model, self.optimizer, resolve(path))
        self.history = list(manifest.extra.get("trainer", {}).get("history", []))

    def save(self, path: str | os.PathLike):
        """Save model, optimizer and history to `path` (an AsyncCheckpoint with `async_checkpoint=True`)."""
        from fsdp_nb.checkpoint import save_checkpoint

        extra = {"trainer": {"step": len(self.history), "history": self.history}}
        return save_checkpoint(self.model, self.optimizer, path, async_save=self.async_checkpoint, extra=extra)

    def _maybe_checkpoint(self, step: int) -> None:
        every, last = self.checkpoint_every, step == self.config.steps
        if self.checkpoint_dir is not None and ((every and step % every == 0) or (last and every)):
            self.save(os.path.join(self.checkpoint_dir, f"step-{step:06d}"))

    # ---- one optimizer step ----------------------------------------------------

    def _sync_gradients(self, last_micro_step: bool):
        """Context for one micro-step's backward: reduce gradients only on the last."""
        if self.fsdp_version == 2:
            self.model.set_requires_gradient_sync(last_micro_step)
        if (self.fsdp_version == 1 or _is_ddp(self.model)) and not last_micro_step:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _clip(self) -> float:
        """Global gradient norm before clipping (clips when `clip_norm` is set)."""
        max_norm = self.config.clip_norm or float("inf")
        if self.fsdp_version == 1:
            return float(self.model.clip_grad_norm_(max_norm))  # all-reduces the flat shards' norms
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.fsdp_version == 2:
            return clip_sharded_grads([p.grad for p in params], max_norm)
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return float(value)

    def train_step(self, step: int) -> dict:
        """One optimizer step on global batch `step` (0-based); returns its record."""
        cfg = self.config
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        self.model.train()
        x, y = self.train_batches.batch(step, self.device)  # (b, T) rows of this rank
        loss_sum = torch.zeros((), device=self.device)
        for k, (xm, ym) in enumerate(zip(x.chunk(cfg.grad_accum_steps), y.chunk(cfg.grad_accum_steps))):
            with self._sync_gradients(last_micro_step=k == cfg.grad_accum_steps - 1):
                loss = compute_loss(self.form, self.model, xm, ym, self.loss_fn)  # mean over this micro-batch
                (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach().float() / cfg.grad_accum_steps
        grad_norm = self._clip()
        self.optimizer.step()
        mean_loss = self._mean_over_ranks(loss_sum)  # the global-batch loss; waits for every rank
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if self._memory is None:  # the sizes do not change from step to step; reading them costs ~5 ms
            self._memory = memory_of(self.model, self.optimizer)  # before zero_grad frees the grads
        memory = self._memory
        self.optimizer.zero_grad(set_to_none=True)
        tokens = cfg.global_batch_size * x.shape[1]
        return {
            "step": step + 1,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time_s": elapsed,
            "tokens_per_s": tokens / elapsed,
            # this rank's storages (padding included); the rest of the model lives elsewhere
            "param_bytes": memory.params.total,
            "grad_bytes": memory.grads.total,
            "optim_bytes": memory.optimizer.total,
            "padding_bytes": memory.params.padding,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over `eval_batches` global batches of the validation data."""
        if self.val_batches is None:
            raise ValueError("Trainer.evaluate: no val_data was given")
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for k in range(self.config.eval_batches):
            x, y = self.val_batches.batch(k, self.device)  # (b, T)
            total += compute_loss(self.form, self.model, x, y, self.loss_fn).float()
        return self._mean_over_ranks(total / self.config.eval_batches)

    def fit(self) -> list[dict]:
        """Run the remaining steps; returns (and keeps in `self.history`) one record per step."""
        cfg = self.config
        for step in range(len(self.history), cfg.steps):
            record = self.train_step(step)
            last = step + 1 == cfg.steps
            if cfg.eval_interval and self.val_batches is not None and ((step + 1) % cfg.eval_interval == 0 or last):
                record["val_loss"] = self.evaluate()
            self.history.append(record)
            self._report(record)
            self._maybe_checkpoint(step + 1)
        if self.async_checkpoint:
            from fsdp_nb.checkpoint import wait_pending

            wait_pending()  # the run is over only when its last checkpoint is on disk
        return self.history

    def _report(self, record: dict) -> None:
        """The single place for rank-0 side effects: notebook events, or a printed line."""
        if not self.master_process:
            return
        step, total = record["step"], self.config.steps
        every = self.config.log_interval
        if not every or (step % every and step != total):
            return
        mem_mb = (record["param_bytes"] + record["grad_bytes"] + record["optim_bytes"]) / 2**20
        metrics = {k: record[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s") if k in record}
        if "val_loss" in record:
            metrics["val_loss"] = record["val_loss"]
        if events.emit("progress", step=step, total=total, desc="train"):
            events.emit("metrics", step=step, mem_mb=mem_mb, **metrics, **({"run": self.name} if self.name else {}))
            return
        val = f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        bar = "#" * (20 * step // total) + "." * (20 - 20 * step // total)  # a plain bar, one line per report
        print(
            f"[{bar}] step {step:>{len(str(total))}}/{total} loss {record['loss']:.4f}{val} "
            f"lr {record['lr']:.2e} grad_norm {record['grad_norm']:.3f} "
            f"{record['tokens_per_s']:,.0f} tok/s rank0 mem {mem_mb:.2f} MB",
            flush=True,
        )
