"""The jobs, one recipe per `vaectl` verb (train and its worker, embed, publish, monitor, embeddings,
pipeline, demo, submit), each reading top to bottom over the `vae` library and `feast_embeddings`;
with what they share: the configs (config), the CLI (cli), Ray placement (cluster) and the figures
they push (pushgateway)."""

from vae.secrets import redact_logs

# Every process that runs a job's code (the driver, Ray's train and data workers, Serve replicas)
# imports this package first: from then on no log record of it carries a credential.
redact_logs()
