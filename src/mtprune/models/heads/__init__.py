"""The head zoo; importing this package registers every head (see ``mtprune.models.registry``).

Every head maps backbone features to one task's outputs at feature resolution, and names its output layers
through a ``predictor`` property (a list of modules) so that pruning can protect them.
"""

from . import aspp, simple

__all__ = ["aspp", "simple"]
