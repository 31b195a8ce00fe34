"""Embeddings as data: the row contract every reader relies on (contract), the Apache Iceberg catalog of
entity sets, version tables and batches (catalog), a lease lock in the catalog's database (lock), and
embedding runs that land exactly once as one batch (runs). No Ray, no Feast: what is published is
feast_embeddings' business."""
