"""Pure loss functions `(loss, priorities, metrics)`, value rescaling and the C51 projection."""
from apex_local.losses.c51 import c51_loss, categorical_projection
from apex_local.losses.common import huber, is_finite, select
from apex_local.losses.dqn import dqn_loss, dqn_targets
from apex_local.losses.drqn import DRQN_MODES, drqn_loss
from apex_local.losses.r2d2 import (DISCREPANCY_EVERY, initial_sequence_priorities, n_step_targets,
                                    q_value_discrepancy, r2d2_loss, sequence_priorities)
from apex_local.losses.rescale import inverse_value_rescale, value_rescale
from apex_local.losses.types import SequenceBatch, TransitionBatch

__all__ = [
    "DISCREPANCY_EVERY", "DRQN_MODES", "SequenceBatch", "TransitionBatch", "c51_loss", "categorical_projection",
    "dqn_loss", "dqn_targets", "drqn_loss", "huber", "initial_sequence_priorities", "inverse_value_rescale", "is_finite",
    "n_step_targets", "q_value_discrepancy", "r2d2_loss", "select", "sequence_priorities", "value_rescale",
]
