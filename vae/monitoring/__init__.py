"""Is a latent space still the one downstream models learned? The statistics (drift tests, movement
between versions, anomaly thresholds), the checks a batch must pass and their thresholds (gate,
thresholds), and the JSON + HTML report."""
