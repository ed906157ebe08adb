"""The data folder is radtriage's alone: folders 0700, files 0600 (or 0750/0640 for a group).

It holds the archive's images, the index (patients, password hashes, the audit log),
the web secret and the embedded Prefect server's database. :func:`secure_data_dir`
sets the process umask so that everything radtriage and its child processes create
is private, and tightens what an older install left readable by others, once, with a
log line. With ``[storage] group`` set, that group may read (not write) the folder: a
backup agent or a reporting tool, say; folders then get the set-group-ID bit so new
files inherit the group.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
from pathlib import Path

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

# Written once the whole tree has been checked: later starts check the top level only,
# so a large archive does not cost a walk at every start.
MARKER = ".permissions-checked"


def _modes(group: bool) -> tuple[int, int, int]:
    """(umask, folder mode, file mode)."""
    if group:
        return 0o027, 0o2750, 0o640
    return 0o077, 0o700, 0o600


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"[storage] group {name!r} does not exist; create it or leave group empty") from None


def _tighten(path: Path, folder_mode: int, file_mode: int, gid: int | None) -> bool:
    """Give ``path`` at most the allowed mode (and the group); ``True`` if it changed."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return False
    wanted = folder_mode if stat.S_ISDIR(info.st_mode) else file_mode
    current = stat.S_IMODE(info.st_mode)
    # The owner's bits stay as they are; the group gets exactly what the wanted mode
    # gives it (nothing without [storage] group), others nothing.
    new = (current & 0o700) | (wanted & (0o070 | stat.S_ISGID))
    changed = False
    if gid is not None and info.st_gid != gid:
        os.chown(path, -1, gid, follow_symlinks=False)
        changed = True
    if new != current:
        os.chmod(path, new)
        changed = True
    return changed


def secure_data_dir(data_dir: Path | str, group: str = "") -> int:
    """Set the umask and make ``data_dir`` private; return how many entries were tightened.

    Parameters
    ----------
    data_dir
        ``[storage] data_dir``; created when missing.
    group
        ``[storage] group``: a group that may read the data folder, or empty for none.

    Raises
    ------
    ConfigError
        When ``group`` does not exist, or the folder's permissions cannot be changed.
    """
    umask, folder_mode, file_mode = _modes(bool(group))
    os.umask(umask)
    gid = _group_id(group) if group else None
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True, mode=folder_mode)
    full = not (root / MARKER).exists()
    fixed = 0
    try:
        fixed += _tighten(root, folder_mode, file_mode, gid)
        entries = root.rglob("*") if full else root.iterdir()
        for entry in entries:
            fixed += _tighten(entry, folder_mode, file_mode, gid)
        if full:
            (root / MARKER).touch()
    except PermissionError as err:
        raise ConfigError(f"cannot make {root} private ({err}); run radtriage as the folder's owner") from None
    if fixed:
        log.warning(
            "tightened the permissions of %d files and folders under %s: they were readable by %s",
            fixed,
            root,
            "other users" if not group else "users outside the group " + group,
        )
    return fixed
