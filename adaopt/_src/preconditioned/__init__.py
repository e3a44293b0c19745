"""Matrix-aware methods: the step of each weight matrix as a whole (Muon), not coordinate by coordinate."""
