"""Web search ranked by embeddings: the guarded page fetcher (:mod:`.fetch`),
HTML main-text extraction (:mod:`.extract`) and the search itself
(:mod:`.websearch`), which embeds through the client it is given."""
