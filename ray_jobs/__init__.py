"""Ray jobs over the `vae` library: train, embed, publish, and the end-to-end demo."""
