"""Training reads its data through the public data path (`sdn.data.datamodule`): the checked
LMDB split in the step order of `StepBatchSampler`, mirrored at random for datasets with
`flip: true` and never for the others."""

from __future__ import annotations

import pytest
import torch

from sdn.config import experiment_config
from sdn.data.datamodule import ImageDataModule
from sdn.models.density import DensityVAE
from tests.reliability_tools import EXPERIMENT, Workdir, tiny_params

pytestmark = pytest.mark.usefixtures("isolated_torch")

STEPS, BATCH = 4, 4


@pytest.mark.parametrize("flip", [True, False])
def test_training_flips_exactly_the_datasets_that_ask_for_it(tmp_path, monkeypatch, flip: bool) -> None:
    workdir = Workdir(tmp_path)
    params = tiny_params(max_steps=STEPS, batch_size=BATCH, val_every_steps=STEPS)
    params["datasets"]["photos32"]["flip"] = flip
    cfg = experiment_config(params, EXPERIMENT)
    seen: list[torch.Tensor] = []
    forward = DensityVAE.forward

    def recording(model: DensityVAE, x: torch.Tensor):
        if torch.is_grad_enabled():  # the training steps: validation runs without gradients
            seen.append(x.detach().clone())
        return forward(model, x)

    monkeypatch.setattr(DensityVAE, "forward", recording)
    module = workdir.train(cfg)

    data = ImageDataModule.for_experiment(cfg, workdir.lmdb)
    train = data.dataset("train")
    order = [index for batch in data.train_sampler() for index in batch]
    originals = module.model.obs.preprocess(torch.stack([train[i][0] for i in order]))
    inputs = torch.cat(seen)
    assert len(inputs) == len(order) == STEPS * BATCH
    mirrored = [not torch.equal(x, image) for x, image in zip(inputs, originals, strict=True)]
    # every image the model saw is the one the data path deals at that place, as stored or mirrored
    for x, image, flipped in zip(inputs, originals, mirrored, strict=True):
        assert torch.equal(x, image.flip(-1) if flipped else image)
    if flip:
        assert 0 < sum(mirrored) < len(mirrored)
    else:
        assert not any(mirrored)
