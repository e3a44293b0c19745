"""How the step is laid out in memory, around any optimizer: single_pass, multi_tensor, flat parameters on one
device, and shard_states (ZeRO) across a mesh's data axis."""
