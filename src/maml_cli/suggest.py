"""Config errors in one paragraph, with the closest known names ("did you mean")."""
from __future__ import annotations

import dataclasses
import difflib
import re
import traceback

from hydra.errors import MissingConfigException
from omegaconf import MISSING
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

# Config groups a user chooses from at the top level (``algo=protonet``).
GROUPS = ("algo", "dataset", "model", "experiment")
# Fields of the structured configs that Hydra uses, not the user.
HIDDEN_FIELDS = {"_target_", "_partial_"}


def closest(word: str, choices: list[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """The known names nearest to ``word``, best first (none when nothing is close)."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """``" Did you mean inner_steps?"``, or an empty string when nothing is close."""
    near = closest(word, choices)
    return f" Did you mean {' or '.join(near)}?" if near else ""


def schema_fields(schema: type | None) -> list[str]:
    """The keys a structured-config dataclass declares, without Hydra's own."""
    if schema is None or not dataclasses.is_dataclass(schema):
        return []
    return [f.name for f in dataclasses.fields(schema) if f.name not in HIDDEN_FIELDS]


def unknown_key_message(key: str, known: list[str]) -> str:
    """``unknown key inner_setps. Did you mean inner_steps? ...``: for a key no schema declares."""
    leaf = key.rsplit(".", 1)[-1]
    known = list(dict.fromkeys(known))
    suggestion = did_you_mean(leaf, known)
    if suggestion:
        return f"unknown key {key}.{suggestion}"
    if "." in key and not known:
        # A node that is empty or null unless set (scheduler; on a resume, the typed config's): nothing is declared
        # under it until a key is added with a plus.
        node = key.rsplit(".", 1)[0]
        return f"unknown key {key}: {node} holds no keys here (empty, or null unless set). Add one with a plus: +{key}=<value>."
    where = f" under {key.rsplit('.', 1)[0]}" if "." in key else ""
    return f"unknown key {key}. Keys{where}: {', '.join(sorted(known))}."


def _example(key: str, schema: type | None, number: str, value: str) -> str:
    try:
        as_float = float(value)
        if number == "an integer" and as_float.is_integer():
            return f"{key}={int(as_float)}"
    except ValueError:
        pass
    field = next((f for f in dataclasses.fields(schema) if f.name == key.rsplit(".", 1)[-1]), None) if schema and dataclasses.is_dataclass(schema) else None
    if field is not None and field.default is not dataclasses.MISSING and field.default is not MISSING and field.default is not None:
        return f"{key}={field.default}"
    return f"{key}={5 if number == 'an integer' else 0.1}"


def explain_config_error(error: BaseException, groups: tuple[str, ...] = GROUPS) -> str | None:
    """A one-paragraph explanation of a config composition or merge error, or None if it is not one.

    Handles an unknown group choice (``algo=mamal``), an unknown key (``inner_setps=3``) and a
    value of the wrong type (``iterations=1e3``, ``dataset.split=alphabetical``). ``groups``: the
    config groups that are known top-level keys too (``maml-train``'s; ``maml-eval`` has none).
    """
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group, _, choice = error.missing_cfg_file.rpartition("/")
        options = [str(o) for o in error.options]
        return (f"{group}={choice}: there is no {group} called {choice!r}.{did_you_mean(choice, options)} "
                f"Choices of {group}: {', '.join(options)}.")
    cause = error.__cause__ if error.__cause__ is not None else error
    key = getattr(cause, "full_key", None)
    schema = getattr(cause, "object_type", None)
    if not key:
        return None
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        known = schema_fields(schema) + (list(groups) if "." not in key else [])
        return unknown_key_message(key, known)
    if isinstance(cause, ValidationError):
        message = str(cause).splitlines()[0]
        converted = re.match(r"Value '(.*)' of type '\w+' could not be converted to (Integer|Float)", message)
        if converted:
            value, number = converted.group(1), "an integer" if converted.group(2) == "Integer" else "a number"
            return f"{key} must be {number} (got {value!r}), e.g. {_example(key, schema, number, value)}."
        choice = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", message)
        if choice:
            value, options = choice.group(1), [o.strip() for o in choice.group(2).split(",")]
            return f"{key}={value} is not one of {', '.join(options)}.{did_you_mean(value, options)}"
        boolean = re.match(r"Value '(.*)' is not a valid bool", message)
        if boolean:
            return f"{key} must be true or false (got {boolean.group(1)!r})."
        assigned = re.match(r"Invalid type assigned: str is not a subclass of \w+\. value: (.*)", message)
        if assigned and dataclasses.is_dataclass(schema) and "." not in key:
            return (f"{key}={assigned.group(1)}: {key} is not a choice of configs but a node of settings; set its class with "
                    f"{key}._target_=<class> (e.g. {key}._target_=torch.optim.SGD) and its settings as {key}.<key>=<value>, "
                    f"those not in the config with a plus (+{key}.momentum=0.9).")
        return f"{key}: {message}."
    return None


def explain_list_item_error(error: ValueError | TypeError, overrides: list[str]) -> str | None:
    """``model.hidden.x=1`` (or ``model.hidden.x.y=1``) names an item of a list: OmegaConf raises a bare ValueError
    (TypeError) for it while Hydra applies the overrides, which carries neither the key nor the list. The override is
    the one with a part OmegaConf could not read as an index. None when the error is not that one."""
    frames = traceback.extract_tb(error.__traceback__)
    named = (re.fullmatch(r"invalid literal for int\(\) with base 10: '(.*)'", str(error))
             or re.fullmatch(r"Index '(.*)' \(str\) is not an int", str(error)))
    if not named or not frames or "omegaconf" not in frames[-1].filename:
        return None
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        parts = key.split(".")
        if named.group(1) in parts[1:]:
            parent = ".".join(parts[:parts.index(named.group(1), 1)])
            return (f"{key}: {parent} is a list, whose items are numbered, not named. Set one item by its index "
                    f"({parent}.0=<value>) or the whole list ({parent}=[<value>, ...]).")
    return None
