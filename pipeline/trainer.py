"""The optimisation loop shared by bootstrap and the nightly warm start; device-agnostic, seeded."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.model import ModelBundle

log = logging.getLogger("flywheel.trainer")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class FitResult:
    epochs: int
    samples: int
    losses: list[float]
    device: str


def fit(bundle: ModelBundle, frame: pd.DataFrame, label: str, *, epochs: int, batch_size: int, lr: float,
        seed: int, device: torch.device | None = None) -> FitResult:
    if len(frame) == 0:
        raise ValueError("refusing to train on zero rows")
    device = device or pick_device()
    torch.manual_seed(seed)
    net = bundle.net.to(device)
    cat, num = bundle.encode(frame)
    y = torch.from_numpy(frame[label].to_numpy(dtype=np.float32))
    if device.type == "cuda":
        cat, num, y = cat.pin_memory(), num.pin_memory(), y.pin_memory()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    amp = device.type == "cuda"
    losses: list[float] = []
    n = len(frame)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            c, x, t = (v[idx].to(device, non_blocking=True) for v in (cat, num, y))
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(c, x)
            loss = loss_fn(logits.float(), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        mean = total / n
        if not math.isfinite(mean):
            raise FloatingPointError(f"training diverged at epoch {epoch}: loss {mean}")
        losses.append(mean)
        log.info("epoch done", extra={"epoch": epoch, "loss": round(mean, 5), "rows": n})
    net.to("cpu")
    return FitResult(epochs, n * epochs, losses, device.type)
