"""One process per run folder: <run dir>/run.lock, held from the moment a command claims the
folder until it exits.

The lock is an flock on the open lock file, not the file's existence: the kernel drops it when
its process dies (kill -9, a crash, power loss), so a lock file left behind by a dead process is
told apart from a live one by trying the lock, never by guessing from a pid (Linux NFS clients
map flock onto byte-range locks, so this holds across the machines of a shared file system).
The file's JSON (pid, host, argv, started) only tells a refused user who holds the folder.
"""
import fcntl
import json
import os
import socket
import sys
import time

from engine.errors import UserError

LOCK = 'run.lock'
# Checkpoints are written to a temporary file of this shape beside model.pt7 and renamed over
# it (checkpoint.save_checkpoint); with the folder's lock held, one still there is the remains
# of a write that was killed.
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = '.model.pt7.', '.tmp'

_held = []  # (run_dir, fd, folders this process created), in the order taken


def lock_run_dir(run_dir):
    """Takes <run_dir>/run.lock (creating the folder if needed) or refuses with the holder's
    name. Removes temporary files of interrupted checkpoint writes."""
    created = missing_folders(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            remove_empty(created)
            raise UserError(f'{run_dir} is in use by {holder}; wait for it to finish, or if that '
                            f'process is gone delete {path}') from None
        # The holder we waited behind may have unlinked the file it locked while we opened it:
        # a lock on a file no longer at `path` protects nothing, so start again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = read_holder(fd, missing=None)
    if previous:
        print(f'{os.path.basename(sys.argv[0])}: {path} was left by {previous}, which has ended; '
              f'taking the folder over', file=sys.stderr, flush=True)
    mine = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'argv': sys.argv,
                       'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, mine + b'\n', 0)
    os.fsync(fd)
    _held.append((run_dir, fd, created))
    for name in os.listdir(run_dir):
        if name.startswith(TEMPORARY_PREFIX) and name.endswith(TEMPORARY_SUFFIX):
            os.remove(os.path.join(run_dir, name))


def read_holder(fd, missing='another process that is just starting'):
    """'pid N on host H since T (argv)' from a lock file's JSON, or `missing` when it holds none
    yet (its holder has not written it) or is unreadable."""
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode())
        return (f'pid {info["pid"]} on host {info["host"]} since {info["started"]} '
                f'({" ".join(info["argv"])})')
    except (ValueError, KeyError, TypeError, OSError):
        return missing


def missing_folders(path):
    """The folders os.makedirs(path) would create, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def remove_empty(folders):
    # A command refused before training leaves no empty folder behind that it made.
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            break  # not empty (or not ours to remove): nor are the folders above it


def release_run_dirs():
    """Unlinks every lock this process holds, last taken first, and removes the folders it
    created that nothing was written to. Unlinking before closing means a process waiting on
    the same file finds it gone and retries on a fresh one."""
    while _held:
        run_dir, fd, created = _held.pop()
        try:
            os.unlink(os.path.join(run_dir, LOCK))
        except FileNotFoundError:
            pass
        os.close(fd)
        remove_empty(created)
