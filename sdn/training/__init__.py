"""Training: the Lightning module that wraps either VAE, and the pieces that make runs resumable.

- `module`: `VAEModule` (seeded micro-batches, the model's own loss, EMA weights, optimiser and
  schedule, validation) and `load_ema_model`, the weights evaluation and sampling use;
- `checkpoints`: atomic checkpoint writes, saves every N steps, resuming only a checkpoint of the
  same configuration (`config_fingerprint`);
- `curves`: train.csv, val.csv and live.json, written while the run goes;
- `machine`: `fit_to_machine`, how a run's `devices` meet the accelerators this machine has (the
  global batch kept by accumulation), and its refusal to run a GPU preset without a GPU;
- `processes`: `run_ranks`, the processes of a DDP run launched and stopped together;
- `progress`: the training progress bar, optimizer steps out of `max_steps`;
- `run`: `train_experiment`, the whole run that `stages/train.py` calls.

The data, their order (`StepBatchSampler`, `ShardSampler`) and the flips come from
`sdn.data.datamodule`. The random draws of each micro-batch (flips, posterior noise) are seeded
by the micro-batch's place in the run, so resumed, distributed and accumulated runs draw the same.

Each name is imported from the module that defines it, so a stage importing one piece (the release
import needs the fingerprint) neither loads nor depends on the others: dvc.yaml lists each
stage's modules.
"""
