"""The model registry: versioned artifacts with metadata, promotion, safe loading.

Layout of a registry directory::

    <name>/<version>/metadata.json   features, training window, metrics, data hash, files
    <name>/<version>/<artifact>      JSON (river state, priors, histograms) or .skops
    PROMOTED.json                    {"<name>": "<version>", ...}: what engines run

Artifacts are plain JSON or skops files. A pickle is never loaded: skops loads only the
types it is told to trust (:data:`TRUSTED_TYPES`), and every artifact's SHA-256 is checked
against its metadata before it is read. Promotion rewrites ``PROMOTED.json`` atomically;
engines watch that file and pick the new set up without a restart.

>>> import tempfile
>>> reg = ModelRegistry(tempfile.mkdtemp())
>>> v = reg.register("priors", {"priors.json": b'{"a": 1}'}, {"features": ["a"]})
>>> reg.promote("priors", v)
>>> reg.promoted()["priors"] == v, reg.load_json("priors", v, "priors.json")
(True, {'a': 1})
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

PROMOTED = "PROMOTED.json"
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_VERSION = re.compile(r"^v\d{4}$")
#: what skops may construct when loading a model of this registry
TRUSTED_TYPES = (
    "sklearn.ensemble._iforest.IsolationForest",
    "sklearn.tree._classes.ExtraTreeRegressor",
    "sklearn.tree._tree.Tree",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.float64",
    "numpy.int64",
    "numpy.random.mtrand.RandomState",
    "numpy.random._mt19937.MT19937",
    "builtins.slice",
)
#: where the registry shipped with the package lives
DEFAULT_REGISTRY = Path(__file__).resolve().parent / "registry"


class RegistryError(RuntimeError):
    """A registry entry that is missing, malformed or does not match its hash."""


def data_hash(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(hashlib.sha256(c).digest())
    return h.hexdigest()


class ModelRegistry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ----------------------------------------------------------------- writing
    def register(self, name: str, files: dict[str, bytes], metadata: dict[str, Any]) -> str:
        """Store a new version of ``name``; returns its version ("v0001", …)."""
        if not _NAME.match(name):
            raise RegistryError(f"bad model name {name!r}")
        for fname in files:
            if "/" in fname or fname.startswith(".") or fname == "metadata.json":
                raise RegistryError(f"bad artifact file name {fname!r}")
        versions = self.versions(name)
        version = f"v{(int(versions[-1][1:]) + 1) if versions else 1:04d}"
        d = self.root / name / version
        d.mkdir(parents=True, exist_ok=False)
        for fname, data in files.items():
            (d / fname).write_bytes(data)
        meta = {
            "name": name,
            "version": version,
            "created": metadata.get("created")
            or datetime.now(UTC).replace(microsecond=0).isoformat(),
            **{k: v for k, v in metadata.items() if k != "created"},
            "files": {f: hashlib.sha256(b).hexdigest() for f, b in sorted(files.items())},
        }
        (d / "metadata.json").write_bytes(
            orjson.dumps(meta, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        )
        return version

    def promote(self, name: str, version: str) -> None:
        """Make ``version`` the one engines run (atomic replace of PROMOTED.json)."""
        self.metadata(name, version)  # exists and is well formed
        current = self.promoted()
        current[name] = version
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".promoted-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(current, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
            fh.write(b"\n")
        os.replace(tmp, self.root / PROMOTED)

    # ----------------------------------------------------------------- reading
    def versions(self, name: str) -> list[str]:
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and _VERSION.match(p.name))

    def promoted(self) -> dict[str, str]:
        p = self.root / PROMOTED
        if not p.exists():
            return {}
        doc = orjson.loads(p.read_bytes())
        if not isinstance(doc, dict):
            raise RegistryError(f"{p}: not a mapping")
        return {str(k): str(v) for k, v in doc.items()}

    def stamp(self) -> tuple[int, int]:
        """Changes whenever PROMOTED.json is replaced (cheap enough to call per batch)."""
        try:
            st = os.stat(self.root / PROMOTED)
        except FileNotFoundError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_ino)

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        if not _NAME.match(name) or not _VERSION.match(version):
            raise RegistryError(f"bad model reference {name}/{version}")
        p = self.root / name / version / "metadata.json"
        if not p.exists():
            raise RegistryError(f"no model {name}/{version} in {self.root}")
        return orjson.loads(p.read_bytes())

    def read(self, name: str, version: str, fname: str) -> bytes:
        """An artifact's bytes, checked against the hash recorded at registration."""
        meta = self.metadata(name, version)
        want = meta.get("files", {}).get(fname)
        if want is None:
            raise RegistryError(f"{name}/{version} has no artifact {fname!r}")
        data = (self.root / name / version / fname).read_bytes()
        if hashlib.sha256(data).hexdigest() != want:
            raise RegistryError(f"{name}/{version}/{fname}: hash does not match its metadata")
        return data

    def load_json(self, name: str, version: str, fname: str) -> Any:
        return orjson.loads(self.read(name, version, fname))

    def load_skops(self, name: str, version: str, fname: str) -> Any:
        """A scikit-learn model, loaded by skops with only :data:`TRUSTED_TYPES` allowed."""
        import skops.io as sio

        data = self.read(name, version, fname)
        untrusted = [t for t in sio.get_untrusted_types(data=data) if t not in TRUSTED_TYPES]
        if untrusted:
            raise RegistryError(f"{name}/{version}/{fname}: refuses untrusted types {untrusted}")
        return sio.loads(data, trusted=list(TRUSTED_TYPES))


def skops_bytes(model: Any) -> bytes:
    import skops.io as sio

    return sio.dumps(model)
