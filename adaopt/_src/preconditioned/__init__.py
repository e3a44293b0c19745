"""Matrix-aware methods: the step of each weight matrix as a whole (Muon; Scion, through the linear
minimisation oracle of each layer's norm), or preconditioned by Kronecker factors of its axes (Shampoo,
and SOAP's Adam in their eigenbasis), not coordinate by coordinate."""
