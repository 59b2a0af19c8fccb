"""Training on users' data: one loop, a module per model (denoiser, MagNet, SPATIA)."""
