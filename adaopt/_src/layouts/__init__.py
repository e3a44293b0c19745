"""How the step is laid out in memory, around any elementwise optimizer: single_pass, multi_tensor, flat parameters."""
