"""Retrieval on top of the sidecar, embedding through the client it is given:
vector collections shared by every worker of the host (:mod:`retrieval.collections.store`)
and web search ranked by embeddings (:mod:`retrieval.websearch`). Importing it
imports nothing; the original system's calls (``build_vector_index``,
``search_index``, ``web_search_with_embeddings``) are in :mod:`compat`."""
