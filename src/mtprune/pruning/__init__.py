"""Structured pruning: the channel-dependency graph (graph.py, the only Torch-Pruning user), criteria, budget
allocators and schedules."""
