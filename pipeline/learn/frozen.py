"""The served network's forward pass in plain numpy, built once per loaded version.

At the batch sizes a model server sees (one to a few dozen rows per micro-batch) torch's per-operator dispatch
dominates: CTRNet's eager forward is ~40 small operators and took 240 us per call for one row on this 2-core
machine, the same weights in numpy 24 us. The server uses this only after checking, on the warm-up rows, that it
gives the network's own scores (`agrees_with`); a network it does not recognise (another layer type) is served by
torch as before, so a change to `CTRNet` can make serving slower but never wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.learn.model import CTRNet


@dataclass(frozen=True)
class FrozenNet:
    tables: tuple[np.ndarray, ...]  # one embedding table per categorical feature
    biases: tuple[np.ndarray, ...]  # one scalar bias per category, per feature
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]  # (weight transposed, bias) of each Linear; ReLU between
    scale: float
    shift: float

    @classmethod
    def of(cls, net: nn.Module) -> FrozenNet | None:
        """The numpy view of `net`, or None when its layout is not CTRNet's embeddings -> Linear/ReLU stack. The
        arrays share memory with the parameters where they can (no second copy of large embedding tables), so
        it is valid for a network that is no longer trained, as a served one is."""
        if not isinstance(net, CTRNet):
            return None
        mods = list(net.mlp)
        linear, relu = mods[0::2], mods[1::2]
        if not mods or not all(isinstance(m, nn.Linear) for m in linear) or \
                not all(isinstance(m, nn.ReLU) for m in relu) or len(linear) != len(relu) + 1:
            return None

        def arr(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().cpu().float().numpy())

        return cls(tuple(arr(e.weight) for e in net.embeddings), tuple(arr(b.weight)[:, 0] for b in net.biases),
                   tuple((arr(m.weight.T), arr(m.bias)) for m in linear),
                   float(net.calibration.scale), float(net.calibration.shift))

    def logits(self, cat: np.ndarray, num: np.ndarray) -> np.ndarray:
        parts = [table[cat[:, i]] for i, table in enumerate(self.tables)]
        h = np.concatenate([*parts, num.astype(np.float32, copy=False)], axis=1) if parts else num
        last = len(self.layers) - 1
        for k, (weight, bias) in enumerate(self.layers):
            h = h @ weight + bias
            if k < last:
                np.maximum(h, 0.0, out=h)
        out = h[:, 0].astype(np.float64)
        for i, bias in enumerate(self.biases):
            out += bias[cat[:, i]]
        return out * self.scale + self.shift if (self.scale, self.shift) != (1.0, 0.0) else out

    def scores(self, cat: np.ndarray, num: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-self.logits(cat, num)))

    def agrees_with(self, net: nn.Module, cat: np.ndarray, num: np.ndarray, atol: float = 1e-5) -> bool:
        """Whether this copy scores `cat`/`num` as the network does (NaN where it gives NaN)."""
        with torch.inference_mode():
            expected = torch.sigmoid(net(torch.from_numpy(cat), torch.from_numpy(num))).double().numpy()
        return bool(np.allclose(self.scores(cat, num), expected, rtol=0.0, atol=atol, equal_nan=True))
