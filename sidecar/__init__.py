"""The shm-embed sidecar: one process that holds the model and serves every
worker of the host through the shared-memory rings.

Modules:

* :mod:`sidecar.server` -- the lifecycle: ``Sidecar`` creates the namespace
  (lock, segments, semaphores), runs the heartbeat and the batching loop,
  gives up on a wedged loop, drains on stop and removes what it created.
* :mod:`sidecar.scheduler` -- the batching: ``Scheduler`` scans the doorbell
  and the slot states, admits slots fairly, validates them, runs the model
  calls, publishes and counts the answers, and reaps the rings of dead workers.
* :mod:`sidecar.planner` -- pure batch planning (order, admission, model
  calls, ETAs), tested without shared memory or a model.
* :mod:`sidecar.call_size` -- texts per model call, refined from measured texts/s (pure).
* :mod:`sidecar.model` -- the model loaded once, padded batches on CPU or CUDA.
* :mod:`sidecar.cuda_graphs` -- a model's calls captured as CUDA graphs per (rows, width) bucket.
* :mod:`sidecar.synthetic` -- a model-free backend with the same interface.
* :mod:`sidecar.tiny` -- a tiny random model for fast tests and benchmarks.
* :mod:`sidecar.__main__` -- the ``shm-embed-sidecar`` entry point.
"""
