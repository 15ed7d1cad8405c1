"""The name a model is served under: ``--served-model-name``, else what users call the file (as llama-server does),
never a path of the host."""

from __future__ import annotations

from server.settings import Settings


def test_a_local_file_is_served_under_its_stem(tmp_path):
    gguf = tmp_path / "models" / "Qwen2.5-7B-Instruct-Q4_K_M.gguf"
    gguf.parent.mkdir()
    gguf.touch()
    assert Settings(model=str(gguf)).model_name == "Qwen2.5-7B-Instruct-Q4_K_M"
    assert Settings(model="~/absent/Qwen3-8B-Q8_0.gguf").model_name == "Qwen3-8B-Q8_0"


def test_a_local_folder_is_served_under_its_name(tmp_path):
    folder = tmp_path / "Qwen-7B-Chat-Int4"
    folder.mkdir()
    assert Settings(model=str(folder)).model_name == "Qwen-7B-Chat-Int4"
    assert Settings(model="./checkpoints/qwen3-8b").model_name == "qwen3-8b"


def test_a_hub_id_an_explicit_name_and_the_default():
    assert Settings(model="Qwen/Qwen3-8B").model_name == "Qwen/Qwen3-8B"
    assert Settings(model="/srv/models/x.gguf", served_model_name="qwen").model_name == "qwen"
    assert Settings().model_name == "SmolLM2-135M-Instruct"
