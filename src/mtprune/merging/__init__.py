"""Merging single-task networks into one multi-task network: PAM (He et al., KDD 2021), and the cost of every
task subset for no merging, naive merging and PAM.

``pam(models, data)`` returns the merged network and a report of its partitions; ``separate_costs``,
``merged_costs``, ``cost_table`` and ``plot_costs`` compare the ways of serving the same tasks. The
``mtprune merge CONFIG`` pipeline is in ``merging.experiment`` (``merging.command`` for the CLI).
``extract_tasks(merged, subset)`` makes a deployable model of a task subset (``merging.subsets``);
``merging.relevance`` is the scale-free permutation-null relevance test (``pam(..., relevance="permutation")``);
``merging.continuation`` prunes one task's exclusive part of a merged network alone (PAM's per-task ladder).
"""

from .chain import Chain, Stage, read_chain
from .continuation import exclusive_macs, frozen_except, prune_exclusive
from .cost import SubsetCost, cost_table, merged_costs, plot_costs, separate_costs, subset_keys
from .grouping import Partition, irrelevant_set, partition
from .merged_net import MergedNet, MergedStage, TaskBranch, build_merged, settle
from .mfis import MFISNet, MFISReport, mfis
from .mutual_info import label_masks, mi_from_distances, mutual_information
from .naive import naive_merge, naive_partitions
from .pam import LayerReport, PAMReport, collect_batch, layer_activations, merge_with_partitions, pam
from .relevance import LayerRelevance, neuron_distances, permutation_relevance
from .subsets import deploy_costs, extract_tasks, load_merged, merged_structure
from .tasks import PresenceTask

__all__ = [
    "Chain", "LayerRelevance", "LayerReport", "MFISNet", "MFISReport", "MergedNet", "MergedStage", "PAMReport",
    "Partition", "PresenceTask", "Stage", "SubsetCost", "TaskBranch", "build_merged", "collect_batch", "cost_table",
    "deploy_costs", "exclusive_macs", "extract_tasks", "frozen_except",
    "irrelevant_set", "label_masks", "layer_activations", "load_merged",
    "merge_with_partitions", "merged_costs", "merged_structure", "mfis", "mi_from_distances", "mutual_information",
    "naive_merge", "naive_partitions", "neuron_distances", "pam", "partition", "permutation_relevance",
    "plot_costs", "prune_exclusive", "read_chain", "separate_costs", "settle", "subset_keys",
]
