"""The two VAEs of the paper as plain `nn.Module`s, and what they are built from.

- `configs`: their hyper-parameters and the one geometry (no torch: `sdn.config` imports it, and
  importing it runs this file, which therefore imports nothing);
- `density`: the SDN-VAE; `disentanglement`: the SDN β-VAE;
- `latents`: posteriors and priors; `observations`: the observation models; `distributions`: what
  both share, and `bits_per_dim`;
- `build`: `build_model`, the model an experiment trains, and `prepare_model`, the release's
  initialisation and weight norm.
"""
