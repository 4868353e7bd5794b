"""The CTR model and its bundle: architecture config, vocabularies, normalisation and safetensors weights.

The bundle is a directory of JSON plus a safetensors file, so loading a model never unpickles anything, and
`ModelBundle.load(dir)` followed by `grow()` is the whole of a warm start.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from feature_store.spec import FeatureSpec, MigrationPlan
from feature_store.vocab import Vocabulary, count
from pipeline.learn.calibration import Calibration

FORMAT_VERSION = 1


class CTRNet(nn.Module):
    """Per-feature embeddings (plus a scalar bias per category) and normalised numerics into an MLP, whose
    logit goes through the model's calibration (see `pipeline.learn.calibration`) unless `calibrated=False`:
    the server calls the net directly, so the calibration has to live here to reach every scoring path."""

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
        self.calibration = Calibration()

    def forward(self, cat: torch.Tensor, num: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        parts = [emb(cat[:, i]) for i, emb in enumerate(self.embeddings)]
        x = torch.cat([*parts, num], dim=1) if parts else num
        out = self.mlp(x).squeeze(1)
        for i, b in enumerate(self.biases):
            out = out + b(cat[:, i]).squeeze(1)
        return self.calibration.apply(out) if calibrated else out

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
               min_count: int, seed: int = 0, numeric_clip: float = 5.0,
               vocabs: dict[str, Vocabulary] | None = None, grow: bool = True) -> ModelBundle:
        """A new network for `frame`; `vocabs` (copied, then grown by the frame's values unless `grow` is
        False) start the id space from another model's instead of from nothing."""
        torch.manual_seed(seed)
        vocabs = {c: copy.deepcopy(vocabs[c]) if vocabs and c in vocabs else Vocabulary() for c in spec.categorical}
        for c, v in vocabs.items():
            if grow or not v.size:
                v.update(frame[c], min_count)
        norm = {n: norm_stats(frame[n].to_numpy(dtype=np.float64, na_value=np.nan)) for n in spec.numeric}
        net = CTRNet([vocabs[c].size for c in spec.categorical], len(spec.numeric), embedding_dim, hidden)
        return cls(spec.digest, spec.categorical, spec.numeric, vocabs, norm, embedding_dim, tuple(hidden), net,
                   numeric_clip=numeric_clip)

    def check_spec(self, spec: FeatureSpec) -> None:
        if spec.digest != self.spec_digest:
            raise ValueError(
                f"model was trained for spec digest {self.spec_digest}, the feature spec now has {spec.digest} "
                f"(features or types changed); bootstrap a new model or declare a migration"
            )

    @property
    def features(self) -> dict[str, str]:
        """The model's inputs, name -> 'categorical'/'numeric': what a migration is planned from."""
        return {**dict.fromkeys(self.categorical, "categorical"), **dict.fromkeys(self.numeric, "numeric")}

    def migrate_to(self, spec: FeatureSpec, seed: int = 0,
                   numeric_stats: dict[str, tuple[float, float]] | None = None) -> MigrationPlan | None:
        """Rebuild the inputs for `spec` by its declared migrations (None when nothing changed). Carried features
        keep their embeddings, vocabularies and input weights (under their new name when renamed); removed ones
        lose theirs; added ones get fresh embeddings but zero input weights and biases, so until training moves
        them the model predicts exactly what the parent did. `numeric_stats` gives added numerics their
        normalisation (else mean 0, std 1). The optimizer moments are dropped: the parameter shapes changed."""
        if spec.digest == self.spec_digest:
            return None
        plan = spec.plan_migration(self.features)
        if not plan.steps:
            raise ValueError(f"model was trained for spec digest {self.spec_digest}, the spec now has {spec.digest} "
                             "with the same features: the label changed, which no migration can carry over; "
                             "bootstrap a new model")
        origin = {c: o for o, c in plan.renamed.items()}
        parent_of = {n: None if n in plan.added else origin.get(n, n) for n in spec.feature_names}
        old_cat = {c: i for i, c in enumerate(self.categorical)}
        old_num = {c: i for i, c in enumerate(self.numeric)}
        vocabs = {c: self.vocabs[p] if (p := parent_of[c]) is not None else Vocabulary() for c in spec.categorical}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = CTRNet([vocabs[c].size for c in spec.categorical], len(spec.numeric), self.embedding_dim,
                         self.hidden)
        old_first, new_first = _first_linear(self.net), _first_linear(net)
        d = self.embedding_dim
        with torch.no_grad():
            new_first.weight.zero_()
            new_first.bias.copy_(old_first.bias)
            blocks = [(j * d, d, old_cat.get(parent_of[c]), True) for j, c in enumerate(spec.categorical)]
            blocks += [(len(spec.categorical) * d + j, 1, old_num.get(parent_of[n]), False)
                       for j, n in enumerate(spec.numeric)]
            for at, width, src, is_cat in blocks:
                if src is None:
                    continue
                src_at = src * d if is_cat else len(self.categorical) * d + src
                new_first.weight[:, at:at + width] = old_first.weight[:, src_at:src_at + width]
            for j, c in enumerate(spec.categorical):
                if (p := parent_of[c]) is not None:
                    net.embeddings[j].weight.copy_(self.net.embeddings[old_cat[p]].weight)
                    net.biases[j].weight.copy_(self.net.biases[old_cat[p]].weight)
            old_layers = [m for m in self.net.mlp if isinstance(m, nn.Linear)][1:]
            for old, new in zip(old_layers, [m for m in net.mlp if isinstance(m, nn.Linear)][1:], strict=True):
                new.load_state_dict(old.state_dict())
        stats = numeric_stats or {}
        self.norm = {n: self.norm[p] if (p := parent_of[n]) is not None else stats.get(n, (0.0, 1.0))
                     for n in spec.numeric}
        net.calibration = self.net.calibration  # the migrated twin scores exactly as the parent did
        self.vocabs, self.net, self.optimizer_state = vocabs, net, None
        self.categorical, self.numeric, self.spec_digest = list(spec.categorical), list(spec.numeric), spec.digest
        return plan

    def for_spec(self, spec: FeatureSpec) -> ModelBundle:
        """This model as it would score rows of `spec` (a migrated copy when the spec changed): what evaluation
        compares a migrated candidate against."""
        if spec.digest == self.spec_digest:
            return self
        twin = copy.deepcopy(self)
        twin.migrate_to(spec)
        return twin

    def grow_vocab(self, frame: pd.DataFrame | Iterable[pd.DataFrame], min_count: int, seed: int = 0,
                   day: date | None = None) -> dict[str, int]:
        """Admit new values (from one frame, or record batches streamed from the lake: sightings are summed first,
        so ids do not depend on the batch size), mark them seen on `day`, then grow the tables once."""
        counts = {c: Counter() for c in self.categorical}
        for part in [frame] if isinstance(frame, pd.DataFrame) else frame:
            for c in self.categorical:
                counts[c].update(count(part[c]))
        added = {c: len(self.vocabs[c].admit(counts[c], min_count, day)) for c in self.categorical}
        self.net.grow([self.vocabs[c].size for c in self.categorical], seed)
        return added

    def expire_vocab(self, today: date, days: int) -> dict[str, int]:
        """Retire categories unseen for more than `days` days (see `Vocabulary.expire`); returns how many per
        feature. Embedding rows stay, so ids keep their meaning across warm starts."""
        return {c: len(self.vocabs[c].expire(today, days)) for c in self.categorical}

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

    @property
    def calibration(self) -> Calibration:
        return self.net.calibration

    @torch.inference_mode()
    def raw_logits(self, cat: torch.Tensor, num: torch.Tensor, batch_rows: int = 65_536) -> np.ndarray:
        """The network's uncalibrated logits, in batches: what a calibration is fitted on."""
        self.net.eval()
        device = next(self.net.parameters()).device
        out = [self.net(cat[i:i + batch_rows].to(device), num[i:i + batch_rows].to(device), calibrated=False)
               .float().cpu().numpy() for i in range(0, len(cat), batch_rows)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

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
            "calibration": self.net.calibration.to_dict(),
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
        net.calibration = Calibration.from_dict(config.get("calibration"))
        norm = {k: (float(v[0]), float(v[1])) for k, v in config["norm"].items()}
        return cls(config["spec_digest"], config["categorical"], config["numeric"], vocabs, norm,
                   config["embedding_dim"], hidden, net, load_optimizer(directory),
                   float(config.get("numeric_clip", 5.0)))

    def weights_digest(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.net.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        if not self.net.calibration.identity:  # the scoring function, not only the weights
            h.update(repr((self.net.calibration.scale, self.net.calibration.shift)).encode())
        return h.hexdigest()[:16]


def norm_stats(values: np.ndarray) -> tuple[float, float]:
    """Mean and std a numeric input is standardised with (missing values ignored; a constant column gets std 1)."""
    values = values[np.isfinite(values)]
    std = float(values.std(ddof=1)) if len(values) > 1 else 1.0
    return (float(values.mean()) if len(values) else 0.0, std if std > 1e-9 else 1.0)


def _first_linear(net: CTRNet) -> nn.Linear:
    return next(m for m in net.mlp if isinstance(m, nn.Linear))


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
