"""What a remote client may name on the server: one policy for every path-like parameter.

The parameter tables mark each path-like parameter (protocol.Param.path), so a parameter added later is
policed without code here. For a remote client:
- READS / READS_OR_HUB: a relative name resolves inside --models-dir (an absolute path inside it is kept, as
  list_models shows them); READS_OR_HUB also takes a hub id `owner/name` that is no name in --models-dir.
  Everything else (outside, `..`, `~`, a link leading out) gets one refusal naming the parameter, the same
  whether the path exists or not.
- WRITES: refused; the server writes to its own output folder and the client fetches the files.
- Image and array inputs are uploads, never paths; pickle checkpoints are never loaded.
Hub ids are resolved by the backend relative to its working folder first: the server runs in an empty one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtex_contract import protocol
from sdtex_contract.protocol import INVALID_PARAMS, READS_OR_HUB, WRITES, Param, ProtocolError, is_hub_id

_NOT_PLAIN = re.compile(r"^~|\\|^[A-Za-z]:|(^|/)\.\.(/|$)")  # home, Windows separators and drives, '..' parts


@dataclass(frozen=True)
class Policy:
    """Rewrites a remote client's job parameters so it never names a path on this machine."""

    output_dir: Path  # every file is written here and fetched by the client
    models_dirs: tuple[Path, ...] = ()  # local files a client names must lie inside one of these

    def check(self, method: str, params: dict) -> dict:
        """The parameters to run, or ProtocolError(INVALID_PARAMS) naming the parameter that is refused."""
        params = dict(params)
        if method == protocol.RUN:
            table = protocol.TASK_PARAMS.get(params.get("task"), ())
            if params.get("task") == "list_models" and not params.get("models_dir") and self.models_dirs:
                params["models_dir"] = str(self.models_dirs[0])  # "my models" means the server's
        else:
            table = protocol.MODEL_PARAMS if method == protocol.LOAD_MODEL else ()
        for param in table:
            if param.name in params:
                params[param.name] = self._value(param, param.name, params[param.name])
        if method == protocol.RUN:
            params["output_dir"] = str(self.output_dir)
        return params

    def _value(self, param: Param, shown: str, value: Any) -> Any:
        if param.name == "allow_pickle" and value is not False:
            raise _refused(shown, "false: a remote backend never loads pickle checkpoints", value)
        if param.kind in (protocol.ImageInput, protocol.ArrayInput) and isinstance(value, dict) and "path" in value:
            raise _refused(f"{shown}.path", "an upload: send the bytes with `upload`, then use their sha256", "a path")
        if param.kind is list and isinstance(value, list):
            return [self._item(param, f"{shown}[{i}]", item) for i, item in enumerate(value)]
        if param.path and isinstance(value, str) and value:
            return self.path(param.path, shown, value)
        return value

    def _item(self, param: Param, shown: str, item: Any) -> Any:
        if not isinstance(item, dict):
            return item  # the worker's check refuses it
        fields = {p.name: p for p in param.items}
        return {k: self._value(fields[k], f"{shown}.{k}", v) if k in fields else v for k, v in item.items()}

    def path(self, kind: str, name: str, value: str) -> str:
        """Where a path-like value of this kind points on this machine, or the one refusal (see the module)."""
        if kind == WRITES:
            raise _refused(name, "nothing: a remote backend writes to its own folder; fetch the files", value)
        if not _NOT_PLAIN.search(value):
            if os.path.isabs(value):
                if self._inside(real := os.path.realpath(value)):
                    return real
            elif kind == READS_OR_HUB and is_hub_id(value) and not self._names(value):
                return value
            elif inside := [c for c in (os.path.realpath(d / value) for d in self.models_dirs) if self._inside(c)]:
                return next((c for c in inside if os.path.exists(c)), inside[0])  # missing: the task says so
        hub = "a hub id like owner/name, or " if kind == READS_OR_HUB else ""
        raise _refused(name, f"{hub}a name inside the server's models folder ({self._folders()})", value)

    def _names(self, value: str) -> bool:
        """`value` starts with a name in a models folder (then it is no hub id, even where a link leads out)."""
        first = value.split("/", 1)[0]
        return any(os.path.lexists(folder / first) for folder in self.models_dirs)

    def _inside(self, real: str) -> bool:
        return any(_within(real, folder) for folder in self.models_dirs)

    def _folders(self) -> str:
        return ", ".join(str(folder) for folder in self.models_dirs) or "none: the server has no --models-dir"



def _within(path: str, folder: Path) -> bool:
    root = os.path.realpath(folder)
    return os.path.commonpath([path, root]) == root


def _refused(name: str, accepted: str, value: Any) -> ProtocolError:
    return ProtocolError(
        INVALID_PARAMS,
        f"{name} is refused by the remote backend: it accepts {accepted}; got {protocol.shown(value)}",
        {"param": name, "accepted": accepted, "value": protocol.shown(value)},
    )
