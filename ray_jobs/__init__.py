"""The jobs, one recipe per `vaectl` verb (train and its worker, embed, publish, monitor, embeddings,
pipeline, demo, submit), each reading top to bottom over the `vae` library and `feast_embeddings`;
with what they share: the configs (config), the CLI (cli), Ray placement (cluster) and the figures
they push (pushgateway)."""
