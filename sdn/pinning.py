"""`sdn pin <dataset|experiment>`: the checksum of the file a download or an import kept, written
into the parameter file that defines it.

A dataset whose source publishes no checksum (`sha256:` left empty) stops at its first download
with the file kept as `<file>.unverified` and its digest printed; the authors' checkpoint likewise
at its first import. Once the user has compared the digest with a source they trust, `sdn pin`
writes it, changing that one line of params.yaml or paper.yaml: comments and layout stay, as
ruamel's round trip keeps them. From then on the file is verified as any other.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from sdn.atomic import write_text_atomic
from sdn.data.download import file_digest, file_name
from sdn.errors import ConfigError, did_you_mean
from sdn.params import PARAMS_FILE, defining_files, load_params
from sdn.pipeline import DATA


def _pinned_file(name: str, params: dict[str, Any], root: Path) -> tuple[tuple[str, ...], str, list[Path]]:
    """(the dotted key of the checksum, its algorithm, where the file may be) for `name`."""
    datasets, experiments = params.get("datasets") or {}, params.get("experiments") or {}
    raw = root / DATA / "raw" / name
    if name in datasets:
        dataset = datasets[name]
        if "url" not in dataset:
            raise ConfigError(f"datasets.{name} is built offline, from no downloaded file: nothing to pin.")
        algorithm = "md5" if "md5" in dataset else "sha256"
        path = raw / file_name(dataset["url"])
        return ("datasets", name, algorithm), algorithm, [path, path.with_name(path.name + ".unverified")]
    if name in experiments:
        release = experiments[name].get("release")
        if not release:
            raise ConfigError(f"experiments.{name} is trained here, from no published file: nothing to pin.")
        return ("experiments", name, "release", "sha256"), "sha256", [raw / release["file"]]
    known = [*datasets, *(n for n, e in experiments.items() if isinstance(e, dict) and e.get("release"))]
    hint = did_you_mean(name, known)
    raise ConfigError(f"{name}: neither a downloaded dataset nor an imported experiment.{hint}")


def pin(name: str, root: Path = Path(".")) -> str:
    """Write the digest of `name`'s kept file into the file that defines `name`; what was done."""
    from ruamel.yaml import YAML

    params_path = root / PARAMS_FILE
    params = load_params(params_path)
    keys, algorithm, candidates = _pinned_file(name, params, root)
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise ConfigError(f"no file to pin for {name} at {candidates[0]}: run `make {name}` first (it "
                          "downloads the file, or says where to put it, and keeps it unverified).")
    digest = file_digest(found, algorithm)
    dotted = ".".join(keys)
    section = params
    for key in keys[:-1]:
        section = section[key]
    pinned = section.get(keys[-1])
    if pinned == digest:
        return f"{dotted} is already {digest}: `make {name}` goes on."
    if pinned is not None:
        raise ConfigError(
            f"{dotted} is pinned to {pinned}, but {found} hashes to {digest}: if the source changed on "
            f"purpose, edit the pin by hand; otherwise delete {found} and run `make {name}` to fetch it "
            "again."
        )
    where = root / defining_files(params_path)[keys[0]][name]
    # round trip, laid out as DVC writes parameter files; its loader builds plain YAML types only
    # (an unknown tag stays a tagged value), never an arbitrary Python object
    yaml = YAML(typ="rt")
    yaml.default_flow_style = False
    data = yaml.load(where.read_text())
    node = data
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = digest
    text = io.StringIO()
    yaml.dump(data, text)
    write_text_atomic(text.getvalue(), where)
    return f"pinned {dotted}: {digest} in {where.name} (the {algorithm} of {found}); `make {name}` goes on."
