"""`multi_task_score` (placeholder until its kernel lands)."""


def multi_task_score(*args, **kwargs):
    raise NotImplementedError("multi_task_score is not implemented yet")
