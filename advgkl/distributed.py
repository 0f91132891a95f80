"""Several processes, one job: DistributedDataParallel training and sharded AutoAttack under torchrun.

    torchrun --nproc_per_node=8 -m advgkl train RECIPE.yaml          # docs/distributed.md for more

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) nothing here does anything: the World is
one process of rank 0 and every helper returns its input, so single-process runs are unchanged.

Choices a reader of the training loop needs (the why of each is in docs/distributed.md):
- Every rank draws the same global batch (same order, same augmentation) and keeps rows rank::size,
  so the loader position {epoch, batch} is one number for all ranks and resume stays exact.
- DDP wraps only the training-loss forwards. Attacks, AWP's proxy, validation and AutoAttack run the
  bare module, so no DDP hook sees their extra forwards. Two training forwards (natural and
  adversarial) before one backward need neither ``static_graph`` nor a concatenated forward: each
  parameter's gradient hook fires once per backward however often the parameter was used.
- Buffers (BatchNorm running statistics) are broadcast from rank 0 once per optimiser step instead of
  in every forward (DDP's default), so all ranks hold identical buffers whenever an attack or an
  evaluation reads them.
- Only rank 0 reads or writes the output folder; the others get what they need by broadcast.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .errors import UserError

__all__ = ["World", "current", "process_group", "launched", "env_rank", "local_batch_size", "NullLogger"]

# What gloo and NCCL say when a peer died or hung; turned into one readable line (see process_group).
_PEER_LOST = re.compile(r"gloo|nccl|connection (reset|closed)|timed out", re.IGNORECASE)


def launched() -> bool:
    """True inside a torchrun worker (its environment names this process's rank)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank from torchrun's environment (0 outside torchrun); valid before and after the group."""
    return int(os.environ.get("RANK", 0)) if launched() else 0


@dataclass(frozen=True)
class World:
    """This process's place in the job. ``World()`` is the single process; every method is then a no-op."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False  # a process group exists (torchrun, even with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"

    # ---------------------------------------------------------------------------------- set-up
    def device(self, device: torch.device) -> torch.device:
        """This rank's device: a resolved ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
        if not self.distributed or device.type != "cuda":
            return device
        if device.index is not None:
            raise UserError(f"runtime.device={device} names one GPU, but under torchrun every process uses its "
                            "own (cuda:LOCAL_RANK); use runtime.device=cuda or auto")
        return torch.device("cuda", self.local_rank)

    def convert_sync_bn(self, model: nn.Module, enabled: bool) -> nn.Module:
        """``runtime.sync_bn``: BatchNorm statistics over the global batch (a no-op in one process).

        The converted model keeps the state_dict keys of the plain one, so its checkpoints load into
        either. Training forwards need CUDA (torch has no CPU kernel); the trainer checks that.
        """
        if not enabled or not self.distributed:
            return model
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``model``, with buffers left to ``sync_buffers``."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        kw = {"device_ids": [self.local_rank]} if next(model.parameters()).is_cuda else {}
        # No buffer broadcast inside forward: it would run 2-3 times per step (nat, adv, AWP) and leave
        # the ranks' buffers different after the last forward; sync_buffers runs once after the step.
        names = inspect.signature(DDP).parameters
        kw["forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"] = False
        return DDP(model, **kw)

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. a dataset download), then the others; one process: just run.
        A ``UserError`` in rank 0's block ends every rank with its message instead of leaving them waiting."""
        if not self.is_main:
            self.agree(None)
            yield
            return
        error = None
        try:
            yield
        except UserError as e:
            error = e
        self.agree(error)

    # ----------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def agree(self, error: Exception | None) -> None:
        """Raise rank 0's ``UserError`` on every rank, so a refusal ends all processes instead of hanging them.

        Call on every rank; ``error`` only counts on rank 0 (the one that checked the output folder).
        """
        if self.size > 1:
            message = self.broadcast(str(error) if error is not None else None)
            if message is not None and not self.is_main:
                error = UserError(message)
        if error is not None:
            raise error

    def on_main(self, fn, *args):
        """``fn(*args)`` on rank 0 only (e.g. reading or claiming the output folder); its ``UserError``
        ends every rank (``agree``) and its result reaches every rank. Call on every rank."""
        value, error = None, None
        if self.is_main:
            try:
                value = fn(*args)
            except UserError as e:
                error = e
        self.agree(error)
        return self.broadcast(value)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (pickled; for checkpoints and small states, not per step)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj) -> list | None:
        """Every rank's ``obj`` as a list on rank 0 (``None`` elsewhere); ``[obj]`` in one process."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (epoch metrics)."""
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a bool tensor over ranks."""
        if self.size == 1:
            return mask
        flat = mask.to(torch.uint8)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        return flat.bool()

    def all_finite(self, value: torch.Tensor) -> bool:
        """True when ``value`` is finite on every rank, so a NaN on one rank stops all of them together."""
        ok = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
        if self.size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The global batch's rows [B, ...] in single-process order, from each rank's rows rank::size."""
        if self.size == 1:
            return t
        t = t.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t)
        return torch.stack(parts, dim=1).flatten(0, 1)  # row i of rank r is global row i * size + r

    @torch.no_grad()
    def average_gradients(self, module: nn.Module) -> None:
        """All-reduce-average the ``.grad`` of a module DDP does not wrap (AWP's proxy)."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if self.size == 1 or not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.size
        for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(avg)

    @torch.no_grad()
    def sync_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank, one flat broadcast per dtype."""
        if self.size == 1:
            return
        groups: dict = {}
        for b in module.buffers():
            groups.setdefault((b.dtype, b.device), []).append(b)
        for bufs in groups.values():
            flat = _flatten_dense_tensors(bufs)
            dist.broadcast(flat, src=0)
            for b, synced in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
                b.copy_(synced)


def current() -> World:
    """The World of the process group in use, or the single process when there is none."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)), True)
    return World()


@contextlib.contextmanager
def process_group(device: str = "auto", timeout_s: float = 1800):
    """Join torchrun's process group for the duration of a job; yields the ``World``.

    NCCL (plus gloo for CPU-side objects) when the job runs on CUDA, gloo on CPU. A collective that
    waits longer than ``timeout_s`` (a rank died or hangs) fails instead of hanging forever, and a lost
    peer becomes one ``UserError`` line. Outside torchrun this yields ``World()``; inside an existing
    group (tests that set one up) it uses that group and leaves it open.

    A group this function opened is closed before it returns whenever that is safe: after a success all ranks
    meet at a barrier (no collective still in flight anywhere), then destroy the group, which stops its
    threads. A group left for the interpreter's exit to clean up can have threads that still need the GIL
    after Python is gone (torch's destroy_process_group says as much), which aborts a finished rank
    (SIGABRT). After an error of this rank's own (a ``UserError``, a bug, Ctrl-C) a gloo group is destroyed
    without the barrier. A group whose peer died or hangs, and an NCCL group after any error, are left
    open: tearing them down can wait on work that never completes, and the job has failed anyway.
    """
    owned, cuda = False, False
    if dist.is_available() and dist.is_initialized():
        world = current()
    elif launched():
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)  # NCCL and object collectives use the current device
        # NCCL: on a timeout, abort the communicators and end the process instead of hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
        world, owned = World(rank, size, local_rank, True), True
    else:
        yield World()
        return
    try:
        yield world
    except BaseException as e:
        lost = isinstance(e, RuntimeError) and _peer_lost(e)
        if owned and not cuda and not lost:
            _destroy_quietly()
        if lost:
            raise _lost_contact(e, world, timeout_s if owned else None) from e
        raise
    if owned:
        try:
            dist.barrier()  # every rank is done: no collective still in flight towards this one
        except RuntimeError as e:
            if _peer_lost(e):
                raise _lost_contact(e, world, timeout_s) from e
            raise
        dist.destroy_process_group()


def _destroy_quietly() -> None:
    """Destroy the default group on an error path, where the error in flight is the one to report."""
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # a half-broken group: the original error matters more than this one
        pass


def _peer_lost(e: RuntimeError) -> bool:
    """What gloo and NCCL raise when a peer died or hung."""
    return isinstance(e, dist.DistError) or bool(_PEER_LOST.search(str(e)))


def _lost_contact(e: RuntimeError, world: World, timeout_s: float | None) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    limit = f"{timeout_s:g} s, " if timeout_s is not None else ""
    return UserError(f"{world} lost contact with the other processes ({first}); another rank failed (its "
                     f"error is in the log above) or hung (timeout: {limit}runtime.dist_timeout_s)")


def local_batch_size(global_batch_size: int, world: World) -> int:
    """Per-rank batch of the recipe's global ``data.batch_size``; it must split evenly over the ranks."""
    if global_batch_size % world.size:
        lo = global_batch_size // world.size * world.size
        hint = f"{lo} or {lo + world.size}" if lo else f"{world.size}"
        raise UserError(f"data.batch_size={global_batch_size} is the global batch and must be a multiple of the "
                        f"{world.size} processes (WORLD_SIZE); use e.g. {hint}")
    return global_batch_size // world.size


class NullLogger:
    """What ranks other than 0 log to: nothing, and no file in the output folder."""

    wandb_dir = None

    def log(self, record: dict, step: int | None = None) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def save_artifact(self, path, name: str, type: str = "results") -> None:
        pass

    def finish(self) -> None:
        pass
