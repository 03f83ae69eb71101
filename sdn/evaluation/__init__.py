"""Evaluation: −ELBO and importance-weighted NLL, disentanglement scores, sample pictures."""
