"""BatchProfile: what one batch measured, kept in a JSON file for the next batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from concur_langgraph import BatchProfile, ConfigError

PROFILE = BatchProfile(
    context_per_call=7800.5, prefill_rate=23101.0, kv_capacity_tokens=317904, agents=96
)


def test_save_then_load_gives_the_same_profile(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    PROFILE.save(path)
    assert BatchProfile.load(path) == PROFILE
    assert json.loads(path.read_text())["format"] == "concur-langgraph/batch-profile/1"
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temporary file left


def test_save_replaces_an_older_profile(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    BatchProfile(context_per_call=1.0, prefill_rate=1.0, kv_capacity_tokens=1, agents=1).save(path)
    PROFILE.save(path)
    assert BatchProfile.load(path) == PROFILE


def test_a_missing_file_is_a_first_batch(tmp_path: Path) -> None:
    assert BatchProfile.load(tmp_path / "none-yet.json") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"profile\.json: not JSON"),
        ("[1, 2]", r"profile\.json: expected a JSON object, got list"),
        ('{"agents": 3}', r"profile\.json: format: expected 'concur-langgraph/batch-profile/1'"),
    ],
)
def test_a_file_that_is_not_a_profile_is_refused_by_name(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "profile.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        BatchProfile.load(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"agents": None}, r"missing agents"),
        ({"extra": 1}, r"unknown key\(s\) extra"),
        ({"context_per_call": 0}, r"context_per_call: must be a number > 0, got 0"),
        ({"prefill_rate": "fast"}, r"prefill_rate: must be a number > 0, got 'fast'"),
        ({"kv_capacity_tokens": 1.5}, r"kv_capacity_tokens: must be an integer >= 1, got 1\.5"),
        ({"agents": True}, r"agents: must be an integer >= 1, got True"),
    ],
)
def test_each_bad_field_is_named(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    data = PROFILE.to_dict()
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=rf"p\.json: {message}"):
        BatchProfile.load(path)
