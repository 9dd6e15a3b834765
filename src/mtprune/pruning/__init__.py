"""Structured pruning: the channel-dependency graph (graph.py, the only Torch-Pruning user), criteria, budget
allocators and schedules."""

from . import pagcp as _pagcp  # noqa: F401  registers allocator "pagcp" with prune.LOOP_ALLOCATORS
