"""MFIS: many-objective filter index sharing, a reconstruction of Cheng, Wang, Ma, Liu & Wei, Cognitive
Computation 13(4):1070–1084, 2021 (only the abstract is public; METHODS.md §4 documents our choices).

``mfis(models, data)`` merges T single-task chain networks into one multi-task network whose per-layer index
matrices (which task uses which filter slot) come from an NSGA-III search (Deb & Jain 2014) over T + 2
objectives: each task's importance lost, the merged network's MACs, and the dissimilarity of merged filters.
pymoo is imported only when a search runs.
"""

from .build import MFISNet, SlotGroup, build_mfis
from .encoding import Layout, Settled, decode, encode, from_keep_sets, keep_counts, settle, to_keep_sets
from .objectives import Evaluation, Landscape, LayerStats, evaluate, fidelity_table, merge_cost_table, subset_macs
from .report import MFISReport, plot_front, sharing_table
from .run import MFISConfig, MFISSearch, load_mfis_config, mfis, mfis_search, run_from_config
from .serialize import load_mfis, rebuild_mfis
from .solve import ParetoFront, knee_point, select_solution, solve

__all__ = [
    "Evaluation", "Landscape", "LayerStats", "Layout", "MFISConfig", "MFISNet", "MFISReport",
    "MFISSearch", "ParetoFront", "Settled", "SlotGroup", "build_mfis", "decode", "encode", "evaluate", "fidelity_table",
    "from_keep_sets", "keep_counts", "knee_point", "load_mfis", "load_mfis_config", "merge_cost_table", "mfis",
    "mfis_search", "plot_front", "rebuild_mfis", "run_from_config", "select_solution", "settle", "sharing_table",
    "solve", "subset_macs", "to_keep_sets",
]
