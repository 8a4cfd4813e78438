"""objectives.metrics: the model's pick per query (first maximum; no maximum when all NaN)."""

import torch

from rrhf_fast.objectives.metrics import ranking_counts


def test_top1_takes_the_first_of_tied_model_scores():
    # query 0: p ties at responses 1 and 2 -> the first (reward 0), not the best-rewarded (reward 5)
    # query 1: p is highest at response 3 (reward 2), its best reward -> a top-1 hit
    p = torch.tensor([-3.0, -1.0, -1.0, 0.5, -2.0])
    r = torch.tensor([1.0, 0.0, 5.0, 2.0, 1.0])
    counts = ranking_counts(p, r, torch.tensor([0, 0, 0, 1, 1]), 2)
    assert (counts.top1, counts.best_reward) == (1, 2.0)


def test_all_nan_scores_pick_the_first_response_of_the_query():
    # a non-finite step: query 0's scores are all NaN -> its first response (reward 3) is the pick
    nan = float("nan")
    p = torch.tensor([0.0, -1.0, nan, nan, nan])
    r = torch.tensor([1.0, 2.0, 3.0, 7.0, 4.0])
    counts = ranking_counts(p, r, torch.tensor([1, 1, 0, 0, 0]), 2)
    assert (counts.top1, counts.best_reward, counts.queries) == (0, 1.0 + 3.0, 2)
