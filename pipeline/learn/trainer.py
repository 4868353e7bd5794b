"""The optimisation loop shared by bootstrap, the nightly warm start, the benchmark and DDP; device-agnostic, seeded.

Each epoch's order is drawn from a generator seeded by (seed, epoch), so a run resumed from a checkpoint at any
step replays exactly the batches an uninterrupted run would have seen. Under torch.distributed every rank walks
the same global batches and computes its strided share, with the loss scaled so the averaged gradient equals the
single-process one: the loss curve does not depend on the number of processes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn

from pipeline.learn import calibration
from pipeline.learn.calibration import Calibration
from pipeline.learn.checkpoint import Checkpointer, fingerprint
from pipeline.learn.holdout import split_by_time
from pipeline.learn.model import ModelBundle
from pipeline.logs import progress

log = logging.getLogger("flywheel.trainer")


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it (no loss scaling needed), else fp16 with a GradScaler; none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass(frozen=True)
class FitResult:
    epochs: int
    samples: int
    losses: list[float]
    device: str
    val_losses: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    steps: int = 0
    resumed_at_step: int = 0
    optimizer_restored: bool = False
    lr: float | None = None
    calibration: Calibration = field(default_factory=Calibration)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def restore_optimizer(opt: torch.optim.Optimizer, state: dict | None) -> bool:
    """Load a previous night's optimizer moments when they fit: same parameter list, and each moment either the
    parameter's shape or a prefix of it along dim 0 (an embedding table that grew: new rows start at zero)."""
    if not state or "state" not in state:
        return False
    params = [p for g in opt.param_groups for p in g["params"]]
    saved = state["state"]
    if set(saved) != set(range(len(params))):
        log.warning("optimizer state not restored: %d saved parameters, model has %d", len(saved), len(params))
        return False
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for i, p in enumerate(params):
        entry = {}
        for k, v in saved[i].items():
            if v.dim() == 0 or v.shape == p.shape:
                entry[k] = v.clone()
            elif v.dim() == p.dim() and v.shape[1:] == p.shape[1:] and v.shape[0] <= p.shape[0]:
                grown = torch.zeros(p.shape, dtype=v.dtype)
                grown[: v.shape[0]] = v
                entry[k] = grown
            else:
                log.warning("optimizer state not restored: parameter %d moment %s is %s, parameter is %s",
                            i, k, tuple(v.shape), tuple(p.shape))
                return False
        restored[i] = entry
    current = opt.state_dict()
    opt.load_state_dict({"state": restored, "param_groups": current["param_groups"]})
    return True


def _state_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _opt_cpu(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    return {"state": {i: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                      for i, s in sd["state"].items()},
            "param_groups": sd["param_groups"]}


@dataclass(frozen=True)
class Encoded:
    """Rows already turned into model inputs: what `encode_parquet` streams a lake file into."""

    cat: torch.Tensor
    num: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    @classmethod
    def of(cls, bundle: ModelBundle, frame: pd.DataFrame, label: str) -> Encoded:
        cat, num = bundle.encode(frame)
        return cls(cat, num, torch.from_numpy(frame[label].to_numpy(dtype=np.float32)))

    @classmethod
    def concat(cls, parts: list[Encoded], pin: bool = False) -> Encoded:
        """One tensor set from several, written straight into pinned memory when the rows go to a GPU."""
        out = []
        for k in ("cat", "num", "y"):
            tensors = [getattr(p, k) for p in parts]
            shape = (sum(len(t) for t in tensors), *tensors[0].shape[1:])
            out.append(torch.cat(tensors, out=torch.empty(shape, dtype=tensors[0].dtype, pin_memory=pin)))
        return cls(*out)


def encode_groups(bundle: ModelBundle, batches: Iterable[pa.RecordBatch], label: str, groups: list[np.ndarray],
                  *, pin: bool = False) -> list[Encoded]:
    """Encode record batches streamed in file order into one preallocated (optionally pinned) tensor set per
    group of row positions, each laid out in its group's order (e.g. the time order of a split): the rows land
    exactly where a sorted, split pandas frame would put them, without that frame ever existing. Rows in no
    group (a holdout) are skipped."""
    n = int(sum(len(g) for g in groups))
    total = int(max((g.max() for g in groups if len(g)), default=-1)) + 1
    group = np.full(total, -1, dtype=np.int16)
    slot = np.zeros(total, dtype=np.int64)
    for i, g in enumerate(groups):
        group[g], slot[g] = i, np.arange(len(g))
    out = [Encoded(torch.empty((len(g), len(bundle.categorical)), dtype=torch.int64, pin_memory=pin),
                   torch.empty((len(g), len(bundle.numeric)), dtype=torch.float32, pin_memory=pin),
                   torch.empty(len(g), dtype=torch.float32, pin_memory=pin)) for g in groups]
    at = filled = 0
    for batch in batches:
        k = batch.num_rows
        mine = group[at:at + k] if at < total else np.zeros(0, dtype=np.int16)
        at += k
        if not (mine >= 0).any():
            continue
        part = Encoded.of(bundle, batch.to_pandas(), label)
        for i, dest in enumerate(out):
            sel = np.flatnonzero(mine == i)
            if len(sel):
                rows = torch.from_numpy(slot[at - k + sel])
                idx = torch.from_numpy(sel)
                dest.cat[rows], dest.num[rows], dest.y[rows] = part.cat[idx], part.num[idx], part.y[idx]
                filled += len(sel)
    if filled != n:
        raise ValueError(f"streamed {at} rows but the split names {n} positions up to {total}: the partition "
                         "changed while it was being read")
    return out


def encode_parquet(bundle: ModelBundle, path: str | Path, label: str, *, batch_rows: int = 65_536,
                   filesystem=None, pin: bool = False) -> Encoded:
    """Stream a Parquet file record batch by record batch into preallocated (optionally pinned) tensors, so a
    large day never exists as one pandas frame of Python objects: peak extra memory is one record batch."""
    source = pq.ParquetFile(str(path), filesystem=filesystem)
    n = source.metadata.num_rows
    columns = [*bundle.categorical, *bundle.numeric, label]
    cat = torch.empty((n, len(bundle.categorical)), dtype=torch.int64, pin_memory=pin)
    num = torch.empty((n, len(bundle.numeric)), dtype=torch.float32, pin_memory=pin)
    y = torch.empty(n, dtype=torch.float32, pin_memory=pin)
    at = 0
    for batch in source.iter_batches(batch_size=batch_rows, columns=columns):
        part = batch.to_pandas()
        c, x = bundle.encode(part)
        k = len(part)
        cat[at:at + k], num[at:at + k] = c, x
        y[at:at + k] = torch.from_numpy(part[label].to_numpy(dtype=np.float32))
        at += k
    return Encoded(cat, num, y)


@dataclass
class LoopState:
    """Where a fit stands: what a checkpoint saves and a resume restores, whole. `batch` is the next batch of
    `epoch` to run and `total` the weighted loss of `epoch`'s batches so far; `best_state` holds the weights of
    the best validated epoch (kept when a later one is worse)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    total: float = 0.0
    losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int | None = None
    bad: int = 0
    best_state: dict[str, torch.Tensor] | None = None

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, saved: dict) -> LoopState:
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls)})


@dataclass
class _Loop:
    """The fixed parts of one fit: the rows as tensors, the network (and its DDP wrapper), the optimizer."""

    net: nn.Module
    model: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    device: torch.device
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    anchor_l2: float
    batch_size: int
    seed: int
    rank: int
    world: int

    def step(self, idx: torch.Tensor) -> float:
        """One optimizer step on the global batch `idx` (this rank's stride of it); returns its weighted loss."""
        w = self.rows[3]
        batch_weight = float(w[idx].sum()) or 1.0
        c, x, t, sw = (v[idx[self.rank::self.world]].to(self.device, non_blocking=True) for v in self.rows)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            logits = self.model(c, x, calibrated=False)
        per_row = nn.functional.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
        data_loss = (per_row * sw).sum() / batch_weight
        loss = data_loss * self.world
        if self.anchor:
            loss = loss + 0.5 * self.anchor_l2 * sum(((p - self.anchor[k]) ** 2).sum()
                                                     for k, p in self.net.named_parameters())
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        part = data_loss.detach()
        if self.world > 1:
            dist.all_reduce(part)
        return float(part) * batch_weight

    def epoch(self, state: LoopState, checkpointer: Checkpointer | None, job: str) -> None:
        """Run `state.epoch` from `state.batch` on (the order is a function of seed and epoch, so a resumed
        epoch continues with exactly the batches an uninterrupted one would have seen)."""
        self.model.train()
        n = len(self.rows[2])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + state.epoch))
        for b, begin in enumerate(range(0, n, self.batch_size)):
            if b < state.batch:
                continue
            state.total += self.step(order[begin:begin + self.batch_size])
            state.step, state.batch = state.step + 1, b + 1
            # Rank 0 writes the periodic checkpoints; a SIGTERM'd rank writes its own (after a step every rank
            # holds the same weights and loop state), since a preempted pod's workers need not include rank 0.
            if checkpointer is not None and checkpointer.due(state.step) \
                    and (self.rank == 0 or checkpointer.stop_requested):
                checkpointer.save(job, {**state.as_dict(), "net": _state_cpu(self.net), "opt": _opt_cpu(self.opt)})

    def close_epoch(self, state: LoopState, val_data: tuple[torch.Tensor, ...] | None, patience: int) -> bool:
        """Book the finished epoch (its mean loss, validation loss, best weights); True when training stops."""
        mean = state.total / float(self.rows[3].sum())
        if not math.isfinite(mean):
            raise FloatingPointError(f"training diverged at epoch {state.epoch}: loss {mean}")
        state.losses.append(mean)
        stop = False
        if val_data is not None:
            vl = _val_loss(self.net, val_data, self.device)
            state.val_losses.append(vl)
            if vl < state.best_loss - 1e-6:
                state.best_loss, state.best_epoch, state.bad, state.best_state = vl, state.epoch, 0, _state_cpu(self.net)
            else:
                state.bad += 1
                stop = patience > 0 and state.bad >= patience
        val = round(state.val_losses[-1], 5) if state.val_losses else None
        log.info("epoch %d done: loss %.4f on %d rows%s", state.epoch + 1, mean, len(self.rows[2]),
                 "" if val is None else f", validation loss {val:.4f}",
                 extra={"epoch": state.epoch, "loss": round(mean, 5), "rows": len(self.rows[2]), "val_loss": val})
        state.epoch, state.batch, state.total = state.epoch + 1, 0, 0.0
        return stop


def _tensors(bundle: ModelBundle, frame: pd.DataFrame | Encoded, label: str,
             sample_weight: np.ndarray | None) -> tuple[torch.Tensor, ...]:
    n = len(frame)
    weights = np.ones(n, dtype=np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
    if len(weights) != n:
        raise ValueError(f"sample_weight has {len(weights)} entries for {n} rows")
    if isinstance(frame, Encoded):
        cat, num, y = frame.cat, frame.num, frame.y
    else:
        cat, num = bundle.encode(frame)
        y = torch.from_numpy(frame[label].to_numpy(dtype=np.float32))
    return cat, num, y, torch.from_numpy(weights)


def fit(bundle: ModelBundle, frame: pd.DataFrame | Encoded, label: str, *, epochs: int, batch_size: int, lr: float,
        seed: int, device: torch.device | None = None, sample_weight: np.ndarray | None = None,
        valid: pd.DataFrame | Encoded | None = None, patience: int = 0, anchor_l2: float = 0.0,
        optimizer_state: dict | None = None, checkpointer: Checkpointer | None = None) -> FitResult:
    """Train `bundle.net` in place. With `valid` (a later time slice) the best epoch's weights are kept and
    training stops after `patience` epochs without gain; `anchor_l2` pulls weights toward where they started
    (the parent), limiting how far one night can move the model."""
    if len(frame) == 0:
        raise ValueError("refusing to train on zero rows")
    device = device or pick_device()
    rank, world = _distributed()
    rows = _tensors(bundle, frame, label, sample_weight)
    job = "" if checkpointer is None else fingerprint(
        start=bundle.weights_digest(), data=_data_digest(*rows), epochs=epochs, batch_size=batch_size,
        lr=lr, seed=seed, patience=patience, anchor=anchor_l2, world=world,
        valid=0 if valid is None else len(valid))
    torch.manual_seed(seed)
    bundle.net.calibration = Calibration()  # the weights are about to move: the old map no longer describes them
    net = bundle.net.to(device)
    model: nn.Module = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        rows = tuple(t if t.is_pinned() else t.pin_memory() for t in rows)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    restored = restore_optimizer(opt, optimizer_state)
    amp_dtype = autocast_dtype(device)
    loop = _Loop(net, model, opt, torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16), amp_dtype,
                 device, rows, {k: v.detach().clone() for k, v in net.named_parameters()} if anchor_l2 > 0 else {},
                 anchor_l2, batch_size, seed, rank, world)
    val_data = _encode_valid(bundle, valid, label) if valid is not None and len(valid) else None
    state = LoopState()
    saved = checkpointer.load(job) if checkpointer is not None else None
    if saved is not None:
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        state = LoopState.from_dict(saved)
    resumed_at = state.step
    with progress(epochs - state.epoch, "training epochs", shown=rank == 0) as step:
        while state.epoch < epochs:
            loop.epoch(state, checkpointer, job)
            stop = loop.close_epoch(state, val_data, patience)
            step(f"loss {state.losses[-1]:.4f}")
            if stop:
                break
    if state.best_state is not None and state.val_losses and state.val_losses[-1] > state.best_loss:
        net.load_state_dict(state.best_state)
    net.to("cpu")
    bundle.optimizer_state = _opt_cpu(opt)
    if checkpointer is not None and rank == 0:
        checkpointer.clear()
    n = len(rows[2])
    return FitResult(len(state.losses), n * len(state.losses), state.losses, device.type, state.val_losses,
                     state.best_epoch, state.step, resumed_at, restored, lr)


def _data_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(np.ascontiguousarray(t.numpy()))  # hashed in place: no copy of a large day's tensors
    return h.hexdigest()[:16]


def _encode_valid(bundle: ModelBundle, valid: pd.DataFrame | Encoded, label: str) -> tuple[torch.Tensor, ...]:
    v = valid if isinstance(valid, Encoded) else Encoded.of(bundle, valid, label)
    return v.cat, v.num, v.y


@torch.no_grad()
def _val_loss(net: nn.Module, data: tuple[torch.Tensor, ...], device: torch.device) -> float:
    net.eval()
    cat, num, y = (v.to(device) for v in data)
    return float(nn.functional.binary_cross_entropy_with_logits(net(cat, num, calibrated=False).float(), y))


def wants_validation(settings, rows: int) -> bool:
    """Whether a night keeps a time-latest validation slice for early stopping and the learning-rate choice."""
    return settings.training.validation_fraction > 0 and settings.training.early_stopping_patience > 0 and rows >= 20


def fit_increment(bundle: ModelBundle, new_rows: pd.DataFrame | Encoded, label: str, time_col: str, settings, *,
                  replay: pd.DataFrame | None = None, replay_weight: np.ndarray | None = None,
                  device: torch.device | None = None, checkpointer: Checkpointer | None = None,
                  valid: Encoded | None = None) -> FitResult:
    """One night's warm start: new rows (minus their time-latest validation slice) plus the replay sample, the
    parent's optimizer moments when they fit, early stopping on the slice. Shared by `train` and the bench.
    Rows already encoded (streamed from the lake by `train`) come split: `valid` is their validation slice."""
    s = settings
    fit_rows: pd.DataFrame | Encoded = new_rows
    if isinstance(new_rows, pd.DataFrame):
        if valid is not None:
            raise ValueError("`valid` is for rows encoded and split by the caller; a frame is split here")
        if wants_validation(s, len(new_rows)):
            fit_rows, valid = split_by_time(new_rows, time_col, s.training.validation_fraction)
    weights = np.ones(len(fit_rows), dtype=np.float32)
    frame: pd.DataFrame | Encoded = fit_rows
    if replay is not None and len(replay):
        extra = np.ones(len(replay), np.float32) if replay_weight is None else np.asarray(replay_weight, np.float32)
        weights = np.concatenate([weights, extra])
        if isinstance(fit_rows, Encoded):
            frame = Encoded.concat([fit_rows, Encoded.of(bundle, replay, label)],
                                   pin=device is not None and device.type == "cuda")
        else:
            cols = list(fit_rows.columns.intersection(replay.columns))
            frame = pd.concat([fit_rows[cols], replay[cols]], ignore_index=True)

    def attempt(target: ModelBundle, lr: float) -> FitResult:
        return fit(target, frame, label, epochs=s.training.epochs, batch_size=s.training.batch_size, lr=lr, seed=s.seed,
                   device=device, sample_weight=weights, valid=valid, patience=s.training.early_stopping_patience,
                   anchor_l2=s.training.anchor_l2, optimizer_state=bundle.optimizer_state, checkpointer=checkpointer)

    parent = bundle.net.calibration  # `fit` resets it: the weights are about to move
    candidates = list(dict.fromkeys(s.training.lr_candidates)) if valid is not None else []
    if len(candidates) < 2:
        result = attempt(bundle, candidates[0] if candidates else s.training.learning_rate)
        return dataclasses.replace(result, calibration=calibrate(bundle, valid, label, s, parent))
    # Each rate starts from the same parent; the one with the best validation loss is kept. Checkpoints are
    # bound to their rate, so a resumed night redoes finished candidates and resumes the interrupted one.
    tried = []
    for lr in candidates:
        trial = copy.deepcopy(bundle)
        tried.append((min(r.val_losses) if (r := attempt(trial, lr)).val_losses else math.inf, lr, trial, r))
    _, lr, best, result = min(tried, key=lambda t: (t[0], t[1]))
    bundle.net, bundle.optimizer_state = best.net, best.optimizer_state
    log.info("learning rate chosen on the validation slice", extra={"lr": lr, "tried": candidates})
    return dataclasses.replace(result, calibration=calibrate(bundle, valid, label, s, parent))


def calibrate(bundle: ModelBundle, rows: pd.DataFrame | Encoded | None, label: str, settings,
              parent: Calibration | None = None) -> Calibration:
    """Fit and install the bundle's calibration on a time-later slice its weights did not train on (the
    validation slice: never the evaluation holdout, so the gate's log-loss and ECE stay honest).

    A warm start's `parent` map (when it was fitted on rows) is the prior the slice moves
    (`training.calibration_prior_rows`): the child's logits began as the parent's, and a slice of a few dozen
    labels is too little to throw that map away. Without a slice the child keeps it."""
    method = settings.training.calibration
    prior = parent if parent is not None and parent.rows > 0 and method != "none" else None
    cal = prior or Calibration()
    if rows is not None and len(rows):
        v = rows if isinstance(rows, Encoded) else Encoded.of(bundle, rows, label)
        cal = calibration.fit(bundle.raw_logits(v.cat, v.num), v.y.numpy(), method,
                              settings.training.calibration_min_rows, prior=prior,
                              prior_rows=settings.training.calibration_prior_rows)
    bundle.net.calibration = cal
    log.info("calibration fitted", extra={"scale": round(cal.scale, 4), "shift": round(cal.shift, 4),
                                          "rows": cal.rows, "method": cal.method,
                                          "prior_rows": settings.training.calibration_prior_rows if prior else 0})
    return cal


def first_epochs(settings, rows: int, floor: int | None = None) -> int:
    """Epochs of a model trained from scratch on `rows` rows: at least `floor` (default `bootstrap_epochs`) and
    at least `bootstrap_min_steps` optimizer steps, so a small history is not left at a few steps while a large
    one costs a fixed number of passes."""
    t = settings.training
    floor = t.bootstrap_epochs if floor is None else floor
    return max(floor, math.ceil(t.bootstrap_min_steps / max(1, math.ceil(rows / t.batch_size))))


def fit_first(bundle: ModelBundle, rows: pd.DataFrame, label: str, time_col: str, settings, *, epochs: int,
              device: torch.device | None = None) -> FitResult:
    """The first model (bootstrap): like a night, the time-latest `validation_fraction` of the training rows
    is kept apart to keep the best epoch and to fit the calibration, so the first champion's scores mean
    what they say instead of carrying the history's overfit into every later log-loss and ECE comparison."""
    s = settings
    fit_rows, valid = rows, None
    if wants_validation(s, len(rows)):
        fit_rows, valid = split_by_time(rows, time_col, s.training.validation_fraction)
    result = fit(bundle, fit_rows, label, epochs=epochs, batch_size=s.training.batch_size, lr=s.training.learning_rate,
                 seed=s.seed, device=device, valid=valid, patience=s.training.early_stopping_patience)
    return dataclasses.replace(result, calibration=calibrate(bundle, valid, label, s))
