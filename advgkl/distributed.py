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
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import attacks
from .errors import UserError

__all__ = ["World", "current", "process_group", "launched", "env_rank", "local_batch_size", "autoattack",
           "sharded_autoattack", "NullLogger"]

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
        """Rank 0 runs the block first (e.g. a dataset download), then the others; one process: just run."""
        if self.is_main:
            yield
            self.barrier()
        else:
            self.barrier()
            yield

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
    """
    owned = False
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
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or _PEER_LOST.search(str(e))):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        limit = f"{timeout_s:g} s, " if owned else ""
        raise UserError(f"{world} lost contact with the other processes ({first}); another rank failed (its "
                        f"error is in the log above) or hung (timeout: {limit}runtime.dist_timeout_s)") from e
    if owned:  # only after success: tearing down NCCL while a peer is stuck can itself hang
        dist.destroy_process_group()


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


# ------------------------------------------------------------------------------- sharded AutoAttack
def autoattack(aa: "attacks.AutoAttack", x: torch.Tensor, y: torch.Tensor) -> "attacks.AutoAttackResult":
    """``aa(x, y)`` in one process; ``sharded_autoattack`` when a process group is running."""
    world = current()
    return sharded_autoattack(aa, x, y, world) if world.distributed else aa(x, y)


def sharded_autoattack(aa: "attacks.AutoAttack", x: torch.Tensor, y: torch.Tensor,
                       world: World | None = None) -> "attacks.AutoAttackResult":
    """``aa(x, y)`` with its chunks spread over the ranks; every rank returns the same, merged result.

    AutoAttack splits the points still robust when an attack starts into chunks of ``aa.batch_size``
    and seeds every chunk alike, so a point's outcome depends on its chunk. Splitting the *points* into
    fixed shards would give the first attack the single-process chunks but not the later ones (their
    chunks are cut from the robust set that the first attack left). So the ranks share the *chunks* of
    each attack instead: in round j rank r attacks chunk ``j * size + r`` and an OR over ranks merges
    the broken points; after every round all ranks hold the single-process state, and per-point
    results equal ``aa(x, y)`` exactly. Rank 0 alone reads and writes ``aa.state_path``, in the same
    format as ``aa(x, y)``: a killed job resumes with any number of processes, or with one.
    ``x``, ``y``: the same [N, C, H, W] floats in [0, 1] and [N] labels on every rank.
    """
    from pyautoattack import checks
    from tqdm.auto import tqdm

    world = world or current()
    aa._check_inputs(x, y)
    t0 = time.time()
    model, dev, n, bs = aa.model, aa.device, x.shape[0], aa.batch_size
    x = x.detach().float()
    save = aa._save if world.is_main else (lambda state: None)
    with contextlib.ExitStack() as stack:  # the same set-up as AutoAttack.__call__
        stack.enter_context(attacks.eval_mode(model))
        stack.enter_context(attacks._fp32_frozen(model, aa.allow_tf32))
        stack.enter_context(torch.autocast(dev.type, enabled=False))
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []))

        n_classes = model(x[:1].to(dev)).shape[-1]
        if int(y.min()) < 0 or int(y.max()) >= n_classes:
            raise UserError(f"labels must lie in [0, {n_classes - 1}] (the model has {n_classes} outputs); "
                            f"got [{int(y.min())}, {int(y.max())}]")
        state, error = None, None
        if world.is_main:
            try:
                state = aa._load_state(aa._fingerprint(x, y))
            except UserError as e:
                error = e
        world.agree(error)
        state = world.broadcast(state)
        if state is None:
            state = {"format": attacks._STATE_FORMAT, "fingerprint": aa._fingerprint(x, y), "clean_correct": None,
                     "robust": None, "broken_by": None, "per_attack": {}, "current": None,
                     "start_robust": None, "chunks_done": 0, "done": [], "wall_time_s": 0.0}
        wall_before = state["wall_time_s"]
        pa = aa.pyautoattack(n_classes)
        yc = y.cpu()

        if state["clean_correct"] is None:
            if world.is_main:  # pyautoattack's sanity warnings, once
                chunk0 = x[:bs].to(dev)
                checks.check_randomized(model, chunk0, y[:bs].to(dev), bs=bs, logger=pa.logger)
                checks.check_range_output(model, chunk0, logger=pa.logger)
            clean = torch.zeros(n, dtype=torch.bool)
            for c, i in enumerate(range(0, n, bs)):
                if c % world.size == world.rank:
                    clean[i:i + bs] = model(x[i:i + bs].to(dev)).max(dim=1)[1].cpu() == yc[i:i + bs]
            clean = world.any(clean)
            state.update(clean_correct=clean, robust=clean.clone(),
                         broken_by=torch.where(clean, -1, 0).to(torch.int8))
            state["per_attack"]["clean"] = clean.sum().item() / n
            save(state)
        robust, broken_by = state["robust"], state["broken_by"]

        bar = tqdm(total=len(aa.attacks), desc="AutoAttack", unit="attack", disable=not (aa.progress and world.is_main))
        for k, name in enumerate(aa.attacks):
            if name in state["per_attack"]:
                bar.update(1)
                continue
            if state["current"] != name:
                state.update(current=name, start_robust=robust.clone(), chunks_done=0)
            chunks = state["start_robust"].nonzero().flatten().split(bs)
            for first in range(state["chunks_done"], len(chunks), world.size):
                c = first + world.rank
                broken = torch.zeros(n, dtype=torch.bool)
                if c < len(chunks):
                    idx = chunks[c]
                    adv = attacks._run_attack(pa, name, x[idx].to(dev), y[idx].to(dev))
                    broken[idx[model(adv).max(dim=1)[1].cpu() != yc[idx]]] = True
                broken = world.any(broken)
                robust[broken] = False
                broken_by[broken] = k + 1
                done = min(first + world.size, len(chunks))
                state["done"] += [[name, j] for j in range(first, done)]
                state.update(chunks_done=done, wall_time_s=wall_before + time.time() - t0)
                save(state)
                bar.set_postfix_str(f"{name} chunk {done}/{len(chunks)} robust {robust.float().mean():.2%}")
            state["per_attack"][name] = robust.sum().item() / n
            state.update(current=None, start_robust=None, chunks_done=0, wall_time_s=wall_before + time.time() - t0)
            save(state)
            bar.update(1)
        bar.close()
        if world.is_main:
            checks.check_square_sr(state["per_attack"], logger=pa.logger)

    per_attack = {"clean": state["per_attack"]["clean"]}
    per_attack.update({a: state["per_attack"][a] for a in aa.attacks})
    return attacks.AutoAttackResult(
        clean_acc=per_attack["clean"], robust_acc=robust.sum().item() / n, per_attack_robust_acc=per_attack,
        n_examples=n, version=aa.label, attacks=list(aa.attacks), eps=aa.eps, norm=aa.norm,
        clean_correct=state["clean_correct"].clone(), robust_correct=robust.clone(),
        wall_time_s=state["wall_time_s"], broken_by=broken_by.clone())
