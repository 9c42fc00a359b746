"""Prompt files for ``unet-nas evaluate``: one caption per line, JSONL, or COCO captions.

* ``*.txt`` (or any other suffix): one caption per non-empty line;
* ``*.jsonl``: one object per line with the caption under ``text``, ``caption`` or ``prompt`` and, optionally,
  a real image under ``image`` or ``file_name`` (relative to the file) - the diffusers training-script layout;
* ``*.json``: COCO captions (``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``);
  image paths are relative to the file, or to ``image_root``.

Rows with images give the real reference set FID is measured against. Every problem is one ConfigError naming
the file and the line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from search_spaces import ConfigError

TEXT_KEYS = ("text", "caption", "prompt")
IMAGE_KEYS = ("image", "file_name")


@dataclass(frozen=True)
class Prompt:
    text: str
    image: Path | None = None


def load_prompts(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 limit: int | None = None) -> list[Prompt]:
    """The prompts of ``path`` (the first ``limit`` of them)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("prompt file not found", field="--prompts", source=str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the prompt file: {exc}", field="--prompts", source=str(p)) from None
    root = Path(image_root) if image_root is not None else p.parent
    if p.suffix == ".jsonl":
        prompts = _jsonl(text, p, root)
    elif p.suffix == ".json":
        prompts = _coco(text, p, root)
    else:
        prompts = [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("the prompt file holds no prompts", field="--prompts", source=str(p), line=1)
    with_images = sum(q.image is not None for q in prompts)
    if 0 < with_images < len(prompts):
        raise ConfigError(f"{with_images} of {len(prompts)} prompts give an image: give one for every prompt or "
                          "for none", field="--prompts", source=str(p))
    return prompts[:limit] if limit else prompts


def _jsonl(text: str, path: Path, root: Path) -> list[Prompt]:
    prompts = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {exc.msg}", source=str(path), line=i) from None
        if not isinstance(row, dict):
            raise ConfigError("expected a JSON object per line", source=str(path), line=i)
        caption = next((row[k] for k in TEXT_KEYS if k in row), None)
        if not isinstance(caption, str) or not caption.strip():
            raise ConfigError(f"no caption: expected a non-empty string under one of {', '.join(TEXT_KEYS)}",
                              source=str(path), line=i)
        image = next((row[k] for k in IMAGE_KEYS if k in row), None)
        prompts.append(Prompt(caption.strip(), _image(image, root, path, i)))
    return prompts


def _coco(text: str, path: Path, root: Path) -> list[Prompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc.msg}", source=str(path), line=exc.lineno) from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ConfigError('expected COCO captions: {"images": [...], "annotations": [...]}', source=str(path), line=1)
    files = {}
    for j, img in enumerate(data.get("images") or []):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise ConfigError("an image entry needs an id and a file_name", field=f"images[{j}]", source=str(path))
        files[img["id"]] = img["file_name"]
    prompts = []
    for j, ann in enumerate(data["annotations"]):
        caption = ann.get("caption") if isinstance(ann, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            raise ConfigError("an annotation needs a non-empty caption", field=f"annotations[{j}]", source=str(path))
        image = None
        if files:
            if ann.get("image_id") not in files:
                raise ConfigError(f"image_id {ann.get('image_id')!r} is not in images", field=f"annotations[{j}]",
                                  source=str(path))
            image = _image(files[ann["image_id"]], root, path, None, field=f"annotations[{j}]")
        prompts.append(Prompt(caption.strip(), image))
    return prompts


def _image(value: object, root: Path, path: Path, line: int | None, field: str | None = None) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError("an image must be a path string", field=field, source=str(path), line=line)
    image = Path(value) if Path(value).is_absolute() else root / value
    if not image.is_file():
        raise ConfigError(f"image {value} not found", field=field, source=str(path), line=line)
    return image
