"""The shm-embed sidecar: one process that holds the model and serves every
worker of the host through the shared-memory rings."""
