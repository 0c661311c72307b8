"""The config of a `ditk distill` run, checked against its teacher before anything is written.

The run's sections are the preset's (with overrides); the teacher is the run named by `distill.teacher`. The
checks (each a one-line ConfigError, exit 2, before the run directory exists):
  - the teacher is a ditk run or checkpoint whose objective is the preset's, and whose model is the preset's
    model (unless `distill.student` names another student architecture);
  - a student of another architecture keeps the teacher's input and output shapes and classes;
  - a student initialised from a run (the teacher, or a pruned run) has exactly that run's tensor shapes
    (a student wider than its init is refused);
  - the method supports the teacher's objective and settings (its `check`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import load_run_config, resolve, validate
from ..errors import ConfigError

# Model keys a student of another size must share with its teacher: same inputs, outputs and classes.
INTERFACE_KEYS = ("in_channels", "input_size", "num_classes", "learn_sigma")


def _differing_key(a: DictConfig, b: DictConfig):
    a, b = OmegaConf.to_container(a), OmegaConf.to_container(b)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


def _run_dir(source: str) -> Path:
    from ..runs import resolve_checkpoint

    return resolve_checkpoint(Path(source))[0]


def _is_run(source: str) -> bool:
    path = Path(source)
    return (path / "config.yaml").is_file() or (path / "state.pt").is_file()


def check_init_shapes(student_cfg: DictConfig, init: str) -> None:
    """The student's tensors must have the shapes of the run it starts from (compared on the meta device)."""
    import torch

    from ..build import build_model

    init_cfg = load_run_config(_run_dir(init))
    with torch.device("meta"):
        student = build_model(student_cfg).state_dict()
        source = build_model(init_cfg).state_dict()
    from ..models.guidance import PREFIX

    for key, value in student.items():
        if key.startswith(PREFIX) and not any(k.startswith(PREFIX) for k in source):
            continue  # a guidance embedding the student adds to its init (zero-output at init: ditk.models.guidance)
        if key not in source:
            raise ConfigError(f"the student has '{key}' which its init {init} lacks: the student's model.* must be "
                              f"the init's architecture (or drop train.init_from / distill.student)")
        if tuple(value.shape) != tuple(source[key].shape):
            wider = value.numel() > source[key].numel()
            raise ConfigError(f"the student is {'wider than' if wider else 'a different shape from'} its init {init}: "
                              f"'{key}' is {tuple(value.shape)} in the student but {tuple(source[key].shape)} there; "
                              f"set the student's model.* to the init's")
    extra = [k for k in source if k not in student]
    if extra:
        raise ConfigError(f"the student lacks '{extra[0]}' of its init {init}: the student's model.* must be the init's "
                          f"architecture (e.g. model.depth)")


def _data_section(raw: dict, teacher_cfg: DictConfig, teacher: str) -> dict:
    """The student's data section: the preset's, with the values it leaves unset (`???`, e.g. data.path) taken from
    the teacher's run when that is the same dataset; else a one-line error naming what the method reads there."""
    from ..registry import DISTILL_METHODS

    data = dict(raw["data"])
    missing = [k for k, v in data.items() if v == "???"]
    if not missing:
        return data
    theirs = OmegaConf.to_container(teacher_cfg.data)
    if theirs.get("name") == data.get("name") and all(theirs.get(k) not in (None, "???") for k in missing):
        return {**data, **{k: theirs[k] for k in missing}}
    need = getattr(DISTILL_METHODS.get(raw["distill"]["method"]).builder, "data_need", "its training data")
    raise ConfigError(f"distill.method={raw['distill']['method']} reads {need} from the run's data section "
                      f"(data.name={data.get('name')}), but data.{missing[0]} is not set and the teacher {teacher} does "
                      f"not record one: pass data.{missing[0]}=...")


def prepare(preset: str, overrides) -> tuple[DictConfig, str]:
    """(the validated student run config, the teacher's absolute path). Raises ConfigError on bad input."""
    from ..registry import DISTILL_METHODS

    cfg = resolve(preset, overrides, allow_missing=("data",))  # an unset data section defaults to the teacher's
    if "distill" not in cfg:
        raise ConfigError(f"preset '{preset}' has no distill section: pass distill.method=kd|consistency|progressive|reflow|dmd2|musiccm "
                          f"distill.teacher=runs/<teacher>")
    teacher = str(cfg.distill.teacher)
    if not Path(teacher).exists():
        raise ConfigError(f"distill.teacher '{teacher}' does not exist: train the teacher first (ditk train ...) or "
                          f"pass distill.teacher=runs/<name>")
    if not _is_run(teacher):
        raise ConfigError(f"distill.teacher '{teacher}' is not a ditk run or checkpoint: pass runs/<name> as written "
                          f"by ditk train")
    teacher_dir = _run_dir(teacher)
    teacher_cfg = load_run_config(teacher_dir)
    raw = OmegaConf.to_container(cfg)
    raw["distill"]["teacher"] = str(Path(teacher).resolve())

    diff = _differing_key(cfg.objective, teacher_cfg.objective)
    if diff:
        key, mine, theirs = diff
        raise ConfigError(f"the teacher {teacher} was trained with objective.{key}={theirs!r} but the preset says "
                          f"{mine!r}: distill with the teacher's objective (objective.{key}={theirs})")
    student = str(cfg.distill.student)
    if not student:
        diff = _differing_key(cfg.model, teacher_cfg.model)
        if diff:
            key, mine, theirs = diff
            raise ConfigError(f"the teacher {teacher} is a different architecture than the preset says: model.{key} is "
                              f"{theirs!r} there, {mine!r} here; pass model.{key}={theirs} (or distill.student=... "
                              f"for a smaller student)")
        init_default = str(Path(teacher).resolve())
    else:
        if _is_run(student):
            raw["model"] = OmegaConf.to_container(load_run_config(_run_dir(student)).model)
            init_default = str(Path(student).resolve())
        else:
            raw["model"] = OmegaConf.to_container(resolve(student, allow_missing=("data",)).model)
            init_default = ""
        for key in INTERFACE_KEYS:
            if raw["model"].get(key) != teacher_cfg.model.get(key):
                raise ConfigError(f"the student {student} has model.{key}={raw['model'].get(key)!r} but the teacher "
                                  f"{teacher_cfg.model.get(key)!r}: a student must keep the teacher's inputs, outputs "
                                  f"and classes")
    raw["data"] = _data_section(raw, teacher_cfg, teacher)
    if not raw["train"]["init_from"]:
        raw["train"]["init_from"] = init_default
    builder = DISTILL_METHODS.get(raw["distill"]["method"]).builder
    if hasattr(builder, "student_model_keys"):  # e.g. consistency with a guidance range: model.guidance_embed
        raw["model"].update(builder.student_model_keys(raw["distill"]))
    cfg = validate(OmegaConf.create(raw))
    if cfg.train.init_from and _is_run(cfg.train.init_from):
        check_init_shapes(cfg, cfg.train.init_from)
    method = DISTILL_METHODS.get(cfg.distill.method)
    method.builder.check(cfg.distill, cfg, teacher_cfg)
    return cfg, str(Path(teacher).resolve())
