"""Training as its own process: one machine or many (torchrun), resumable after a kill.

    python -m pipeline.learn.ddp_train --data day.parquet --out bundle/ [--init parent_bundle/]
    torchrun --standalone --nproc_per_node=2 -m pipeline.learn.ddp_train --data day.parquet --out bundle/

    torchrun --nnodes=1:4 --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 --rdzv-id=DAY \
        --max-restarts=100 -m pipeline.learn.ddp_train ... --checkpoint-dir s3://bucket/checkpoints/DAY
    torchrun ... -m pipeline.learn.ddp_train --staged s3://bucket/staging/MODEL/NIGHT

`--staged` trains a night the nightly `train` stage prepared and staged (`pipeline.learn.staging`): the same
`fit_increment` as a local night (replay, early stopping, learning-rate choice, calibration) with the worker's
training settings, checkpoints under the staged location unless --checkpoint-dir says otherwise; what the
Kubeflow jobs run (`pipeline.cluster.jobs`).

Under torchrun every rank reads the same rows and the trainer splits each global batch between ranks, so the
loss curve is the single-process one (gloo on CPU, NCCL on GPUs). With --checkpoint-dir (a directory or an
object-storage URI, see `pipeline.learn.checkpoint`), a run killed mid-epoch (a preempted node) is restarted with
the same command and continues from the newest checkpoint to the same weights. SIGTERM (a preempted pod, or the
elastic agent stopping its workers for a membership change) makes the rank that receives it save one at its next
step first, whichever rank that is: a graceful stop loses no work.

Elastic (torchrun `--nnodes=MIN:MAX`): when a worker leaves or joins, torchrun restarts every worker with the new
world size (run the agents with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as the rendered jobs do: without it a node
that re-joins waits forever for the round's master address, see `pipeline.cluster.jobs`). The
checkpoint is bound to the data and hyperparameters, not the world size, and the batch is global (`--batch-size`
rows per step, split between ranks), so the restarted job resumes at the same step with the same
effective batch and the same order of rows: the result stays the one-process result up to float summation order.
Rank 0 writes the bundle and a `result.json` with the loss curve and the weights digest, and appends each start
(torchrun restart count, world size) to `starts.jsonl` beside it, so a membership change is visible afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from feature_store.spec import load_spec
from pipeline.config import get_settings
from pipeline.learn import staging
from pipeline.learn.checkpoint import Checkpointer, fingerprint
from pipeline.learn.model import ModelBundle, norm_stats
from pipeline.learn.trainer import encode_parquet, fit, fit_increment, pick_device


def file_digest(path: Path) -> str:
    """The data file's content hash: a checkpoint is only resumed on the very rows it was trained on."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    s = get_settings()
    ap = argparse.ArgumentParser(prog="python -m pipeline.learn.ddp_train", description=__doc__.splitlines()[0])
    ap.add_argument("--staged", default=None, help="a night staged by the train stage (path or URI): train it")
    ap.add_argument("--data", type=Path, help="Parquet file with the spec's columns")
    ap.add_argument("--out", type=Path, help="directory for the trained bundle and result.json")
    ap.add_argument("--spec", type=Path, default=s.spec_path)
    ap.add_argument("--init", type=Path, default=None, help="bundle to warm-start from (else a fresh model)")
    ap.add_argument("--epochs", type=int, default=s.training.epochs)
    ap.add_argument("--batch-size", type=int, default=s.training.batch_size)
    ap.add_argument("--lr", type=float, default=s.training.learning_rate)
    ap.add_argument("--seed", type=int, default=s.seed)
    ap.add_argument("--checkpoint-dir", default=None, help="directory or URI (s3://...) for checkpoints")
    ap.add_argument("--checkpoint-every", type=int, default=s.training.checkpoint_every_steps)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: automatic)")
    args = ap.parse_args(argv)
    if args.staged is None and (args.data is None or args.out is None):
        ap.error("either --staged LOCATION, or --data and --out")
    return args


def join(args: argparse.Namespace, world: int) -> torch.device:
    device = torch.device(args.device) if args.device else pick_device()
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def train_staged(args: argparse.Namespace, world: int, device: torch.device) -> dict:
    """A night staged by the train stage, trained by the same `fit_increment` with the worker's settings."""
    s = get_settings()
    with tempfile.TemporaryDirectory() as tmp:
        night = staging.load(args.staged, Path(tmp))
    s = s.model_copy(update={"seed": night.settings["seed"],
                             "training": type(s.training)(**night.settings["training"])})
    label = night.settings["label"]
    where = args.checkpoint_dir or f"{args.staged.rstrip('/')}/checkpoints"
    ckpt = Checkpointer(where, s.training.checkpoint_every_steps, job_key=night.key, graceful=True)
    result = fit_increment(night.bundle, night.fit_rows, label, "", s, replay=night.replay,
                           replay_weight=night.replay_weight, device=device, valid=night.valid, checkpointer=ckpt)
    if (dist.get_rank() if world > 1 else 0) == 0:
        staging.write_result(args.staged, night.bundle, result)
    return {"losses": result.losses, "steps": result.steps, "resumed_at_step": result.resumed_at_step,
            "world_size": world, "device": result.device, "weights_digest": night.bundle.weights_digest()}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    s = get_settings()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = join(args, world)
    try:
        if args.staged is not None:
            return train_staged(args, world, device)
        if (dist.get_rank() if world > 1 else 0) == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            with open(args.out / "starts.jsonl", "a") as f:
                f.write(json.dumps({"restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                                    "world_size": world}) + "\n")
        spec = load_spec(args.spec)
        if args.init is not None:  # warm start (across a declared spec migration): stream the file
            bundle = ModelBundle.load(args.init)
            added = [n for n in spec.numeric if n not in bundle.numeric]
            stats = pq.read_table(args.data, columns=added)
            bundle.migrate_to(spec, args.seed, {n: norm_stats(stats.column(n).to_numpy(zero_copy_only=False)
                                                              .astype(np.float64)) for n in added})
            batches = pq.ParquetFile(args.data).iter_batches(columns=bundle.categorical or None)
            bundle.grow_vocab((b.to_pandas() for b in batches), s.training.vocab_min_count, args.seed)
        else:  # a fresh model needs the whole file once anyway, for its vocabularies and normalisation
            bundle = ModelBundle.create(spec, pq.read_table(args.data).to_pandas(), s.training.embedding_dim,
                                        s.training.hidden_units, s.training.vocab_min_count, args.seed)
        rows = encode_parquet(bundle, args.data, spec.label.name, pin=device.type == "cuda")
        rank = dist.get_rank() if world > 1 else 0
        ckpt = None
        if args.checkpoint_dir:
            key = fingerprint(start=bundle.weights_digest(), data=file_digest(args.data), epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed)
            ckpt = Checkpointer(args.checkpoint_dir, args.checkpoint_every, job_key=key, graceful=True)
        result = fit(bundle, rows, spec.label.name, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed, device=device, optimizer_state=bundle.optimizer_state, checkpointer=ckpt)
        out = {"losses": result.losses, "steps": result.steps, "resumed_at_step": result.resumed_at_step,
               "world_size": world, "device": result.device, "weights_digest": bundle.weights_digest(),
               "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}
        if rank == 0:
            bundle.save(args.out)
            (args.out / "result.json").write_text(json.dumps(out, indent=2))
        return out
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
