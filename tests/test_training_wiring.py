"""Settings of params.yaml reaching the optimisation, observed inside real micro training runs
(`train_experiment`: the Lightning module, trainer and data the train stage uses): the per-epoch
learning-rate decay, the β annealing in the β-VAE's loss, gradient clipping, mixed precision and
training flips."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from sdn.config import ExperimentConfig, experiment_config
from sdn.training.run import train_experiment
from tests.evaluation_workdir import EvaluationWorkdir, micro_experiment, micro_project_params

DENSITY = "photos32-cnn"  # micro: 8x8 images, 48 training images in batches of 8: 6 steps an epoch
BETA_VAE = "sprites-cnn"
STEPS_PER_EPOCH = 48 // 8


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # micro models run fastest on one thread; the cores are shared
    yield
    torch.set_num_threads(threads)


def train(tmp_path: Path, cfg: ExperimentConfig, *callbacks: pl.Callback):
    work = EvaluationWorkdir(tmp_path, cfg)  # random LMDB splits (and a checkpoint this run ignores)
    run = tmp_path / "run"
    return train_experiment(
        cfg, work.lmdb, run / "checkpoints", run / "metrics", stale_dir=run / "stale",
        extra_callbacks=list(callbacks),
    )


class TrainingForwards(pl.Callback):
    """Each training step's batch, the model's input and output, and the loss the step returned;
    plus whether autocast was on, and in which dtype, inside the model's forward."""

    def __init__(self) -> None:
        self.batches, self.inputs, self.outputs, self.losses, self.autocast = [], [], [], [], []

    def on_train_start(self, trainer, module) -> None:
        def record(model, args, out):
            if model.training:  # validation runs the same model in eval mode
                self.inputs.append(args[0].detach().clone())
                self.outputs.append({k: v.detach().clone() for k, v in out.items() if torch.is_tensor(v)})
                enabled = torch.is_autocast_enabled("cpu")
                self.autocast.append(torch.get_autocast_dtype("cpu") if enabled else None)

        module.model.register_forward_hook(record)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batches.append((batch[0] if isinstance(batch, (list, tuple)) else batch).clone())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


# ---------------------------------------------------------------------------------------------
# Learning-rate decay: once per epoch, lr * lrate_decay ** epoch


class LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.by_step[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def test_learning_rate_decays_once_per_epoch(tmp_path: Path):
    steps = 2 * STEPS_PER_EPOCH + 2
    cfg = micro_experiment(DENSITY, train={"lr": 0.004, "lrate_decay": 0.5, "max_steps": steps})
    rates = LearningRates()
    train(tmp_path, cfg, rates)
    assert sorted(rates.by_step) == list(range(steps))
    # epoch 0: 0.004; epoch 1: 0.002; epoch 2: 0.001 -- the rate changes only at epoch boundaries
    expected = [0.004] * 6 + [0.002] * 6 + [0.001] * 2
    assert [rates.by_step[s] for s in range(steps)] == pytest.approx(expected, rel=1e-12)


def test_learning_rate_without_decay_stays_put(tmp_path: Path):
    cfg = micro_experiment(DENSITY, train={"lr": 0.003, "lrate_decay": 1.0, "max_steps": STEPS_PER_EPOCH + 2})
    rates = LearningRates()
    train(tmp_path, cfg, rates)
    assert set(rates.by_step.values()) == {0.003}


# ---------------------------------------------------------------------------------------------
# β: the β-VAE's loss weighs the KL with the annealed β of the step


class DistantPosterior(pl.Callback):
    """Moves the untrained encoder's posterior away from the prior (its last Linear's bias to 2:
    mean 2, variance e^2 per latent), so each image's KL is some 12 nats: far above the float32
    rounding of a reconstruction term of thousands of nats, so β's share of the loss shows."""

    def on_train_start(self, trainer, module) -> None:
        last = [m for m in module.model.modules() if isinstance(m, torch.nn.Linear)]
        encoder_out = next(m for m in last if m.out_features == 2 * module.cfg.model.z_size)
        with torch.no_grad():
            encoder_out.bias.fill_(2.0)


def test_beta_zero_leaves_the_reconstruction_only(tmp_path: Path):
    cfg = micro_experiment(BETA_VAE, model={"beta_final": 0.0, "beta_rate": 1.0}, train={"max_steps": 2})
    seen = TrainingForwards()
    train(tmp_path, cfg, DistantPosterior(), seen)
    assert len(seen.losses) == len(seen.outputs) == 2
    for loss, out in zip(seen.losses, seen.outputs, strict=True):
        assert out["kl"].mean() > 5  # so leaving it out shows
        assert loss == pytest.approx(float(-out["log_px"].mean()), abs=0.05)


def test_beta_follows_the_annealing_step_by_step(tmp_path: Path):
    # beta_final 2, beta_rate 0.25: β grows by 0.5 a step up to 2. The first optimizer step
    # already uses β_1 = 0.5 (β_0 = 0 is the value before any step).
    # (a small lr keeps the posterior, and so the KL, where DistantPosterior put it)
    cfg = micro_experiment(
        BETA_VAE, model={"beta_final": 2.0, "beta_rate": 0.25}, train={"max_steps": 6, "lr": 1e-6}
    )
    seen = TrainingForwards()
    train(tmp_path, cfg, DistantPosterior(), seen)
    assert all(out["kl"].mean() > 5 for out in seen.outputs)
    betas = [
        float((loss + out["log_px"].mean()) / out["kl"].mean())  # loss = -(log p(x|z) - β KL)
        for loss, out in zip(seen.losses, seen.outputs, strict=True)
    ]
    assert betas == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0], abs=0.01)


# ---------------------------------------------------------------------------------------------
# Gradient clipping: the optimizer sees gradients of norm at most train.gradient_clip_val


class Gradients(pl.Callback):
    """Gradient norms before clipping (Lightning's hook runs before it) and as the optimizer
    used them (read right after its step, before the next zero_grad)."""

    def __init__(self) -> None:
        self.raw, self.used = [], []

    @staticmethod
    def _grads(module) -> list[torch.Tensor]:
        return [p.grad.detach().clone() for p in module.model.parameters() if p.grad is not None]

    def on_train_start(self, trainer, module) -> None:
        optimizer = trainer.optimizers[0]
        optimizer.register_step_post_hook(lambda *args: self.used.append(self._grads(module)))

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.raw.append(self._grads(module))


def total_norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


@pytest.mark.parametrize("clip", [None, 0.05])
def test_gradient_clipping_bounds_the_norm_the_optimizer_sees(tmp_path: Path, clip):
    cfg = micro_experiment(DENSITY, train={"gradient_clip_val": clip, "max_steps": 3})
    grads = Gradients()
    train(tmp_path, cfg, grads)
    assert len(grads.raw) == len(grads.used) == 3
    for raw, used in zip(grads.raw, grads.used, strict=True):
        assert total_norm(raw) > 0.5  # an untrained model's gradients are far above the bound
        if clip is None:
            assert total_norm(used) == pytest.approx(total_norm(raw), rel=1e-9)
        else:
            assert total_norm(used) == pytest.approx(clip, rel=1e-3)
            # clipped by norm: the same direction, scaled
            scale = total_norm(used) / total_norm(raw)
            for r, u in zip(raw, used, strict=True):
                torch.testing.assert_close(u, r * scale, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Mixed precision: trainer.precision reaches the training forward


class ValidationForwards(pl.Callback):
    """Whether autocast was on, and in which dtype, inside each validation forward (the EMA
    weights' model), and the dtype of its ELBO."""

    def __init__(self) -> None:
        self.autocast, self.elbo_dtypes = [], []

    def on_train_start(self, trainer, module) -> None:
        def record(model, args, out):
            enabled = torch.is_autocast_enabled("cpu")
            self.autocast.append(torch.get_autocast_dtype("cpu") if enabled else None)
            self.elbo_dtypes.append(out["elbo"].dtype)

        module.eval_model.register_forward_hook(record)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("32-true", None)])
def test_precision_reaches_the_training_and_validation_forwards(tmp_path: Path, precision, dtype):
    # bf16-mixed: the one mixed precision CPU autocast has, through the Lightning module as a GPU
    # run goes through it (micro: 2 steps, then one validation batch of the EMA weights)
    cfg = micro_experiment(DENSITY, trainer={"precision": precision}, train={"max_steps": 2})
    seen, validated = TrainingForwards(), ValidationForwards()
    module = train(tmp_path, cfg, seen, validated)
    assert seen.autocast == [dtype, dtype]
    assert all(math.isfinite(loss) for loss in seen.losses)
    assert validated.autocast == [dtype] and validated.elbo_dtypes == [torch.float32]  # likelihoods upcast
    assert [row["step"] for row in module.val_rows] == [2]
    assert all(math.isfinite(module.val_rows[0][key]) for key in ("neg_elbo_bpd", "kl_bpd"))
    assert all(p.dtype == torch.float32 for p in module.model.parameters())  # weights stay fp32
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


# ---------------------------------------------------------------------------------------------
# Flips: training images are mirrored at random when the dataset says so


@pytest.mark.parametrize("flip", [True, False])
def test_training_flips_follow_the_dataset(tmp_path: Path, flip):
    params = micro_project_params(DENSITY, train={"max_steps": 4})
    params["datasets"]["photos32"]["flip"] = flip
    cfg = experiment_config(params, DENSITY)
    seen = TrainingForwards()
    model = train(tmp_path, cfg, seen).model
    mirrored = same = 0
    for batch, given in zip(seen.batches, seen.inputs, strict=True):
        plain, flipped = model.obs.preprocess(batch), model.obs.preprocess(batch.flip(-1))
        for x, a, b in zip(given, plain, flipped, strict=True):
            assert torch.equal(x, a) or torch.equal(x, b)
            same += torch.equal(x, a)
            mirrored += torch.equal(x, b) and not torch.equal(a, b)
    assert same + mirrored == 4 * 8
    if flip:
        assert 8 <= mirrored <= 24  # about half of 32
    else:
        assert mirrored == 0
