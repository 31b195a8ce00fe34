"""A trained model as an artifact: the immutable version folder (safetensors + model.json, written
atomically, checked on load), the MLflow registry of record (tracked runs, registered versions,
aliases, models:/ URIs), and the pyfunc code registered versions carry. No Ray, no Feast."""
