"""Training: losses behave, one step lowers the loss, budgets and resume work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.data import load_dataset
from wsi_pipeline.data.dataset import Sample
from wsi_pipeline.data.torch_dataset import HoverTrainDataset
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.losses import LossWeights, bn_l1_penalty, hovernet_loss, hv_gradients
from wsi_pipeline.train import TrainConfig, fit, load_checkpoint, lr_at, tp_class_weights

torch.set_num_threads(1)


def _disc_sample(name: str = "disc", size: int = 256) -> Sample:
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.uint8)
    rng = np.random.default_rng(0)
    for i in range(12):
        cy, cx = rng.integers(20, size - 20, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 64
        inst[disc & (inst == 0)] = i + 1
        types[disc] = 1 + i % 4
    image = np.full((size, size, 3), 230, np.uint8)
    image[inst > 0] = (90, 40, 140)
    return Sample(name=name, source=name, image=image, inst_map=inst, type_map=types)


def _tiny_model(seed: int = 0) -> HoVerNet:
    torch.manual_seed(seed)
    return HoVerNet("fast", 5, ChannelSpec.scaled(0.0625))


def test_hv_gradients_of_a_ramp_are_constant_inside() -> None:
    ramp = torch.linspace(-1, 1, 32).repeat(32, 1)
    hv = torch.stack([ramp, ramp.T]).unsqueeze(0)
    grad = hv_gradients(hv)[0, :, 8:24, 8:24]
    assert torch.allclose(grad[0], grad[0].mean().expand_as(grad[0]), atol=1e-5)
    assert torch.allclose(grad[0], grad[1].T, atol=1e-5)
    assert grad[0].mean() > 0


def test_loss_is_zero_for_perfect_hv_and_masks_types_of_untyped_samples() -> None:
    ds = HoverTrainDataset([_disc_sample()], augment=False)
    item = ds[0]
    batch = {k: v.unsqueeze(0) for k, v in item.items()}
    big = 50.0
    np_logits = torch.stack([(1 - batch["np"]) * big, batch["np"] * big], 1).float()
    tp_logits = torch.nn.functional.one_hot(batch["tp"], 5).permute(0, 3, 1, 2).float() * big
    out = {"np": np_logits, "hv": batch["hv"].clone(), "tp": tp_logits}
    total, terms = hovernet_loss(out, batch, LossWeights(np_dice=0, tp_dice=0))
    assert terms["hv_mse"] == 0 and terms["hv_msge"] == 0
    assert total.item() < 1e-6
    batch["has_types"] = torch.tensor([False])
    _, terms = hovernet_loss({**out, "tp": torch.zeros_like(tp_logits)}, batch)
    assert "tp_ce" not in terms


def test_one_training_step_lowers_the_loss_on_a_tiny_batch() -> None:
    model = _tiny_model().train()
    ds = HoverTrainDataset([_disc_sample(f"d{i}") for i in range(2)], augment=False)
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ds[0]}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss, _ = hovernet_loss(model(batch["image"]), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bn_l1_penalty_sums_absolute_gammas() -> None:
    model = _tiny_model()
    expected = sum(m.weight.abs().sum().item() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn_l1_penalty(model).item() == pytest.approx(expected, rel=1e-5)


def test_lr_schedule_warms_up_then_follows_a_cosine() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=10)
    assert lr_at(0.0, 0, cfg) == pytest.approx(1e-4)
    assert lr_at(0.0, 10, cfg) == pytest.approx(1e-3)
    assert lr_at(0.5, 100, cfg) == pytest.approx(5e-4)
    assert lr_at(1.0, 100, cfg) == pytest.approx(0.0)


def test_rare_classes_get_larger_cross_entropy_weights() -> None:
    sample = _disc_sample()
    weights = tp_class_weights([sample], 5)
    counts = np.bincount(sample.type_map.ravel(), minlength=5)
    assert weights[0] == 1.0
    rarest, commonest = 1 + int(np.argmin(counts[1:])), 1 + int(np.argmax(counts[1:]))
    assert weights[rarest] >= weights[commonest]


def test_invalid_options_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(learning_rate=1.0)


def test_fit_runs_evaluates_keeps_best_and_resumes(tmp_path: Path, consep_train: Path) -> None:
    ds = load_dataset(consep_train)
    train = [s for s in ds.samples if s.name in ("train_1_000", "train_1_001")]
    dev = [s for s in ds.samples if s.name == "train_2_005"]
    cfg = TrainConfig(epochs=1, batch_size=2, warmup_steps=1, threads=1, bf16=False, crops_per_large_image=1)
    saved: list[dict] = []
    model = _tiny_model()
    result = fit(model, train, dev, cfg, tmp_path, on_best=lambda m, d: saved.append(d), progress=False)
    assert result.epochs_run == 1 and len(saved) == 1
    assert {"pq", "aji", "dice", "f1_detection"} <= set(saved[0])
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1 and state["step"] == 1
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[0]["dev"]["n_images"] == 1

    cfg2 = cfg.model_copy(update={"epochs": 2})
    resumed = fit(_tiny_model(seed=1), train, dev, cfg2, tmp_path, resume=True, progress=False)
    assert resumed.epochs_run == 1
    assert len(resumed.history) == 2 and resumed.history[-1]["epoch"] == 2


def test_a_bad_select_metric_is_a_config_error(tmp_path: Path) -> None:
    samples = [_disc_sample("a"), _disc_sample("b")]
    cfg = TrainConfig(epochs=1, batch_size=2, warmup_steps=1, threads=1, bf16=False, select_metric="accuracy")
    with pytest.raises(ConfigError, match="select_metric"):
        fit(_tiny_model(), samples, samples[:1], cfg, tmp_path, progress=False)


def test_loss_terms_can_stay_on_the_device_and_equal_the_floats() -> None:
    model = _tiny_model()
    ds = HoverTrainDataset([_disc_sample()], input_size=model.input_size, output_size=model.output_size,
                           augment=False)
    batch = {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else v) for k, v in ds[0].items()}
    out = model(batch["image"])
    _, floats = hovernet_loss(out, batch)
    _, tensors = hovernet_loss(out, batch, as_floats=False)
    assert set(floats) == set(tensors)
    for key, value in tensors.items():
        assert isinstance(value, torch.Tensor) and not value.requires_grad
        assert float(value) == pytest.approx(floats[key])


def test_a_device_torch_cannot_use_is_refused_before_training(tmp_path: Path) -> None:
    samples = [_disc_sample("a"), _disc_sample("b")]
    for device, match in (("tpu", "not a torch device|not supported"), ("cuda", "no CUDA GPU")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        cfg = TrainConfig(epochs=1, batch_size=2, threads=1, bf16=False, device=device)
        with pytest.raises(ConfigError, match=match):
            fit(_tiny_model(), samples, (), cfg, tmp_path, progress=False)


def test_workers_and_a_time_based_evaluation_cadence(tmp_path: Path) -> None:
    """Loader worker processes feed the same training; eval_every_minutes overrides eval_every."""
    samples = [_disc_sample("a"), _disc_sample("b")]
    cfg = TrainConfig(epochs=2, batch_size=2, warmup_steps=0, threads=1, bf16=False, workers=1,
                      eval_every=100, eval_every_minutes=1e-6, augment=False, balance_rare_classes=False)
    result = fit(_tiny_model(), samples, samples[:1], cfg, tmp_path, progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert all("dev" in row for row in result.history)  # both epochs evaluated despite eval_every=100
    cfg_epochs = cfg.model_copy(update={"eval_every_minutes": None, "workers": 0})
    result = fit(_tiny_model(), samples, samples[:1], cfg_epochs, tmp_path / "b", progress=False)
    assert ["dev" in row for row in result.history] == [False, True]  # only the last epoch


def test_a_weight_average_is_what_is_evaluated_saved_and_resumed(tmp_path: Path) -> None:
    """With ema_decay the run's result is the exponential average of the weights after each step,
    continued across a resume; without it the result is the last weights."""
    samples = [_disc_sample("a"), _disc_sample("b"), _disc_sample("c"), _disc_sample("d")]
    decay = 0.6
    cfg = TrainConfig(epochs=1, batch_size=2, warmup_steps=0, threads=1, bf16=False, augment=False,
                      balance_rare_classes=False, crops_per_large_image=1, ema_decay=decay, lr=1e-2)
    after_steps: list[dict[str, torch.Tensor]] = []

    def record(m: torch.nn.Module) -> None:
        after_steps.append({k: v.detach().clone() for k, v in m.named_parameters()})

    judged: list[dict[str, torch.Tensor]] = []

    def on_best(m: torch.nn.Module, _dev: dict) -> None:
        judged.append({k: v.detach().clone() for k, v in m.named_parameters()})

    model = _tiny_model()
    fit(model, samples, samples[:1], cfg, tmp_path, step_hook=record, on_best=on_best, progress=False)
    fit(model, samples, samples[:1], cfg.model_copy(update={"epochs": 2}), tmp_path, step_hook=record,
        resume=True, progress=False)
    assert len(after_steps) == 4
    expected = dict(after_steps[0])
    for weights in after_steps[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.detach(), expected[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(value.detach(), after_steps[-1][name]) for name, value in model.named_parameters())
    # what was evaluated and handed to on_best after epoch 1 was the average of its two steps
    first = {k: decay * after_steps[0][k] + (1 - decay) * after_steps[1][k] for k in expected}
    for name, value in judged[0].items():
        torch.testing.assert_close(value, first[name], rtol=1e-5, atol=1e-6)
    assert load_checkpoint(tmp_path / "last.pt")["ema"] is not None

    plain = _tiny_model()
    last: list[dict[str, torch.Tensor]] = []
    fit(plain, samples, (), cfg.model_copy(update={"ema_decay": None}), tmp_path / "plain",
        step_hook=lambda m: last.append({k: v.detach().clone() for k, v in m.named_parameters()}), progress=False)
    for name, value in plain.named_parameters():
        torch.testing.assert_close(value.detach(), last[-1][name])
