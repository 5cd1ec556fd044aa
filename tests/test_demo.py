"""The demo's stage bookkeeping (the full demo runs with MiniLM in test_integration_minilm.py)."""

import json

from npm_hf.demo import DemoArguments, _DemoState


def test_a_changed_recipe_restarts_and_drops_old_checkpoints(tmp_path):
    old = DemoArguments(output=str(tmp_path), train_minutes=5).recipe()
    (tmp_path / "demo_state.json").write_text(json.dumps({"recipe": old, "done": {"cloze": [1], "model": {}}}))
    (tmp_path / "checkpoints" / "checkpoint-25").mkdir(parents=True)
    same = _DemoState(tmp_path, old)
    assert same.stage("cloze", lambda: [2]) == [1]  # done stages are reused
    assert (tmp_path / "checkpoints").exists()
    changed = _DemoState(tmp_path, DemoArguments(output=str(tmp_path), train_minutes=6).recipe())
    assert not (tmp_path / "checkpoints").exists()  # another recipe's training is never resumed
    assert changed.stage("cloze", lambda: [3]) == [3]
    assert json.loads((tmp_path / "demo_state.json").read_text())["done"] == {"cloze": [3]}


def test_the_default_budget_is_shorter_where_bf16_autocast_doubles_the_steps(tmp_path, monkeypatch):
    import npm_hf.demo

    for native, minutes in ((True, 30.0), (False, 40.0)):
        monkeypatch.setattr(npm_hf.demo, "bf16_training", lambda native=native: native)
        assert DemoArguments(output=str(tmp_path)).train_minutes == minutes
        assert DemoArguments(output=str(tmp_path), train_minutes=7).train_minutes == 7  # a user's budget stands
        assert DemoArguments(output=str(tmp_path)).recipe()["train_minutes"] == minutes  # saved demos see it
