"""The task contract (fedmed.tasks.Task, a typing.Protocol) and its optional capabilities."""

import pytest

from fedmed.tasks import TASKS, ExternalEvaluation, Task, WindowedInference, build_task

pytestmark = pytest.mark.unit


def test_tasks_implement_the_task_protocol_and_declare_their_optional_capabilities():
    classification = build_task({"name": "classification", "args": {}})
    segmentation = build_task({"name": "segmentation", "args": {}})
    assert isinstance(classification, Task) and isinstance(segmentation, Task)
    assert isinstance(classification, ExternalEvaluation) and not isinstance(segmentation, ExternalEvaluation)
    assert isinstance(segmentation, WindowedInference) and not isinstance(classification, WindowedInference)


def test_a_class_that_does_not_implement_the_contract_is_refused_naming_what_it_lacks(monkeypatch):
    monkeypatch.setitem(TASKS, "not_a_task", "fedmed.rounds.PlaintextAggregation")
    with pytest.raises(TypeError, match="does not implement fedmed.tasks.Task \\(lacks key_metric, load_site_data"):
        build_task({"name": "not_a_task"})
