"""`embedding_bags` (for now the reference path; the native kernel replaces this module)."""

from ..reference.embedding_bags import embedding_bags  # noqa: F401
