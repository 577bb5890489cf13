"""ModelSpec survives the manifest: to_dict is JSON as stored, from_dict gives the same spec,
for every preset (sliding windows and family options included)."""
import json

import pytest

from kvc.models import PRESETS
from kvc.models.spec import ModelSpec


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_spec_round_trips_through_json(name):
    spec = PRESETS[name]
    stored = json.loads(json.dumps(spec.to_dict()))
    assert stored == spec.to_dict()
    assert ModelSpec.from_dict(stored) == spec


def test_windowed_spec_round_trips():
    import dataclasses

    spec = dataclasses.replace(PRESETS["tiny-llama"], sliding_window=8, window_layers=(0,))
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.cached_tokens(0, 100) == 7 and spec.cached_tokens(1, 100) == 100
