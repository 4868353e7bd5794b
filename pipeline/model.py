"""The CTR model and its bundle: architecture config, vocabularies, normalisation and safetensors weights.

The bundle is a directory of JSON plus a safetensors file, so loading a model never unpickles anything, and
`ModelBundle.load(dir)` followed by `grow()` is the whole of a warm start.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from feature_store.spec import FeatureSpec
from feature_store.vocab import Vocabulary

FORMAT_VERSION = 1


class CTRNet(nn.Module):
    """Per-feature embeddings (plus a scalar bias per category) and normalised numerics into an MLP."""

    def __init__(self, cardinalities: list[int], n_numeric: int, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c, dim) for c in cardinalities)
        self.biases = nn.ModuleList(nn.Embedding(c, 1) for c in cardinalities)
        layers: list[nn.Module] = []
        width = dim * len(cardinalities) + n_numeric
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        for e in self.embeddings:
            nn.init.normal_(e.weight, std=0.05)
        for b in self.biases:
            nn.init.zeros_(b.weight)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        parts = [emb(cat[:, i]) for i, emb in enumerate(self.embeddings)]
        x = torch.cat([*parts, num], dim=1) if parts else num
        out = self.mlp(x).squeeze(1)
        for i, b in enumerate(self.biases):
            out = out + b(cat[:, i]).squeeze(1)
        return out

    def grow(self, cardinalities: list[int], seed: int = 0) -> list[int]:
        """Enlarge embedding tables in place: old rows copied, new rows initialised (seeded, so a rerun of a
        night grows identically). Returns rows added."""
        added = []
        gen = torch.Generator().manual_seed(seed)
        for i, new in enumerate(cardinalities):
            old = self.embeddings[i].num_embeddings
            if new < old:
                raise ValueError(f"vocabulary {i} shrank from {old} to {new}: ids must only be appended")
            added.append(new - old)
            if new == old:
                continue
            for table, init_std in ((self.embeddings, 0.05), (self.biases, 0.0)):
                prev = table[i]
                fresh = nn.Embedding(new, prev.embedding_dim).to(prev.weight.device)
                with torch.no_grad():
                    fresh.weight.copy_(torch.randn(fresh.weight.shape, generator=gen) * init_std)
                    fresh.weight[:old] = prev.weight
                table[i] = fresh
        return added


@dataclass
class ModelBundle:
    spec_digest: str
    categorical: list[str]
    numeric: list[str]
    vocabs: dict[str, Vocabulary]
    norm: dict[str, tuple[float, float]]
    embedding_dim: int
    hidden: tuple[int, ...]
    net: CTRNet = field(repr=False)
    optimizer_state: dict | None = field(default=None, repr=False)
    numeric_clip: float = 5.0

    def scale(self, name: str, values: np.ndarray) -> np.ndarray:
        """Standardise a numeric feature and clip it to +-numeric_clip standard deviations: one outlier (a price
        typo, a counter reset) must not saturate the network. Missing values become the mean (0). Training and
        serving both call this, so the transform cannot drift apart."""
        mean, std = self.norm[name]
        out = (np.asarray(values, dtype=np.float64) - mean) / std
        out = np.nan_to_num(out, nan=0.0, posinf=self.numeric_clip, neginf=-self.numeric_clip)
        return np.clip(out, -self.numeric_clip, self.numeric_clip, out=out)

    @classmethod
    def create(cls, spec: FeatureSpec, frame: pd.DataFrame, embedding_dim: int, hidden: tuple[int, ...],
               min_count: int, seed: int = 0, numeric_clip: float = 5.0) -> ModelBundle:
        torch.manual_seed(seed)
        vocabs = {c: Vocabulary() for c in spec.categorical}
        for c, v in vocabs.items():
            v.update(frame[c], min_count)
        norm = {}
        for n in spec.numeric:
            col = frame[n].astype("float64")
            std = float(col.std()) if len(col) > 1 else 1.0
            norm[n] = (float(col.mean()) if len(col) else 0.0, std if std > 1e-9 else 1.0)
        net = CTRNet([vocabs[c].size for c in spec.categorical], len(spec.numeric), embedding_dim, hidden)
        return cls(spec.digest, spec.categorical, spec.numeric, vocabs, norm, embedding_dim, tuple(hidden), net,
                   numeric_clip=numeric_clip)

    def check_spec(self, spec: FeatureSpec) -> None:
        if spec.digest != self.spec_digest:
            raise ValueError(
                f"model was trained for spec digest {self.spec_digest}, the feature spec now has {spec.digest} "
                f"(features or types changed); bootstrap a new model or declare a migration"
            )

    def grow_vocab(self, frame: pd.DataFrame | Iterable[pd.DataFrame], min_count: int, seed: int = 0
                   ) -> dict[str, int]:
        """Admit new values (from one frame, or record batches streamed from the lake), then grow the tables once."""
        added = dict.fromkeys(self.categorical, 0)
        for part in [frame] if isinstance(frame, pd.DataFrame) else frame:
            for c in self.categorical:
                added[c] += len(self.vocabs[c].update(part[c], min_count))
        self.net.grow([self.vocabs[c].size for c in self.categorical], seed)
        return added

    def encode(self, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(frame)
        cat = np.stack([self.vocabs[c].encode(frame[c]) for c in self.categorical], axis=1) if self.categorical \
            else np.zeros((n, 0), dtype=np.int64)
        if self.numeric:
            num = np.stack([self.scale(c, frame[c].to_numpy(dtype=np.float64, na_value=np.nan))
                            for c in self.numeric], axis=1).astype(np.float32)
        else:
            num = np.zeros((n, 0), dtype=np.float32)
        return torch.from_numpy(cat), torch.from_numpy(num)

    @torch.inference_mode()
    def predict(self, data: pd.DataFrame | pa.Table) -> np.ndarray:
        frame = data.to_pandas() if isinstance(data, pa.Table) else data
        self.net.eval()
        device = next(self.net.parameters()).device
        cat, num = self.encode(frame)
        return torch.sigmoid(self.net(cat.to(device), num.to(device))).float().cpu().numpy().astype(np.float64)

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "format_version": FORMAT_VERSION,
            "spec_digest": self.spec_digest,
            "categorical": self.categorical,
            "numeric": self.numeric,
            "norm": self.norm,
            "embedding_dim": self.embedding_dim,
            "hidden": list(self.hidden),
            "numeric_clip": self.numeric_clip,
        }
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        (directory / "vocab.json").write_text(json.dumps({c: v.to_dict() for c, v in self.vocabs.items()}))
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(directory / "weights.safetensors"))
        if self.optimizer_state is not None:
            save_optimizer(self.optimizer_state, directory)
        return directory

    @classmethod
    def load(cls, directory: Path) -> ModelBundle:
        config = json.loads((directory / "config.json").read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: unsupported model bundle format {config.get('format_version')}")
        vocabs = {c: Vocabulary.from_dict(d) for c, d in json.loads((directory / "vocab.json").read_text()).items()}
        hidden = tuple(config["hidden"])
        net = CTRNet([vocabs[c].size for c in config["categorical"]], len(config["numeric"]),
                     config["embedding_dim"], hidden)
        net.load_state_dict(load_file(str(directory / "weights.safetensors")))
        norm = {k: (float(v[0]), float(v[1])) for k, v in config["norm"].items()}
        return cls(config["spec_digest"], config["categorical"], config["numeric"], vocabs, norm,
                   config["embedding_dim"], hidden, net, load_optimizer(directory),
                   float(config.get("numeric_clip", 5.0)))

    def weights_digest(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.net.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def save_optimizer(state: dict, directory: Path) -> None:
    """The optimizer's per-parameter moments beside the weights (safetensors: no pickle), so the next night can
    continue with them instead of restarting Adam cold."""
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in state["state"].items() for k, v in s.items()
               if torch.is_tensor(v)}
    save_file(tensors, str(directory / "optimizer.safetensors"))


def load_optimizer(directory: Path) -> dict | None:
    path = directory / "optimizer.safetensors"
    if not path.exists():
        return None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    return {"state": state}
