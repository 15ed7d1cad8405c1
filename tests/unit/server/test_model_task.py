"""The task and pooling a checkpoint declares (``--task auto``, ``--pooling auto``)."""

from __future__ import annotations

import json

import gguf
import pytest

from server.model_task import checkpoint_task, served_task


def sentence_transformers_folder(tmp_path, **flags):
    (tmp_path / "modules.json").write_text(json.dumps([{"idx": 0, "type": "sentence_transformers.models.Transformer"},
                                                       {"idx": 1, "type": "sentence_transformers.models.Pooling"}]))
    if flags:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(flags))
    return tmp_path


def gguf_file(tmp_path, pooling_type: int | None):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen3")
    if pooling_type is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("flags", "pooling"), [({"pooling_mode_lasttoken": True}, "last"),
                                                ({"pooling_mode_mean_tokens": True}, "mean"),
                                                ({"pooling_mode_cls_token": True}, "cls"), ({}, "last")])
def test_a_sentence_transformers_folder_embeds_with_its_pooling(tmp_path, flags, pooling):
    assert checkpoint_task(str(sentence_transformers_folder(tmp_path, **flags))) == ("embed", pooling)


@pytest.mark.parametrize(("pooling_type", "declared"), [(1, ("embed", "mean")), (2, ("embed", "cls")),
                                                        (3, ("embed", "last")), (4, ("rerank", "last")),
                                                        (0, ("generate", "last")), (None, ("generate", "last"))])
def test_a_gguf_files_pooling_type_says_what_it_serves(tmp_path, pooling_type, declared):
    assert checkpoint_task(str(gguf_file(tmp_path, pooling_type))) == declared


def test_anything_else_generates_and_set_values_win(tmp_path):
    assert checkpoint_task(str(tmp_path)) == checkpoint_task(None) == checkpoint_task("Qwen/Qwen3-8B") == \
        ("generate", "last")
    folder = str(sentence_transformers_folder(tmp_path, pooling_mode_mean_tokens=True))
    assert served_task("auto", "auto", folder) == ("embed", "mean")
    assert served_task("generate", "auto", folder) == ("generate", "mean")
    assert served_task("auto", "cls", folder) == ("embed", "cls")
    assert served_task("rerank", "last", folder) == ("rerank", "last")
