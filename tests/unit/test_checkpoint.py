from __future__ import annotations

from datetime import date

import pytest
import torch

from feature_store.spec import load_spec
from pipeline.learn.checkpoint import Checkpointer
from pipeline.learn.model import ModelBundle
from pipeline.learn.trainer import fit
from tests.helpers import LOANS_SPEC, loans_frame

SPEC = load_spec(LOANS_SPEC)
FRAME = loans_frame(date(2026, 3, 1), 800, seed=4)
CPU = torch.device("cpu")


class Preempted(RuntimeError):
    pass


def fresh() -> ModelBundle:
    return ModelBundle.create(SPEC, FRAME, embedding_dim=4, hidden=(8,), min_count=1, seed=2)


def train(bundle: ModelBundle, ckpt: Checkpointer | None, lr: float = 1e-2):
    return fit(bundle, FRAME, "defaulted", epochs=3, batch_size=32, lr=lr, seed=1, device=CPU,
               valid=FRAME.iloc[-100:], patience=5, checkpointer=ckpt)


def test_interrupted_fit_resumes_mid_epoch_to_identical_weights(tmp_path):
    straight = fresh()
    reference = train(straight, None)

    def preempt_after_second(path):
        if ckpt.saved == 2:
            raise Preempted(path)

    ckpt = Checkpointer(tmp_path, every_steps=30, on_save=preempt_after_second)
    with pytest.raises(Preempted):
        train(fresh(), ckpt)  # dies at step 60, inside epoch 2 (25 steps an epoch)
    resumed_bundle = fresh()
    resumed = train(resumed_bundle, Checkpointer(tmp_path, every_steps=30))
    assert resumed.resumed_at_step == 60
    assert resumed.losses == reference.losses and resumed.val_losses == reference.val_losses
    assert resumed_bundle.weights_digest() == straight.weights_digest()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_checkpoint_of_another_job_is_not_resumed(tmp_path):
    def stop(path):
        raise Preempted(path)

    with pytest.raises(Preempted):
        train(fresh(), Checkpointer(tmp_path, every_steps=10, on_save=stop))
    other = train(fresh(), Checkpointer(tmp_path, every_steps=10), lr=2e-2)  # different hyperparameters
    assert other.resumed_at_step == 0


def test_anchor_keeps_a_warm_start_near_its_parent():
    def drift(anchor: float) -> float:
        b = fresh()
        start = {k: v.clone() for k, v in b.net.state_dict().items()}
        fit(b, FRAME, "defaulted", epochs=2, batch_size=32, lr=1e-2, seed=1, device=CPU, anchor_l2=anchor)
        return sum(float(((v - start[k]) ** 2).sum()) for k, v in b.net.state_dict().items())

    assert drift(5.0) < 0.5 * drift(0.0)


def test_learning_rate_is_chosen_on_the_later_slice():
    from pipeline.config import Settings
    from pipeline.learn.trainer import fit_increment

    s = Settings(lr_candidates=(1e-5, 1e-2), epochs=3, batch_size=32, validation_fraction=0.2)
    b = fresh()
    r = fit_increment(b, FRAME, "defaulted", SPEC.event_time, s, device=CPU)
    assert r.lr == 1e-2  # a rate too small to move the model loses on validation
    alone = fresh()
    only = fit_increment(alone, FRAME, "defaulted", SPEC.event_time, s.model_copy(update={"lr_candidates": (1e-2,)}),
                         device=CPU)
    assert only.losses == r.losses and alone.weights_digest() == b.weights_digest()
