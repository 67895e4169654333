"""Dropping root after binding: ``drop_privileges(user, group)`` (``[daemon] user``/``group``).

Runs in every startup that names a user or group, with or without --daemon:
after the listeners are bound (so ports below 1024 work) and the pid and log
files are open.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd

from .pidfile import StartupError

logger = logging.getLogger(__name__)


class PrivilegeError(StartupError):
    """--user/--group cannot be applied."""



def _lookup_user(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(
            f"unknown user {user!r} (--user); check: getent passwd {user}"
        ) from None


def _lookup_group(group: str) -> int:
    try:
        entry = grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
    except KeyError:
        raise PrivilegeError(
            f"unknown group {group!r} (--group); check: getent group {group}"
        ) from None
    return entry.gr_gid


def drop_privileges(user: str | None, group: str | None) -> None:
    """Switch to *user* and *group* for good (real, effective and saved ids).

    Nothing to do when both are None. As root: the supplementary groups
    become the user's (``os.getgrouplist``; just *group* without a user),
    then the gid (``group``, else the user's primary group), then the uid;
    in that order because after setuid() we may no longer change groups.
    Afterwards it checks that root can't be regained. Without a user only
    the groups change. Call after binding (so ports below 1024 work) and after
    opening the pid and log files.

    Raises ``PrivilegeError`` for an unknown user or group, when not root
    (``--user needs root``), or when a set*id call fails.
    """
    if user is None and group is None:
        return
    if os.geteuid() != 0:
        flag = "--user" if user is not None else "--group"
        raise PrivilegeError(f"{flag} needs root (running as uid {os.geteuid()})")
    entry = _lookup_user(user) if user is not None else None
    if group is not None:
        gid = _lookup_group(group)
    else:
        assert entry is not None
        gid = entry.pw_gid
    groups = os.getgrouplist(entry.pw_name, gid) if entry is not None else [gid]
    target = f"user {user} " if user is not None else ""
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        if entry is not None:
            os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    except OSError as err:
        raise PrivilegeError(
            f"cannot switch to {target}group {gid}: {err.strerror}"
        ) from err
    if entry is not None and entry.pw_uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PrivilegeError(f"dropped to {target.strip()} but could regain root")
    logger.debug("now uid=%s gid=%d groups=%s", os.getuid(), gid, groups)
