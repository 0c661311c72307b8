"""Presets, `base:` inheritance, dotted overrides and schema validation.

A preset is a YAML file shipped in `presets/` (addressed by its file name without `.yaml`) or any YAML
path. `base: other-preset` merges the preset over another one (chains allowed). Overrides are OmegaConf
dotlists (`model.depth=4 optim.lr=2e-4`). The result is validated against typed schemas: an unknown key,
a wrong type or a missing value is a one-line ConfigError that suggests the closest valid key.
This module must stay torch-free until validation touches a registry (help and completion use it).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .schema import COMMON_KEYS, DEFAULT_NAMES, FIXED_SECTIONS, OPTIONAL_FIXED_SECTIONS, OPTIONAL_SECTIONS, REGISTRY_SECTIONS


def presets_root() -> Path:
    return Path(str(importlib.resources.files("ditk.presets")))


def _preset_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(presets_root().rglob("*.yaml"))}


def preset_names(include_hidden: bool = False) -> list[str]:
    """Shipped presets; names starting with `_` are bases meant to be extended, hidden by default."""
    return sorted(n for n in _preset_files() if include_hidden or not n.startswith("_"))


def preset_description(name: str, width: int = 100) -> str:
    """The first sentence of a shipped preset's leading comment, cut at `width` characters ('' if none)."""
    path = _preset_files().get(name)
    if path is None:
        return ""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    sentence = text.split(". ")[0].rstrip(".")
    if len(sentence) > width:
        sentence = sentence[: width - 1].rsplit(" ", 1)[0].rstrip(",;:(") + "…"
    return sentence


def merge(base: DictConfig, child: DictConfig) -> DictConfig:
    """Merge `child` over `base`. A child that switches a registry section to another entry (say
    `objective.name=rectified-flow` over a DDPM preset) starts that section afresh, since the old
    entry's keys mean nothing to the new one."""
    base = base.copy()
    selectors = {**{s: "name" for s in REGISTRY_SECTIONS}, **{s: key for s, (_, key) in OPTIONAL_SECTIONS.items()}}
    for section, key in selectors.items():
        new_name = OmegaConf.select(child, f"{section}.{key}", default=None)
        if new_name is not None and new_name != OmegaConf.select(base, f"{section}.{key}", default=None):
            if section in base:
                del base[section]
    return OmegaConf.merge(base, child)


def find_preset(name_or_path: str, relative_to: Optional[Path] = None) -> Path:
    """A preset name or a YAML path -> the file. Paths are tried first (relative to the including file)."""
    for candidate in ([relative_to / name_or_path] if relative_to else []) + [Path(name_or_path)]:
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            return candidate
    files = _preset_files()
    if name_or_path in files:
        return files[name_or_path]
    if name_or_path.endswith((".yaml", ".yml")):
        raise ConfigError(f"preset file '{name_or_path}' does not exist: check the path")
    close = difflib.get_close_matches(name_or_path, list(files), n=1)
    hint = f"did you mean '{close[0]}'?" if close else "run `ditk presets list` to see the shipped presets"
    raise ConfigError(f"unknown preset '{name_or_path}': {hint}")


def load_preset(name_or_path: str, _seen: tuple = (), _relative_to: Optional[Path] = None) -> DictConfig:
    """Load a preset and merge its `base:` chain (base first, then the preset over it). Unvalidated."""
    path = find_preset(name_or_path, _relative_to).resolve()
    if path in _seen:
        raise ConfigError(f"preset '{name_or_path}' extends itself through its base chain: remove the cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"preset file {path} must hold a mapping of sections (model:, train:, ...)")
    base = raw.pop("base", None)
    cfg = OmegaConf.create(raw)
    if base is not None:
        cfg = merge(load_preset(str(base), _seen + (path,), path.parent), cfg)
    return cfg


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. model.depth=4)")
    try:
        return OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None


def _check_keys(section: str, given: dict, schema: type) -> None:
    fields = [f.name for f in dataclasses.fields(schema)]
    for key in given:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{section}.{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{section}.{key}': {hint}")


def _typed_section(section: str, given: Any, schema: type, allow_missing: bool = False) -> DictConfig:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"config section '{section}' must be a mapping, got {given!r}")
    _check_keys(section, given, schema)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), given)
    except OmegaConfBaseException as e:
        key = f"{section}.{e.full_key}" if getattr(e, "full_key", None) else section
        raise ConfigError(f"bad value for '{key}': {str(e).splitlines()[0]}") from None
    # A preset's `???` marks a value the user must give. (Merging `???` over a schema default keeps the
    # default, so look for it in what was given as well as in the schema.)
    missing = sorted(set(OmegaConf.missing_keys(typed)) | {k for k, v in given.items() if v == "???"})
    for key in missing:  # keep the marker visible (`presets show`), whether or not it is allowed here
        typed[key] = "???"
    if missing and not allow_missing:
        raise ConfigError(f"missing required key '{section}.{missing[0]}': set it in the preset or as {section}.{missing[0]}=...")
    return typed


def _common_keys(section: str, given: dict) -> dict:
    """Keys every entry of a registry section accepts besides its own dataclass's (schema.COMMON_KEYS), popped from
    `given`; only values other than the default are kept, so configs that do not use them are unchanged."""
    out = {}
    for key, (kind, default) in COMMON_KEYS.get(section, {}).items():
        if key in given:
            value = given.pop(key)
            if not isinstance(value, kind):
                raise ConfigError(f"bad value for '{section}.{key}': {value!r} is not a {kind.__name__}")
            if value != default:
                out[key] = value
    return out


def validate(cfg: DictConfig, allow_missing: Iterable[str] = ()) -> DictConfig:
    """Check every section against its schema; fill defaults; return a typed, struct-locked config.

    Required values (`???`) may stay unset only in the sections named in `allow_missing` (sampling needs
    no dataset path, `presets show` needs nothing).
    """
    allow_missing = set(allow_missing)
    from . import registry

    raw = OmegaConf.to_container(cfg, resolve=True)
    known = list(FIXED_SECTIONS) + list(REGISTRY_SECTIONS) + list(OPTIONAL_SECTIONS) + list(OPTIONAL_FIXED_SECTIONS)
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid sections: {', '.join(known)}"
            raise ConfigError(f"unknown config section '{key}': {hint}")
    out = {}
    for section, schema in FIXED_SECTIONS.items():
        out[section] = _typed_section(section, raw.get(section), schema, section in allow_missing)
    # YAML, and so a key=value override, reads a bare `no` as false: train.mixed_precision=no means "no".
    if str(out["train"].mixed_precision).lower() == "false":
        out["train"].mixed_precision = "no"
    if out["train"].mixed_precision not in ("no", "bf16", "fp16"):
        value = out["train"].mixed_precision
        raise ConfigError(f"train.mixed_precision={value!r} is not one of no, bf16, fp16: pick one")
    for section, schema in OPTIONAL_FIXED_SECTIONS.items():  # present only when given (e.g. `prune`)
        if section in raw:
            out[section] = _typed_section(section, raw.get(section), schema, section in allow_missing)
    for section, reg_name in REGISTRY_SECTIONS.items():
        given = dict(raw.get(section) or {})
        name = given.pop("name", DEFAULT_NAMES.get(section))
        common = _common_keys(section, given)
        if name is None:
            raise ConfigError(f"missing '{section}.name': set it in the preset or as {section}.name=...")
        entry = getattr(registry, reg_name).get(str(name))
        if entry.config:
            typed = _typed_section(section, given, entry.config, section in allow_missing)
        else:
            typed = OmegaConf.create(given)
        section_cfg = OmegaConf.merge(OmegaConf.create({"name": entry.name}), OmegaConf.to_container(typed), common)
        out[section] = section_cfg
    for section, (reg_name, key) in OPTIONAL_SECTIONS.items():  # present only when given (e.g. `distill`)
        if section not in raw:
            continue
        given = dict(raw.get(section) or {})
        if key not in given:
            raise ConfigError(f"missing '{section}.{key}': set it in the preset or as {section}.{key}=...")
        entry = getattr(registry, reg_name).get(str(given.pop(key)))
        typed = _typed_section(section, given, entry.config, section in allow_missing)
        out[section] = OmegaConf.merge(OmegaConf.create({key: entry.name}), OmegaConf.to_container(typed))
    result = OmegaConf.create(out)
    OmegaConf.set_struct(result, True)
    return result


def resolve(preset: str, overrides: Iterable[str] = (), allow_missing: Iterable[str] = ()) -> DictConfig:
    """preset (+ base chain) + overrides -> validated config. `run.name` defaults to the preset's name."""
    cfg = merge(load_preset(preset), parse_overrides(overrides))
    if not OmegaConf.select(cfg, "run.name", default=""):
        OmegaConf.update(cfg, "run.name", Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset, force_add=True)
    return validate(cfg, allow_missing)


def section_obj(section: DictConfig):
    """A registry-selected section without its `name` and the keys every entry accepts (schema.COMMON_KEYS, which
    `build` applies itself), for the entry's builder."""
    drop = {"name"}.union(*(keys for keys in COMMON_KEYS.values()))
    return OmegaConf.masked_copy(section, [k for k in section.keys() if k not in drop])


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def read_config_file(path: str | Path) -> DictConfig:
    """A run's config.yaml, unvalidated. A file that is not YAML, is empty or is not a mapping of sections
    (damaged, truncated, edited by hand) is one ConfigError line naming the file and where a copy lives."""
    path = Path(path)
    copies = sorted(path.parent.glob("checkpoints/step-*/run-config.yaml"))
    fix = (f"restore it from the copy {copies[-1]}" if copies else
           "restore it (or re-create it with `ditk presets show PRESET KEY=VALUE...`)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is damaged (not valid YAML: {str(e).splitlines()[0]}): {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}): {fix}") from None
    if not isinstance(raw, dict) or not raw:
        what = "empty" if not raw else f"a {type(raw).__name__}, not a mapping of sections"
        raise ConfigError(f"{path} is damaged ({what}): {fix}")
    # ditk writes every section; a file cut short loses the last ones (a default would silently stand in)
    # (conditioner and runtime, the newest sections, may be absent from runs made before they existed)
    missing = [s for s in (*FIXED_SECTIONS, *REGISTRY_SECTIONS)
               if s not in ("conditioner", "runtime") and not isinstance(raw.get(s), dict)]
    if missing:
        raise ConfigError(f"{path} is damaged or truncated (no '{missing[0]}' section): {fix}")
    try:
        return OmegaConf.create(raw)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path} is damaged ({str(e).splitlines()[0]}): {fix}") from None


def load_run_config(run_dir: str | Path, overrides: Iterable[str] = ()) -> DictConfig:
    """The resolved config a run was created with (runs/<name>/config.yaml), validated again."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a ditk run directory (no config.yaml): pass runs/<name> as written by `ditk train`")
    return validate(merge(read_config_file(path), parse_overrides(overrides)), allow_missing=("data",))


_CASTS = {"int": int, "float": float, "bool": bool, "str": str}


def section_kwargs(section, config_cls) -> dict:
    """A registry section (a typed DictConfig, or an instance of its config dataclass) -> one plain-Python keyword
    argument per field of `config_cls`: what a builder passes to a constructor whose parameters mirror its config."""
    kwargs = {}
    for f in dataclasses.fields(config_cls):
        value = getattr(section, f.name)
        cast = _CASTS.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        if cast is not None and value is not None:
            value = cast(value)
        elif isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        kwargs[f.name] = value
    return kwargs
