"""`ensemble_topk` (placeholder until its kernel lands)."""


def ensemble_topk(*args, **kwargs):
    raise NotImplementedError("ensemble_topk is not implemented yet")
