"""Objectives: the losses a training step minimises, one class each, chosen by `--loss`.

base.py holds the interface (Objective, ObjectiveOutput), metrics.py the metrics every objective
reports, ranking.py what the ranking losses share; rrhf.py, dpo.py, listwise.py (dpo-pl, lipo, pro),
pairwise.py (simpo, orpo) and reward.py the objectives. A new one is a subclass of Objective, a line in
OBJECTIVES and its name in config.LOSSES (the --loss choices; tests/test_objectives.py checks
that the two agree).
"""

from __future__ import annotations

from rrhf_fast.config import TrainConfig
from rrhf_fast.errors import UserError
from rrhf_fast.objectives.base import Objective, ObjectiveOutput
from rrhf_fast.objectives.dpo import DPO
from rrhf_fast.objectives.listwise import DPOPL, PRO, LiPO
from rrhf_fast.objectives.metrics import Metrics, RankingCounts, ranking_counts
from rrhf_fast.objectives.pairwise import ORPO, SimPO
from rrhf_fast.objectives.reward import RewardModel
from rrhf_fast.objectives.rrhf import RRHF

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (RRHF, DPO, DPOPL, LiPO, PRO, SimPO, ORPO, RewardModel)
}

__all__ = ["OBJECTIVES", "Metrics", "Objective", "ObjectiveOutput", "RankingCounts", "build_objective",
           "ranking_counts"]  # fmt: skip


def build_objective(config: TrainConfig) -> Objective:
    """The objective `config.loss` names, built from the run's flags."""
    cls = OBJECTIVES.get(config.loss)
    if cls is None:
        raise UserError(f"--loss {config.loss} is not an objective; choose one of {', '.join(OBJECTIVES)}")
    return cls(config)
