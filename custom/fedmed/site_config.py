"""A site's own data config, ``local/fedmed_site.json``: where this hospital's data is.

Pure module. Job folders never hold data paths; each site (a real startup kit, or a simulated site)
says where its data lives in its own ``local/`` folder. A template still holding ``FILL_IN``
refuses to run instead of running wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

SITE_CONFIG_FILE = "fedmed_site.json"
PLACEHOLDER = "FILL_IN"
DATA_FORMATS = ("npz", "datalist", "synthetic", "msd")
# data-config key that lets a datalist name files outside its own folder (or base_dir): absolute paths or "../"
ALLOW_OUTSIDE_KEY = "allow_absolute_paths"


class SiteConfigError(ValueError):
    """A site config that cannot be used; the message names the site, the file and the key."""


def _find_placeholder(value, key_path: str) -> str | None:
    if isinstance(value, str) and PLACEHOLDER in value:
        return key_path
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find_placeholder(item, f"{key_path}.{key}" if key_path else key)
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _find_placeholder(item, f"{key_path}[{index}]")
            if found:
                return found
    return None


def load_site_config(path: str | Path, site_name: str) -> dict:
    """Read and check a site's data config; return the ``{"data": {...}, ...}`` dict for ``site_name``.

    A file with a ``"sites"`` mapping (written by ``simulate`` for all simulated sites) yields the
    entry of ``site_name``. Relative data paths resolve against the config file's folder.
    """
    path = Path(path)
    where = f"site '{site_name}': data config {path}"
    if not path.is_file():
        raise SiteConfigError(
            f"{where} does not exist. Create it from workspace_templates (see README 'Deploying to hospitals') "
            f"and set data.format and data.path."
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SiteConfigError(f"{where} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise SiteConfigError(f"{where} must hold a JSON object")
    if "sites" in config:
        if site_name not in config["sites"]:
            known = ", ".join(sorted(config["sites"])) or "none"
            raise SiteConfigError(f"{where} has no entry under 'sites' for this site (entries: {known})")
        config = config["sites"][site_name]
    placeholder_key = _find_placeholder(config, "")
    if placeholder_key:
        raise SiteConfigError(
            f"{where} still holds the placeholder at key '{placeholder_key}'. The hospital's IT team must "
            f"fill it in (data.format: one of {', '.join(DATA_FORMATS)}; data.path: absolute path to this "
            f"site's data) before this site can run a job."
        )
    data = config.get("data")
    if not isinstance(data, dict):
        raise SiteConfigError(f"{where} lacks the 'data' object, e.g. {{\"data\": {{\"format\": \"npz\", \"path\": ...}}}}")
    fmt = data.get("format")
    if fmt not in DATA_FORMATS:
        raise SiteConfigError(f"{where}: key 'data.format' is {fmt!r}; use one of {', '.join(DATA_FORMATS)}")
    if fmt != "synthetic":
        if not isinstance(data.get("path"), str) or not data["path"]:
            raise SiteConfigError(f"{where}: key 'data.path' must name this site's {fmt} file")
        data_path = Path(data["path"])
        if not data_path.is_absolute():
            data_path = (path.parent / data_path).resolve()
        if not data_path.exists():
            raise SiteConfigError(f"{where}: key 'data.path' points at {data_path}, which does not exist")
        config = {**config, "data": {**data, "path": str(data_path)}}
    if ALLOW_OUTSIDE_KEY in data and not isinstance(data[ALLOW_OUTSIDE_KEY], bool):
        raise SiteConfigError(f"{where}: key 'data.{ALLOW_OUTSIDE_KEY}' must be true or false, got {data[ALLOW_OUTSIDE_KEY]!r}")
    return config


def confined_path(entry: str, root: str | Path, allow_outside: bool, where: str) -> Path:
    """Resolve a datalist entry's file path against ``root`` (the datalist's folder or ``base_dir``).

    A path that is absolute or leads out of ``root`` (``../``, a symlinked folder) is refused unless the
    site's data config sets ``data.allow_absolute_paths: true``; the error names ``where`` (the datalist
    and entry), the path and the key to set. Raises :class:`SiteConfigError`.
    """
    root = Path(root).resolve()
    given = Path(entry)
    resolved = (given if given.is_absolute() else root / given).resolve()
    if not allow_outside and not resolved.is_relative_to(root):
        raise SiteConfigError(
            f"{where}: path '{entry}' resolves to {resolved}, outside {root} (the datalist's folder, or its base_dir). Move the file "
            f"under {root}, or set \"{ALLOW_OUTSIDE_KEY}\": true in the data section of this site's "
            f"local/{SITE_CONFIG_FILE} to allow absolute and outside paths"
        )
    return resolved
