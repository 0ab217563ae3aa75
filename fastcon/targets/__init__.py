"""The engine's general target: what a target means (``definition``: the ``Target`` and its rules,
stated on row chunks for the torch backend), the arithmetic between its two passes that every
backend shares (``passes``), and its wire format, the arrays the ops carry and the backends read
(``wire``). The functional API builds a ``Target``; the backends (``fastcon.kernels``) compute on it.
"""
from .definition import (TEACHER_GUIDE, TEACHER_LINEAR, Target, Teacher, chunk_logits, chunk_masks, column_span,
                         guided, hard_weight, margin_bound, pair_columns, rows_of, teacher_chunk, teacher_target)
from .passes import (Prefix, RowShard, TargetStats, TargetWeights, TeacherNorms, debiased_terms, group_lse, loss_and_weights,
                     needs_counts, teacher_norms, teacher_stats, two_pass_prefix_target, two_pass_target, weighted,
                     with_d_scale, with_teacher)

__all__ = ["TEACHER_GUIDE", "TEACHER_LINEAR", "Target", "Teacher", "chunk_logits", "chunk_masks", "column_span",
           "guided", "hard_weight", "margin_bound", "pair_columns", "rows_of", "teacher_chunk", "teacher_target",
           "Prefix", "RowShard", "TargetStats", "TargetWeights", "TeacherNorms",
           "debiased_terms", "group_lse", "loss_and_weights", "needs_counts", "teacher_norms", "teacher_stats",
           "two_pass_prefix_target", "two_pass_target", "weighted", "with_d_scale", "with_teacher"]
