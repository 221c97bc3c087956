"""Sequence parallelism for the Stand-In DiT over torch.distributed."""
