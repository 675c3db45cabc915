"""Table 12's protocol: how many supervised updates each row's runs get."""

from __future__ import annotations

import pytest

from workbench.ablation import ROWS, stage3_steps
from workbench.errors import ConfigError
from workbench.modalities import MODALITIES
from workbench.notebook import setup

ALL = list(MODALITIES)


def test_equal_updates_per_task_scale_the_multiple_rows_by_their_task_count():
    # single rows: one run per column, each on its modality's 2 tasks
    assert stage3_steps(ROWS["r1"], 600, ALL) == {"image": 600, "video": 600, "audio": 600}
    # multiple rows: 8 tasks share each update's 2 streams -> 4x the updates for as many per task
    assert stage3_steps(ROWS["r6"], 600, ALL) == {"all": 2400}
    assert stage3_steps(ROWS["r3"], 7, ALL) == {"all": 28}
    # fewer modalities in the benchmark: image + audio -> 4 tasks, 2 per column
    assert stage3_steps(ROWS["r6"], 600, ["image", "audio"]) == {"all": 1200}
    assert stage3_steps(ROWS["r2"], 600, ["image", "audio"]) == {"image": 600, "audio": 600}


def test_equal_updates_per_run_is_the_old_protocol():
    assert stage3_steps(ROWS["r6"], 600, ALL, "run") == {"all": 600}
    assert stage3_steps(ROWS["r1"], 600, ALL, "run") == {"image": 600, "video": 600, "audio": 600}


def test_an_unknown_budget_is_one_clear_error():
    with pytest.raises(ConfigError, match="budget='tasks' is not one of"):
        stage3_steps(ROWS["r6"], 600, ALL, "tasks")
    with pytest.raises(ConfigError, match="notebook parameter budget='per task'"):
        setup({"profile": "tiny", "budget": "per task"})
