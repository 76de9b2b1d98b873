"""The files of a fastcur adapter folder, and reading them back with one-line errors.

A folder written by `fastcur.save_adapter` holds:
- `fastcur_adapter.json`: what the adapter is (method, config, layers, tensors' SHA-256...);
- `fastcur_adapter.safetensors`: its tensors;
- `adapter_config.json`: a signpost for PEFT's loader only. PEFT reads that name, and the
  folder is not a PEFT adapter, so the file's single PEFT field, `peft_type`, holds a message
  that names fastcur and says how to load the folder; PEFT's loader fails with it
  (`KeyError: 'fastcur adapter, not a PEFT adapter: ...'`) instead of a bare `KeyError:
  'peft_type'`. PEFT's file names are kept only where the content is PEFT's (`export_peft_adapter`).
Folders written by fastcur before this layout (format_version 1: `adapter_config.json` with
"format": "fastcur-adapter" beside `adapter_model.safetensors`) still load.

Everything read is checked before use: a damaged or hand-edited file gives one ValueError
line naming the file and the field; a weights file named outside the folder (`../x`, an
absolute path) or a missing/null `weights_sha256` is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import torch

CONFIG_NAME = "fastcur_adapter.json"
WEIGHTS_NAME = "fastcur_adapter.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"            # PEFT's name: here only the signpost
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"   # format_version 1 (and PEFT's name)
# every file a save replaces: a save into a folder that held an older fastcur layout or a
# PEFT adapter leaves one adapter, not two
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, PEFT_CONFIG_NAME, LEGACY_WEIGHTS_NAME, "adapter_model.bin")
FORMAT = "fastcur-adapter"
FORMAT_VERSION = 2
SIGNPOST = {
    "peft_type": (f"fastcur adapter, not a PEFT adapter: this folder holds a fastcur adapter ({CONFIG_NAME}); "
                  f"load it with fastcur.load_adapter(model, folder)"),
    "fastcur_config": CONFIG_NAME,
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fastcur_version() -> str:
    from . import __version__
    return __version__


def load_json(path: str, caller: str) -> Any:
    """The parsed JSON file at `path`; ValueError naming it when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{caller}: {path} is not valid JSON ({e}); the file is corrupt or truncated") from None


def read_document(directory: str, caller: str) -> tuple[str, dict[str, Any]]:
    """(path, document) of the adapter config in `directory`, checked (see `check_document`)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{caller}: no adapter directory at {directory!r}")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        peft_path = os.path.join(directory, PEFT_CONFIG_NAME)
        if not os.path.isfile(peft_path):
            raise FileNotFoundError(f"{caller}: {path} is missing (not a fastcur adapter folder)")
        document = load_json(peft_path, caller)
        if isinstance(document, dict) and document.get("fastcur_config") == CONFIG_NAME:
            raise FileNotFoundError(f"{caller}: {path} is missing beside the fastcur signpost {PEFT_CONFIG_NAME}; "
                                    f"the folder is damaged")
        if isinstance(document, dict) and "peft_type" in document and document.get("format") != FORMAT:
            raise ValueError(f"{caller}: {peft_path} is a PEFT adapter config (peft_type="
                             f"{document['peft_type']!r}); load it with fastcur.load_peft_adapter")
        path = peft_path                      # a format_version 1 fastcur folder
    else:
        document = load_json(path, caller)
    check_document(path, document, caller)
    return path, document


def _bad(caller: str, path: str, what: str) -> ValueError:
    return ValueError(f"{caller}: {path}: {what}; the file is damaged or was edited by hand")


def _need(cond: bool, caller: str, path: str, what: str) -> None:
    if not cond:
        raise _bad(caller, path, what)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def check_document(path: str, document: Any, caller: str) -> None:
    """Raise one ValueError line naming `path` and the field for anything a load would trip
    on later: the format, every layer entry, the threshold groups, modules_to_save, the weights
    file (a plain name inside the folder) and its SHA-256 (required)."""
    if not isinstance(document, dict):
        raise ValueError(f"{caller}: {path} holds a {type(document).__name__}, not a JSON object")
    if document.get("format") != FORMAT:
        raise ValueError(f"{caller}: {path} is not a fastcur adapter config "
                         f"(format = {document.get('format')!r}, expected {FORMAT!r})")
    version = document.get("format_version", 0)
    _need(_is_int(version), caller, path, f"format_version must be an int, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{caller}: {path} has format_version {version}, written by fastcur "
                         f"{document.get('fastcur_version')}; this fastcur ({_fastcur_version()}) reads up to "
                         f"{FORMAT_VERSION}; upgrade fastcur")
    for key, kind in (("method", str), ("config", dict), ("layers", dict), ("target_modules", list)):
        if key not in document:
            raise _bad(caller, path, f"the key {key!r} is missing")
        _need(isinstance(document[key], kind), caller, path,
              f"{key!r} must be a JSON {kind.__name__}, got {type(document[key]).__name__}")
    _need(bool(document["layers"]), caller, path, "'layers' is empty")
    groups = document.get("jump_thresholds", [])
    _need(isinstance(groups, list), caller, path, "'jump_thresholds' must be a list")
    keys = set()
    for i, group in enumerate(groups):
        _need(isinstance(group, dict) and isinstance(group.get("key"), str) and _str_list(group.get("layers"))
              and group["layers"] and all(n in document["layers"] for n in group["layers"]),
              caller, path, f"jump_thresholds[{i}] must be {{'key': str, 'layers': [saved layer names]}}, got {group!r}")
        keys.add(group["key"])
    for name, info in document["layers"].items():
        where = f"layers[{name!r}]"
        _need(isinstance(info, dict), caller, path, f"{where} must be an object")
        for key, ok in (("class", isinstance(info.get("class"), str)),
                        ("in_features", _is_int(info.get("in_features")) and info.get("in_features") > 0),
                        ("out_features", _is_int(info.get("out_features")) and info.get("out_features") > 0),
                        ("options", isinstance(info.get("options"), dict)),
                        ("state", isinstance(info.get("state"), dict)),
                        ("tensors", _str_list(info.get("tensors")))):
            _need(ok, caller, path, f"{where}[{key!r}] is missing or of the wrong type ({info.get(key)!r})")
        state = info["state"]
        _need(isinstance(state.get("merged", False), bool) and _is_int(state.get("merges", 0))
              and state.get("merges", 0) >= 0, caller, path,
              f"{where}['state'] needs a bool 'merged' and an int 'merges' >= 0, got {state!r}")
        threshold = state.get("threshold")
        if info["class"] == "JumpLoRALinear" or threshold is not None:
            _need(threshold in keys, caller, path,
                  f"{where}['state']['threshold'] = {threshold!r} names no jump_thresholds group "
                  f"({', '.join(sorted(keys)) or 'none saved'})")
    saved = document.get("modules_to_save", {}) or {}
    _need(isinstance(saved, dict), caller, path, "'modules_to_save' must be an object")
    for name, info in saved.items():
        _need(isinstance(info, dict) and isinstance(info.get("class"), str) and _str_list(info.get("tensors")),
              caller, path, f"modules_to_save[{name!r}] must be {{'class': str, 'tensors': [str]}}")
    weights = document.get("weights_file")
    _need(isinstance(weights, str) and weights not in ("", ".", "..") and os.path.basename(weights) == weights
          and "/" not in weights and "\\" not in weights and not os.path.isabs(weights),
          caller, path, f"weights_file must be a file name inside the adapter folder, got {weights!r}")
    digest = document.get("weights_sha256")
    _need(isinstance(digest, str) and _SHA256.fullmatch(digest) is not None, caller, path,
          f"weights_sha256 must be the weights file's SHA-256 (64 hex digits), got {digest!r}; "
          f"the integrity check cannot be turned off")
    schedule = document.get("merge_schedule")
    _need(schedule is None or isinstance(schedule, dict), caller, path, "'merge_schedule' must be an object or null")


def read_tensors(directory: str, path: str, document: dict, caller: str) -> dict[str, torch.Tensor]:
    """The tensors of the checked `document` (read from `path`), after the SHA-256 check."""
    weights = os.path.join(directory, document["weights_file"])
    config_name = os.path.basename(path)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{caller}: {weights} is missing")
    if sha256(weights) != document["weights_sha256"]:
        raise ValueError(f"{caller}: {weights} does not match {config_name} (its SHA-256 differs from the one "
                         f"recorded at save): the file is corrupt or truncated, or comes from another save")
    from safetensors.torch import load_file
    try:
        return load_file(weights)
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{caller}: {weights} is not a readable safetensors file ({e}); the file is corrupt "
                         f"or truncated") from None


def write_folder(staging: str, tensors: dict[str, torch.Tensor], document: dict, method: str) -> None:
    """Write an adapter into the empty folder `staging`: the tensors, the config (with the
    tensors' SHA-256) and the PEFT signpost."""
    from safetensors.torch import save_file
    weights = os.path.join(staging, WEIGHTS_NAME)
    save_file(tensors, weights, metadata={"format": "pt", "fastcur_method": method})
    document = {**document, "weights_file": WEIGHTS_NAME, "weights_sha256": sha256(weights)}
    for name, content in ((CONFIG_NAME, document), (PEFT_CONFIG_NAME, SIGNPOST)):
        with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
            f.write(json.dumps(content, indent=2) + "\n")
