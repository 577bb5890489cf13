"""The checkpoint's EOS and pad ids in ModelSpec: from config.json, generation_config.json
winning where it sets them (transformers' generate reads the generation config), validated,
and kept through an artifact's manifest (old manifests without the fields still read)."""
import json

import pytest

from kvc.errors import KvcError
from kvc.models import PRESETS, spec_from_hf_config
from kvc.models.spec import ModelSpec

OPT = {"model_type": "opt", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 4, "max_position_embeddings": 128, "ffn_dim": 128}
LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "intermediate_size": 160}


def folder_with(tmp_path, config: dict, generation: dict | None = None):
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def spec_of(tmp_path, config, generation=None):
    from kvc.models import spec_from_checkpoint

    return spec_from_checkpoint(folder_with(tmp_path, config, generation))


def test_presets_have_no_eos():
    for spec in PRESETS.values():
        assert spec.eos_token_id == () and spec.pad_token_id is None
        assert "eos_token_id" not in spec.to_dict() and "pad_token_id" not in spec.to_dict()


@pytest.mark.parametrize("base", [OPT, LLAMA], ids=["opt", "llama"])
def test_eos_from_config_json(tmp_path, base):
    spec = spec_of(tmp_path, {**base, "eos_token_id": 2, "pad_token_id": 1})
    assert spec.eos_token_id == (2,) and spec.pad_token_id == 1


def test_eos_list_kept_in_order_without_repeats(tmp_path):
    spec = spec_of(tmp_path, {**LLAMA, "eos_token_id": [501, 7, 501, 9]})
    assert spec.eos_token_id == (501, 7, 9) and spec.pad_token_id is None


def test_generation_config_wins(tmp_path):
    spec = spec_of(tmp_path, {**LLAMA, "eos_token_id": 2, "pad_token_id": 0},
                   {"eos_token_id": [2, 107], "pad_token_id": 3, "do_sample": True})
    assert spec.eos_token_id == (2, 107) and spec.pad_token_id == 3


def test_generation_config_without_the_keys_keeps_config_json(tmp_path):
    spec = spec_of(tmp_path, {**LLAMA, "eos_token_id": 2}, {"eos_token_id": None, "temperature": 0.6})
    assert spec.eos_token_id == (2,)


def test_no_eos_anywhere(tmp_path):
    spec = spec_of(tmp_path, {**LLAMA, "eos_token_id": None})
    assert spec.eos_token_id == () and spec.pad_token_id is None


def test_pad_outside_the_vocabulary_means_none(tmp_path):
    # old Llama configs say pad_token_id: -1; a pad id must never reach the embedding
    assert spec_of(tmp_path, {**LLAMA, "pad_token_id": -1}).pad_token_id is None


@pytest.mark.parametrize("eos", [512, -1, "2", [2, "x"], 2.5, True, {"a": 1}])
def test_bad_eos_in_config_json_is_one_line(tmp_path, eos):
    with pytest.raises(KvcError, match=r"config\.json: .*eos_token_id") as e:
        spec_of(tmp_path, {**LLAMA, "eos_token_id": eos})
    assert "\n" not in str(e.value)


def test_bad_eos_in_generation_config_names_that_file(tmp_path):
    with pytest.raises(KvcError, match=r"generation_config\.json: eos_token_id = 9999; expected a token id 0\.\.511"):
        spec_of(tmp_path, {**LLAMA, "eos_token_id": 2}, {"eos_token_id": 9999})
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(KvcError, match=r"generation_config\.json: not valid JSON"):
        spec_of(tmp_path, {**LLAMA})
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(KvcError, match=r"generation_config\.json: expected a JSON object"):
        spec_of(tmp_path, {**LLAMA})


def test_spec_refuses_ids_outside_the_vocabulary():
    base = PRESETS["tiny-llama"]
    with pytest.raises(ValueError, match="token id"):
        ModelSpec.from_dict({**base.to_dict(), "eos_token_id": [base.vocab_size]})
    with pytest.raises(ValueError, match="token id"):
        ModelSpec.from_dict({**base.to_dict(), "pad_token_id": -3})
    with pytest.raises(TypeError, match="list of token ids"):
        ModelSpec.from_dict({**base.to_dict(), "eos_token_id": 5})


def test_round_trip_and_old_manifests():
    spec = spec_from_hf_config({**LLAMA, "eos_token_id": [2, 3], "pad_token_id": 0})
    stored = json.loads(json.dumps(spec.to_dict()))
    assert stored["eos_token_id"] == [2, 3] and stored["pad_token_id"] == 0
    assert ModelSpec.from_dict(stored) == spec
    old = {k: v for k, v in stored.items() if k not in ("eos_token_id", "pad_token_id")}
    assert ModelSpec.from_dict(old).eos_token_id == () and ModelSpec.from_dict(old).pad_token_id is None


def test_manifest_validation_refuses_a_bad_eos():
    from kvc.artifact.read import _check_spec

    def need(ok, what):
        if not ok:
            raise KvcError(what)

    good = {**PRESETS["tiny-llama"].to_dict(), "eos_token_id": [2]}
    assert _check_spec(good, need).eos_token_id == (2,)
    with pytest.raises(KvcError, match="model_spec: token id"):
        _check_spec({**good, "eos_token_id": [10 ** 9]}, need)


def test_artifact_keeps_the_checkpoint_eos(tmp_path, one_thread):
    pytest.importorskip("transformers")
    from hf_fixtures import hf_model, save_checkpoint

    import kvc

    ckpt = save_checkpoint(hf_model("llama3-gqa"), tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["eos_token_id"] = 5
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    art = kvc.compile({"model": {"checkpoint": str(ckpt), "dtype": "float32"},
                       "workload": {"batch_size": 1, "prompt_len": 4, "gen_len": 4},
                       "hardware": "cpu", "schedule": {"mode": "pipelined"}},
                      output=tmp_path / "a.kvc")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model_spec"]["eos_token_id"] == [5, 6]
    model = kvc.load(art, device="cpu")
    try:
        assert model.spec.eos_token_id == (5, 6)
    finally:
        getattr(model, "close", lambda: None)()
