"""Retrieval for stacks: a passage index built once on disk, and a stage kind that queries it (``kind: retrieve``).

The contract is :class:`~slmstack.retrieval.base.Retriever` (``search``), registered by kind in
:data:`~slmstack.retrieval.base.RETRIEVERS`; BM25 (through the ``bm25s`` library) is the one kind so far, and a
dense or remote retriever is another entry.
"""

from slmstack.retrieval import bm25  # noqa: F401  (registers "bm25"; bm25s itself is imported on use)
from slmstack.retrieval.base import RETRIEVERS, Passage, Retriever, build_index, format_passages, load_retriever

__all__ = ["RETRIEVERS", "Passage", "Retriever", "build_index", "format_passages", "load_retriever"]
