"""The tag set: ids in a fixed order (the classifier's label order), names, descriptions and the
per-tag evidence the labelling functions use."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Tag:
    id: str
    name: str
    description: str
    keywords: Mapping[str, Any] = field(default_factory=dict)
    prototypes: tuple[str, ...] = ()
    arxiv: tuple[str, ...] = ()


@dataclass(frozen=True)
class Taxonomy:
    tags: tuple[Tag, ...]

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any]) -> Taxonomy:
        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        tags = []
        for tag_id, spec in data["tags"].items():
            missing = [k for k in ("name", "description") if not spec.get(k)]
            if missing:
                raise ValueError(f"taxonomy.tags.{tag_id}: missing {missing}")
            tags.append(Tag(
                id=tag_id,
                name=spec["name"],
                description=" ".join(spec["description"].split()),
                keywords=spec.get("keywords") or {},
                prototypes=tuple(spec.get("prototypes") or ()),
                arxiv=tuple(spec.get("arxiv") or ()),
            ))
        return cls(tuple(tags))

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.tags]

    def __len__(self) -> int:
        return len(self.tags)

    def index(self, tag_id: str) -> int:
        try:
            return self.ids.index(tag_id)
        except ValueError:
            raise KeyError(f"unknown tag {tag_id!r}; known tags: {', '.join(self.ids)}") from None

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.ids))

    def to_dict(self) -> dict[str, Any]:
        return {"tags": {t.id: {"name": t.name, "description": t.description} for t in self.tags}}
