"""The server's numpy forward must give the network's scores, or not be used at all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.learn.calibration import Calibration
from pipeline.learn.frozen import FrozenNet
from pipeline.learn.model import CTRNet


def _inputs(net: CTRNet, cards: list[int], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cat = np.stack([rng.integers(0, c, n) for c in cards], axis=1).astype(np.int64) if cards else \
        np.zeros((n, 0), dtype=np.int64)
    num = rng.normal(size=(n, net.mlp[0].in_features - net.embeddings[0].embedding_dim * len(cards)
                          if cards else net.mlp[0].in_features)).astype(np.float32)
    return cat, num


@pytest.mark.parametrize(("cards", "hidden", "calibration"), [
    ([7, 300, 2], (64, 32), Calibration(1.3, -0.4, "platt", 500)),
    ([5], (16,), Calibration()),
    ([11, 3], (), Calibration(0.7, 0.2, "platt", 90)),
])
def test_numpy_forward_gives_the_networks_scores(cards, hidden, calibration):
    torch.manual_seed(0)
    net = CTRNet(cards, 4, 8, hidden).eval()
    for b in net.biases:
        nn.init.normal_(b.weight, std=0.3)  # trained nets have non-zero biases; zeros would hide a missed term
    net.calibration = calibration
    frozen = FrozenNet.of(net)
    assert frozen is not None
    for n in (1, 17, 300):
        cat, num = _inputs(net, cards, n, seed=n)
        with torch.inference_mode():
            expected = torch.sigmoid(net(torch.from_numpy(cat), torch.from_numpy(num))).double().numpy()
        np.testing.assert_allclose(frozen.scores(cat, num), expected, rtol=0, atol=1e-6)
        assert frozen.agrees_with(net, cat, num)


def test_a_changed_network_is_caught_and_an_unknown_layout_is_not_frozen():
    torch.manual_seed(1)
    net = CTRNet([4, 6], 4, 8, (16,)).eval()
    frozen = FrozenNet.of(net)
    cat, num = _inputs(net, [4, 6], 50, seed=3)
    net.biases[1] = nn.Embedding(6, 1)  # the network moved on; the copy did not
    nn.init.normal_(net.biases[1].weight, std=0.5)
    assert not frozen.agrees_with(net, cat, num)
    net.mlp = nn.Sequential(nn.Linear(net.mlp[0].in_features, 16), nn.Tanh(), nn.Linear(16, 1))
    assert FrozenNet.of(net) is None, "a layer it does not know must leave serving to torch"
    assert FrozenNet.of(nn.Linear(3, 1)) is None
