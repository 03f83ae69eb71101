"""The two VAEs of the paper as plain `nn.Module`s, and their configuration dataclasses."""
