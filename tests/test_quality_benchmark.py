"""The task-weight and monitor options of benchmarks.quality_ml100k (--set task_weights=..., monitor_tasks=...)."""

import pytest

from benchmarks.quality_ml100k import monitor_tasks, task_weights

TASKS = ["click", "like", "rating"]


def test_task_weights_in_task_order_unnamed_tasks_one():
    assert task_weights("like:2,click:0.5", TASKS) == [0.5, 2.0, 1.0]
    assert task_weights("rating:3", TASKS) == [1.0, 1.0, 3.0]
    assert task_weights("", TASKS) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("text, message", [
    ("like=2", "name:weight"),
    ("likes:2", "unknown task 'likes'"),
    ("like:2,like:3", "twice"),
])
def test_task_weights_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        task_weights(text, TASKS)


def test_task_weights_not_a_number():
    with pytest.raises(ValueError):
        task_weights("like:two", TASKS)


def test_monitor_tasks():
    assert monitor_tasks("like,rating", TASKS) == ["like", "rating"]
    with pytest.raises(ValueError, match="monitor_tasks"):
        monitor_tasks("like,ndcg", TASKS)
    with pytest.raises(ValueError, match="monitor_tasks"):
        monitor_tasks(",", TASKS)
