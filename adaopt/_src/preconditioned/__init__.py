"""Matrix-aware methods: the step of each weight matrix as a whole (Muon), or preconditioned by Kronecker
factors of its axes (Shampoo, and SOAP's Adam in their eigenbasis), not coordinate by coordinate."""
