"""Where an experiment lives: find a params file from any folder and the project root it belongs to.

A notebook opened in JupyterLab runs its kernel in ``notebooks/``; papermill runs it wherever
``--cwd`` says; ``dbkit run`` runs it wherever the user typed the command. So ``runs/``,
``reports/``, ``data/`` and ``.cache/`` cannot be taken relative to the working directory.
They belong to the *project root*: ``$DBKIT_ROOT`` when set, else the folder that holds the
``params/`` folder the params file sits in (``<root>/params/notes/rank.yaml`` → ``<root>``),
else the working directory. :func:`enter_project` moves the process there, so every relative
path in dbkit and in the params (data folders, ``base.model``) means the same thing from a
notebook, papermill and the command line. ``extends:`` stays relative to the params file.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "DBKIT_ROOT"


class ParamsNotFound(ValueError):
    """A params file that is in none of the places searched (each is named)."""


def _absolute(path: Path) -> Path:
    # abspath, not resolve(): a params/ folder linked into a project must keep that project as root
    return Path(os.path.abspath(path))


def find_params(params_path: str | Path, cwd: Path | None = None) -> Path:
    """The params file as an absolute path. A relative path is tried against ``$DBKIT_ROOT``,
    then the working directory, then each folder above it (JupyterLab's ``notebooks/`` → the
    project root)."""
    p = Path(params_path)
    if p.is_absolute():
        if p.is_file():
            return p
        raise ParamsNotFound(folder_not_params(p) if p.is_dir() else f"{p}: params file not found")
    here = _absolute(cwd or Path.cwd())
    tried = []
    if os.environ.get(ROOT_ENV):
        tried.append(_absolute(Path(os.environ[ROOT_ENV]) / p))
    tried += [_absolute(folder / p) for folder in (here, *here.parents)]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    for candidate in tried:
        if candidate.is_dir():  # `dbkit run params/notes`: a folder of params files
            raise ParamsNotFound(folder_not_params(params_path))
    raise ParamsNotFound(f"{params_path}: params file not found (looked in {here} and every folder above it"
                         + (f", and in ${ROOT_ENV}={os.environ[ROOT_ENV]}" if os.environ.get(ROOT_ENV) else "")
                         + "): pass a path relative to the project root, e.g. params/demo.yaml")


def folder_not_params(params_path: str | Path) -> str:
    """The message for a params path that names a folder (`dbkit run params/notes`)."""
    return (f"{params_path} is a folder, not a params file: name a .yaml file, e.g. params/demo.yaml "
            "(or params/notes/*.yaml)")


def project_root(params_file: Path) -> Path:
    """``$DBKIT_ROOT``, else the parent of the nearest ``params/`` folder above the file, else the cwd."""
    if os.environ.get(ROOT_ENV):
        return _absolute(Path(os.environ[ROOT_ENV]))
    for folder in _absolute(params_file).parents:
        if folder.name == "params":
            return folder.parent
    return _absolute(Path.cwd())


def enter_project(params_path: str | Path) -> tuple[Path, Path]:
    """Find the params file, make its project root the working directory, and return
    (params file relative to the root when it is under it, root)."""
    params_file = find_params(params_path)
    root = project_root(params_file)
    if _absolute(Path.cwd()) != root:
        os.chdir(root)
    return absolute_from(params_file, root, root), root


def absolute_from(path: str | Path, cwd: Path, root: Path | None = None) -> Path:
    """A path the user typed in ``cwd`` before :func:`enter_project` moved the process; relative
    to ``root`` when it lies under it (so messages show it as the user would type it there)."""
    p = Path(path)
    p = p if p.is_absolute() else _absolute(cwd / p)
    if root is not None and p.is_relative_to(root):
        return p.relative_to(root)
    return p
