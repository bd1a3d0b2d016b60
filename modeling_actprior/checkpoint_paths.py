"""Where a command-line model argument points: a model folder, a training run folder (meaning its ``final/``), or a
Hub repo id; and whether it is the kind of model the command needs. Used by ``train_stage2.py --prior``,
``actprior evaluate --model`` and ``actprior push --model``, so the three say the same thing about the same mistake."""

from __future__ import annotations

import json
import os
import re

FINAL_DIR = "final"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _model_type(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None


def _looks_local(path: str) -> bool:
    """A path a user meant as a folder on this machine rather than a Hub id (``name`` or ``org/name`` whose first part
    is not a local folder)."""
    if not _HUB_ID.fullmatch(path):
        return True
    return "/" in path and os.path.isdir(path.split("/")[0])


def resolve_model_path(path: str, option: str, model_type: str | None = None, trained_by: str = "") -> str:
    """The folder (or Hub id) to load for ``option`` (e.g. ``"--prior"``): a run folder becomes its ``final/``; a
    missing local folder, a run without ``final/`` or a model of another ``model_type`` is an error that says what
    was expected (``trained_by``: the script that makes such a model)."""
    path = os.path.expanduser(str(path))
    how = f" ({trained_by})" if trained_by else ""
    if os.path.isdir(path):
        folder = path
        if not os.path.isfile(os.path.join(path, "config.json")):
            final = os.path.join(path, FINAL_DIR)
            if os.path.isfile(os.path.join(final, "config.json")):
                folder = final
            else:
                interrupted = os.path.isdir(os.path.join(path, "checkpoints"))
                raise FileNotFoundError(
                    f"{option} {path}: no config.json there nor in {final}. Pass a model folder or a training run "
                    f"folder (with final/){how}." + (" This run has checkpoints but no final/: finish it with "
                                                     "--resume_from_checkpoint latest first." if interrupted else ""))
        found = _model_type(folder)
        if model_type and found and found != model_type:
            raise ValueError(f"{option} {path}: this is a {found} checkpoint; {option} needs an {model_type} one"
                             f"{how}.")
        return folder
    if os.path.exists(path):
        raise FileNotFoundError(f"{option} {path} is a file; pass a model folder, a run folder or a Hub repo id.")
    if _looks_local(path):
        raise FileNotFoundError(f"{option} {path}: no such folder. Pass a model folder, a training run folder (with "
                                f"final/){how}, or a Hub repo id (org/name).")
    return path
