"""Rows -> model inputs: which columns feed the model and how they are checked (features), mixed
tables' per-column schema and transforms (tabular), the normalizer and its statistics (normalizer),
and the key hash that decides splits, shards and samples (keys). No Ray, no Feast, no catalog."""
