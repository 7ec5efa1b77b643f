"""What a file from someone else may make this project do, and what a secret may leave behind.

Trusted: the checkout (conf/, gcode_exp/) and the command line. Not trusted: a checkpoint or run folder
someone shares, whose stored config names the classes that `task=eval`, `task=predict` and
`trainer.resume=true` build. `check_stored` reads every `_target_` of such a config before anything is
imported: only classes of gcode_exp, of the modules in `trusted_modules` and those the command line names
itself pass. `redact` keeps a storage URL's password (and keys named like a password or token) out of what
the project writes or prints. docs/SECURITY.md says the same for users.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from gcode_exp import GcodeExpError
from gcode_exp.config import AUGMENT, ENCODER, MODULE_NAME, OPTIMIZER, SCHEDULER, SCHEMA, ConfigError

OWN = "gcode_exp"
# the keys whose `_target_` the project builds, the class it must subclass, and where it may come from
# besides gcode_exp and trusted_modules (the optimisers and schedules torch ships, as conf/trainer names)
BUILT_AT = {"model": ("gcode_exp.models.base:Model", ()),
            "model.encoder": (ENCODER, ()),
            "aug": (AUGMENT, ()),
            "trainer.optimizer": (OPTIMIZER, ("torch.optim",)),
            "trainer.scheduler": (SCHEDULER, ("torch.optim",))}


class UntrustedConfig(GcodeExpError):
    """A stored config that names code the user did not allow; the message names the key and the file."""


class Policy:
    """What a stored config may name: module prefixes (`trusted_modules`, gcode_exp) and the exact
    `_target_` values of the user's own config (the checkout's conf/ and the command line), by key."""

    def __init__(self, modules: tuple[str, ...] = (), named: dict[str, str] | None = None) -> None:
        self.modules, self.named = (OWN, *modules), named or {}

    @classmethod
    def of(cls, cfg: DictConfig) -> Policy:
        """The policy of a composed config; `trusted_modules` checked here (it is read before `validate`)."""
        modules = cfg.get("trusted_modules") or []
        modules = OmegaConf.to_container(modules) if isinstance(modules, ListConfig) else modules
        rule = SCHEMA["trusted_modules"]
        if not rule.ok(modules):
            raise ConfigError(f"trusted_modules={modules}: must be {rule.what}")
        plain = OmegaConf.to_container(cfg, resolve=False)
        named = {key: value for key, value in targets(plain) if isinstance(value, str) and "${" not in value}
        return cls(tuple(m.strip(".") for m in modules), named)


_policy = Policy()  # set from the command line by `use` at the start of every job


def use(cfg: DictConfig) -> None:
    """Take this job's allow-list from its config (tasks.run calls it before any checkpoint is read)."""
    global _policy
    _policy = Policy.of(cfg)


def targets(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key of the object, its `_target_`) for every `_target_` at any depth, lists included."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if key == "_target_":
                yield prefix.rstrip("."), value
            else:
                yield from targets(value, path + ".")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from targets(value, f"{prefix}{i}.")


def _under(name: str, modules: tuple[str, ...]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _locate(name: str) -> Any:
    """The object a dotted name imports to (Hydra's lookup, its ERROR log silenced: the refusal is ours)."""
    from hydra.utils import get_object

    hydra_log = logging.getLogger("hydra.utils")
    was, hydra_log.disabled = hydra_log.disabled, True
    try:
        return get_object(name)
    finally:
        hydra_log.disabled = was


def check_stored(config: dict, where: str) -> None:
    """Refuse (one line naming the key and `where`, the file) a stored config that would make the project
    import or call anything but an allowed class. Names are checked before anything is imported; then
    the object must be a class, defined under an allowed module, of the kind built at that key."""
    from gcode_exp.rules import named_class

    def refuse(key: str, value: Any, why: str) -> UntrustedConfig:
        return UntrustedConfig(f"{where}: {key}._target_={value}: {why}")

    for text_key, text in strings(config):
        if "${" in text:  # a checkpoint stores its config resolved: an interpolation reads the environment
            raise UntrustedConfig(f"{where}: {text_key}={text}: an interpolation in a stored config (refused: "
                                  "it could read the environment)")
    allowed = f"gcode_exp and trusted_modules={list(_policy.modules[1:])}"
    for key, name in targets(config):
        if _policy.named.get(key) == name and isinstance(name, str):
            continue  # the user's own config names this very class here
        if key not in BUILT_AT:
            raise refuse(key, name, "the project builds no object from this key (refused, not imported)")
        base, extra = BUILT_AT[key]
        modules = (*_policy.modules, *extra)
        if not isinstance(name, str) or "." not in name or not MODULE_NAME.fullmatch(name):
            raise refuse(key, name, "not a dotted class name (refused, not imported)")
        if not _under(name, modules):
            raise refuse(key, name, f"outside {allowed}, so not imported; a shared checkpoint or run folder "
                         "may build only their classes (add the module to trusted_modules if you trust it)")
        try:
            obj = _locate(name)
        except Exception:
            raise refuse(key, name, "does not import") from None
        if not isinstance(obj, type):
            raise refuse(key, name, f"a {type(obj).__name__}, not a class: refused (only classes are built)")
        if not _under(obj.__module__, modules):
            raise refuse(key, name, f"a class of {obj.__module__}, outside {allowed}: refused")
        if named_class(name, base) is None:
            raise refuse(key, name, f"not a subclass of {base.replace(':', '.')}: refused")


def strings(node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every text value of a nested dict/list."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from strings(value, f"{prefix}{i}.")
    elif isinstance(node, str):
        yield prefix.rstrip("."), node


# --- secrets ----------------------------------------------------------------------------------------------
HIDDEN = "***"
# scheme://user:PASSWORD@host: the password, whatever the scheme (postgresql+psycopg://, mysql://, redis://),
# also as a sweep's job overrides write it (`postgresql\://user\:PASSWORD@host`)
URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*\\?://[^\s:/@'\"\\]*\\?:)([^\s@/'\"]+)(@)")
# keys whose value is a secret itself: password, db_password, api_key, auth_token, client_secret, ...
SECRETS = r"(?:password|passwd|secret|token|api_key|apikey|access_key|private_key)"
SECRET_KEY = re.compile(rf"(?:.*_)?{SECRETS}", re.IGNORECASE)
# ... and such a key's value in a text: `+x.api_key=VALUE` in an error line, `password: VALUE` in YAML
SECRET_SETTING = re.compile(rf"((?<![\w/-])(?:[\w.]*[._])?{SECRETS}(?:=|: ))"  # the key
                            rf"([^\s,'\"\]}})]+?)(?=:?(?:[\s,'\"\]}})]|$))", re.IGNORECASE)  # its value


def redact_text(text: str) -> str:
    """`text` with every URL password replaced by ***, e.g. postgresql://user:***@host/db, and the value of
    every secret-named key set in it (`api_key=***`)."""
    return SECRET_SETTING.sub(rf"\1{HIDDEN}", URL_PASSWORD.sub(rf"\1{HIDDEN}\3", text))


def redact(node: Any) -> Any:
    """A copy of a config (a DictConfig is read unresolved, so `${oc.env:...}` stays as written) with URL
    passwords and the values of secret-named keys replaced by ***: what every written config passes."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        return {k: HIDDEN if isinstance(k, str) and SECRET_KEY.fullmatch(k) and v not in (None, "") else redact(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    if isinstance(node, str):
        return redact_text(node)
    return node


def to_yaml(node: Any) -> str:
    """The YAML of a config, redacted (what .hydra/*.yaml and resolved_config.yaml hold)."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(node)))


def redact_file(path) -> None:
    """Rewrite a text file another program wrote (Hydra's multirun.yaml) if it holds a URL password."""
    from pathlib import Path

    from gcode_exp.atomic import write_text

    path = Path(path)
    if path.is_file():
        text = path.read_text()
        if redact_text(text) != text:
            write_text(path, redact_text(text))


def redact_logs() -> None:
    """Every log record, of any logger and to any handler (console, run.log, Hydra's own), redacted once
    when it is made: a message that holds a URL password never reaches a file or the console."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def redacting(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        message = record.getMessage()
        if redact_text(message) != message:
            record.msg, record.args = redact_text(message), None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        return record

    redacting.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting)
