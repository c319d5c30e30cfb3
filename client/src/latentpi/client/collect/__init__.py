"""`latentpi collect`: LIBERO tasks × trials through a policy server into one HDF5 file per task.

Resumable (completed episodes are skipped, incomplete ones redone), crash-safe (storage), parallel
across tasks (`workers`), and robust to a lost server (retried with backoff, the episode in flight
redone). See docs/collect.md.
"""

from latentpi.client.collect.options import CollectOptions, task_range
from latentpi.client.collect.run import CollectResult, collect, plan_tasks
from latentpi.client.collect.workers import CollectError

__all__ = ["CollectError", "CollectOptions", "CollectResult", "collect", "plan_tasks", "task_range"]
