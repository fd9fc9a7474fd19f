"""tp.comm: the communication wing: compressed collectives, their emulator, the fused
symmetric-memory path, the torch.compile rewrite pass and ``tp.compile``, and the policy
that says which collective gets which format."""
