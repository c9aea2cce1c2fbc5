"""The base-model pull: idempotent, and clear errors for a corrupt or missing model file."""

import json
from pathlib import Path

import pytest

from components.errors import ConfigError
from components.models import MARKER, base_model_path, check_converted, embedding_model_path, pull_base_model
from components.settings import Settings


def test_pull_is_idempotent(base_model_dir: str) -> None:
    folder = Path(base_model_dir)
    info = check_converted(folder)
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    settings = Settings(state_dir=folder.parents[1], base_model="")
    again = pull_base_model(settings)
    assert again.converted is False
    assert check_converted(folder) == info


def test_missing_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        pull_base_model(Settings(state_dir=tmp_path), gguf=tmp_path / "absent.gguf")


def test_corrupt_gguf_file_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 100)
    settings = Settings(state_dir=tmp_path / "state")
    with pytest.raises(ConfigError, match="could not be read"):
        pull_base_model(settings, gguf=bad)
    models = settings.models_dir
    assert not models.exists() or not any(models.iterdir())


def test_damaged_converted_folder_names_the_fix(tmp_path: Path) -> None:
    folder = tmp_path / "state" / "models" / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"weights_bytes": 123}))
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="pull --force"):
        base_model_path(Settings(state_dir=tmp_path / "state", base_model=""))


def test_not_pulled_yet_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tandem models pull"):
        base_model_path(Settings(state_dir=tmp_path, base_model=""))


def test_embedding_model_folder_ships_with_the_package() -> None:
    path = Path(embedding_model_path(Settings(embedding_model="")))
    assert (path / "config.json").exists() or (path / "modules.json").exists()
