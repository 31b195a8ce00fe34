"""The daily step's pure state and policy: the decision log (an Iceberg table per entity set) and what
the step decides from it (batch health, the retraining trigger, the watch after a switch, the training
window, the challenger's held-out ELBO). The orchestration that runs jobs is ray_jobs.pipeline."""
