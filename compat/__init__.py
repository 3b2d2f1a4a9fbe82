"""The original system's surface, kept working beside the protocol package:
its module-level API (``get_embedding_client``, ``get_embedding_model``,
``is_using_ipc_embedding``, ``generate_embeddings``,
``get_active_operations_count``) and its local-model fallback
(``USE_IPC_EMBEDDING=false``, ``SHM_EMBED_FALLBACK=local``).

The fallback is the one place a worker may import torch, and only when it
must; ``shm_protocol`` itself never does."""
