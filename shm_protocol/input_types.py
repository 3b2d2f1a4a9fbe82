"""Cohere's ``input_type`` mapped to a model's prompts.

An embedding model trained with prompts (config_sentence_transformers.json's
``prompts``) reads queries and documents with different prefixes; Cohere's
API names the role of the texts instead. Each input type looks for the first
of its candidate prompt names that the model has. A model without one (a
symmetric model such as all-MiniLM-L6-v2) embeds the texts as /embed would
(its default prompt, if it has one, else none): that is what a Cohere user
switching to such a model expects, since Cohere requires an input_type on
every call and its answers would otherwise all be refusals. An input type
that is not one of INPUT_TYPES is refused (InvalidInput, a 422).
"""

from __future__ import annotations

from .errors import InvalidInput

#: Each input type and the prompt names it takes, first found first.
INPUT_TYPES = {
    "search_query": ("search_query", "query"),
    "search_document": ("search_document", "document", "passage", "corpus"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}


def prompt_name_for(input_type: str | None, prompts: dict) -> str | None:
    """The name of the prompt among ``prompts`` that ``input_type`` maps to
    (None: the model has none for it, or no input type was given)."""
    if input_type is None:
        return None
    if input_type not in INPUT_TYPES:
        raise InvalidInput(f"input_type={input_type!r}: accepted values: {', '.join(INPUT_TYPES)}")
    return next((name for name in INPUT_TYPES[input_type] if name in prompts), None)
