"""Training throughput of the reference CTR model on a GPU: is the device fed, or waiting for the loader?

Writes synthetic traffic for the demo spec (`feature_store/specs/ctr.yaml`, rows from `pipeline/demo/simulate.py`)
to a Parquet file first, then trains the way the nightly stage feeds a device: record batches are streamed from
the file, encoded by the bundle into pinned host tensors on a background thread, copied to the device without
blocking, and consumed in minibatches under bf16 autocast (CUDA only). Reports samples per second, the share
of wall time the training loop waited for the loader, and the GPU's utilisation (sampled with
`torch.cuda.utilization()`, else `nvidia-smi`); the last line is JSON.

    .venv/bin/python bench/train_gpu.py                           # 2M rows, 3 epochs, on CUDA when present
    .venv/bin/python bench/train_gpu.py --rows 100000 --epochs 1  # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from feature_store.spec import load_spec  # noqa: E402
from pipeline.config import DEFAULT_SPEC  # noqa: E402
from pipeline.demo.simulate import Simulator  # noqa: E402
from pipeline.learn.model import ModelBundle  # noqa: E402
from pipeline.learn.trainer import autocast_dtype, pick_device  # noqa: E402

CHUNK_ROWS = 200_000


def write_data(path: Path, rows: int, seed: int) -> None:
    """Simulated days, CHUNK_ROWS at a time, into one Parquet file with the spec's columns."""
    spec = load_spec(DEFAULT_SPEC)
    columns = [*spec.feature_names, spec.event_time, spec.label.name]
    sim = Simulator(seed=seed, rows_per_day=min(rows, CHUNK_ROWS))
    writer = None
    written, day = 0, 0
    while written < rows:
        part = sim.day(day % sim.horizon_days)[columns].head(rows - written)
        table = pa.Table.from_pandas(part, preserve_index=False)
        writer = writer or pq.ParquetWriter(str(path), table.schema, compression="zstd")
        writer.write_table(table)
        written, day = written + len(part), day + 1
    writer.close()


def record_batches(path: Path, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    yield from pq.ParquetFile(str(path)).iter_batches(batch_size=batch_rows, columns=columns)


class Loader:
    """A background thread that turns record batches into pinned (on CUDA) tensors, `depth` batches ahead."""

    def __init__(self, bundle: ModelBundle, path: Path, label: str, batch_rows: int, pin: bool, depth: int = 3):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, args=(bundle, path, label, batch_rows, pin), daemon=True)
        self.thread.start()

    def _run(self, bundle: ModelBundle, path: Path, label: str, batch_rows: int, pin: bool) -> None:
        try:
            columns = [*bundle.categorical, *bundle.numeric, label]
            for batch in record_batches(path, columns, batch_rows):
                frame = batch.to_pandas()
                cat, num = bundle.encode(frame)
                y = torch.from_numpy(frame[label].to_numpy(dtype=np.float32))
                if pin:
                    cat, num, y = cat.pin_memory(), num.pin_memory(), y.pin_memory()
                self.q.put((cat, num, y))
            self.q.put(None)
        except BaseException as e:  # surfaced to the training loop, never swallowed
            self.q.put(e)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        while (item := self.q.get()) is not None:
            if isinstance(item, BaseException):
                raise RuntimeError("loader thread failed") from item
            yield item


class UtilisationSampler:
    """GPU utilisation every `interval` seconds while training runs (empty off CUDA)."""

    def __init__(self, device: torch.device, interval: float = 0.5) -> None:
        self.samples: list[float] = []
        self.source = "none"
        self._stop = threading.Event()
        self._read = self._reader(device)
        self.thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _reader(self, device: torch.device):
        if device.type != "cuda":
            return None
        try:
            torch.cuda.utilization(device)
            self.source = "torch.cuda.utilization"
            return lambda: float(torch.cuda.utilization(device))
        except Exception:  # needs pynvml; fall back to nvidia-smi when present
            smi = shutil.which("nvidia-smi")
            if smi is None:
                return None
            self.source = "nvidia-smi"
            index = device.index or 0
            return lambda: float(subprocess.run(
                [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"--id={index}"],
                capture_output=True, text=True, check=True, timeout=5).stdout.strip())

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.samples.append(self._read())

    def __enter__(self) -> UtilisationSampler:
        if self._read is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8192, help="minibatch rows per optimiser step")
    ap.add_argument("--read-rows", type=int, default=131_072, help="rows per record batch the loader reads")
    ap.add_argument("--embedding-dim", type=int, default=16)
    ap.add_argument("--hidden", type=int, nargs="*", default=[256, 128])
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: automatic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None, help="reuse this Parquet file instead of writing one")
    args = ap.parse_args(argv)
    device = torch.device(args.device) if args.device else pick_device()
    spec = load_spec(DEFAULT_SPEC)
    label = spec.label.name
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.data or Path(tmp) / "ctr.parquet"
        t0 = time.perf_counter()
        if args.data is None:
            write_data(path, args.rows, args.seed)
        write_s = time.perf_counter() - t0
        rows = pq.ParquetFile(str(path)).metadata.num_rows
        first = next(record_batches(path, [*spec.feature_names, label], min(rows, CHUNK_ROWS))).to_pandas()
        bundle = ModelBundle.create(spec, first, args.embedding_dim, tuple(args.hidden), min_count=1, seed=args.seed)
        t0 = time.perf_counter()
        bundle.grow_vocab((b.to_pandas() for b in record_batches(path, bundle.categorical, args.read_rows)), 1)
        vocab_s = time.perf_counter() - t0

        net = bundle.net.to(device)
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
        amp = autocast_dtype(device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
        pin = device.type == "cuda"
        waited = 0.0
        samples = 0
        losses: list[float] = []
        with UtilisationSampler(device) as util:
            start = time.perf_counter()
            for epoch in range(args.epochs):
                gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
                total, count = torch.zeros((), device=device), 0
                it = iter(Loader(bundle, path, label, args.read_rows, pin))
                while True:
                    t = time.perf_counter()
                    item = next(it, None)
                    waited += time.perf_counter() - t
                    if item is None:
                        break
                    cat, num, y = (v.to(device, non_blocking=True) for v in item)
                    order = torch.randperm(len(y), generator=gen).to(device)
                    for begin in range(0, len(y), args.batch_size):
                        idx = order[begin:begin + args.batch_size]
                        with torch.autocast(device_type=device.type, dtype=amp or torch.bfloat16,
                                            enabled=amp is not None):
                            logits = net(cat[idx], num[idx])
                        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), y[idx])
                        opt.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                        total += loss.detach() * len(idx)
                        count += len(idx)
                    samples += len(y)
                losses.append(float(total) / max(count, 1))  # one sync per epoch, not per step
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - start

    result = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "autocast": str(amp).replace("torch.", "") if amp else None, "rows": rows, "epochs": args.epochs,
        "batch_size": args.batch_size, "read_rows": args.read_rows, "params": sum(p.numel() for p in net.parameters()),
        "write_s": round(write_s, 2), "vocab_pass_s": round(vocab_s, 2), "train_s": round(wall, 2),
        "samples_per_s": round(samples / wall), "loader_wait_share": round(waited / wall, 3),
        "gpu_util_mean": round(statistics.fmean(util.samples), 1) if util.samples else None,
        "gpu_util_source": util.source, "losses": [round(x, 5) for x in losses],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    print(f"{rows} rows x {args.epochs} epochs on {result['device_name']}: {result['samples_per_s']} samples/s, "
          f"loader wait {result['loader_wait_share']:.0%} of training time, GPU util {result['gpu_util_mean']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
