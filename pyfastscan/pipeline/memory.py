"""How much memory this process may still take: the least of what the system has
available (/proc/meminfo MemAvailable), what its cgroup allows (v2 memory.max minus
memory.current, or v1 memory.limit_in_bytes minus memory.usage_in_bytes) and what its
address-space limit leaves (RLIMIT_AS, ulimit -v, minus the address space already in use).
Under a container or ulimit the scan sizes itself to the limit instead of failing with
the allocator's message."""
import os
from typing import Dict, Optional

_UNLIMITED_V1 = 1 << 60  # cgroup v1 says "no limit" with a huge page-rounded number


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup_paths(proc: str):
    """(v2 folder suffix or None, v1 memory folder suffix or None) from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        with open(os.path.join(proc, "self/cgroup")) as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) != 3:
                    continue
                if parts[0] == "0" and parts[1] == "":
                    v2 = parts[2]
                elif "memory" in parts[1].split(","):
                    v1 = parts[2]
    except OSError:
        pass
    return v2, v1


def cgroup_available(root: str = "/sys/fs/cgroup", proc: str = "/proc") -> Optional[int]:
    """Bytes the process's cgroup still allows (limit minus usage), or None without a limit."""
    v2, v1 = _cgroup_paths(proc)
    found = []
    for base in filter(None, (v2 and os.path.join(root, v2.lstrip("/")), root)):
        limit = _read_int(os.path.join(base, "memory.max"))
        if limit is not None:
            found.append(limit - (_read_int(os.path.join(base, "memory.current")) or 0))
            break
    for base in filter(None, (v1 and os.path.join(root, "memory", v1.lstrip("/")), os.path.join(root, "memory"))):
        limit = _read_int(os.path.join(base, "memory.limit_in_bytes"))
        if limit is not None and limit < _UNLIMITED_V1:
            found.append(limit - (_read_int(os.path.join(base, "memory.usage_in_bytes")) or 0))
            break
    return max(0, min(found)) if found else None


def address_space_available(proc: str = "/proc") -> Optional[int]:
    """Bytes RLIMIT_AS still leaves (the soft limit minus VmSize), or None when unlimited."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    used = 0
    try:
        with open(os.path.join(proc, "self/status")) as f:
            for line in f:
                if line.startswith("VmSize:"):
                    used = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return max(0, soft - used)


def meminfo_available(proc: str = "/proc") -> Optional[int]:
    try:
        with open(os.path.join(proc, "meminfo")) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def memory_limits(root: str = "/sys/fs/cgroup", proc: str = "/proc") -> Dict[str, Optional[int]]:
    """Each source's bytes available (None: no limit from it)."""
    return {"meminfo": meminfo_available(proc), "cgroup": cgroup_available(root, proc),
            "rlimit_as": address_space_available(proc)}


def available_memory(root: str = "/sys/fs/cgroup", proc: str = "/proc") -> Optional[int]:
    """The least of :func:`memory_limits`, or None when none says anything."""
    known = [v for v in memory_limits(root, proc).values() if v is not None]
    return min(known) if known else None
