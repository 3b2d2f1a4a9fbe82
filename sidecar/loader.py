"""Loading the models the settings name: torch models, or the synthetic
backend's stand-ins. Apart from both backends so neither imports the other."""

from __future__ import annotations

from shm_protocol.config import Settings

from .backend import Backend, model_specs


def load_models(settings: Settings) -> list[Backend]:
    """Every model the settings name, loaded, default first: the synthetic
    backend's stand-ins when SHM_EMBED_SYNTHETIC_US >= 0, else torch models
    (on CUDA with their calls captured as CUDA graphs, SHM_EMBED_CUDA_GRAPHS)."""
    specs = model_specs(settings)
    if settings.synthetic_us >= 0:
        from .synthetic import SyntheticEmbedder  # no torch: imported only when served

        return [SyntheticEmbedder(settings, spec) for spec in specs]
    from .model import Embedder  # imports torch

    models: list[Backend] = []
    for spec in specs:
        model = Embedder(settings, spec)
        if model.is_cuda and settings.cuda_graphs == "auto":
            from .cuda_graphs import GraphedEmbedder

            model = GraphedEmbedder(model)  # captured per bucket; eager, with a log line, where it cannot be
        models.append(model)
    return models
