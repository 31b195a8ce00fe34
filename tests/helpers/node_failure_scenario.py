"""Run by test_fault_tolerance in its own process (it needs its own multi-node Ray cluster).

A head node (no training) and two worker nodes on this machine (ray.cluster_utils.Cluster). Training
runs in a thread; after its second checkpoint one worker node is removed and a replacement added.
Prints one JSON line with the outcome.
"""

import json
import sys
import threading
import time
from pathlib import Path

from ray.cluster_utils import Cluster

from ray_jobs.config import TrainConfig
from ray_jobs.train import train

work, data = Path(sys.argv[1]), sys.argv[2]
cluster = Cluster(
    initialize_head=True, connect=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
)
workers = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
config = TrainConfig(
    data=data,
    vector_column="vec",
    likelihood="gaussian",
    latent_dim=4,
    hidden_dims=[256, 256],
    epochs=6,
    batch_size=64,
    kl_warmup_epochs=0,
    num_workers=2,
    worker_resources={"trainer": 1},
    max_failures=2,
    checkpoint_every=1,
    iw_samples=0,
    report_rows=0,
    model_root=str(work / "models"),
    storage_path=str(work / "ray_results"),
    run_name="node-failure",
)
outcome: dict = {}
thread = threading.Thread(target=lambda: outcome.update(version=train(config)))
thread.start()
snapshot = work / "ray_results" / "node-failure" / "checkpoint_manager_snapshot.json"


def registered_epoch() -> int:
    """The epoch of the latest checkpoint Ray Train has registered (what a restart resumes from)."""
    try:
        return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0


deadline = time.monotonic() + 240
while registered_epoch() < 2 and thread.is_alive() and time.monotonic() < deadline:
    time.sleep(0.2)
outcome["registered_epoch_before_failure"] = registered_epoch()
cluster.remove_node(workers[0])
outcome["node_removed_at"] = time.time()
cluster.add_node(num_cpus=1, resources={"trainer": 1})
thread.join(timeout=400)
outcome["finished"] = not thread.is_alive()
print(json.dumps(outcome), flush=True)
cluster.shutdown()
