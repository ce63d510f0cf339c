"""Per-example gradient throughput and memory of gradex against its peers, bergson and dattri.

    .venv/bin/python benchmarks/peers.py [--examples N] [--repeats R] [--quick] [--libraries gradex bergson dattri]
                                         [--data default|random] [--seq-len T] [--out PATH]

Every library computes one projected gradient per example, d = 256, in fp32 on the CPU, of the same
SmolLM2-135M-Instruct + LoRA adapter (r = 8 on q_proj, k_proj, v_proj, o_proj; 921,600 parameters,
lora_B drawn at random as in benchmarks/gradients.py, so lora_A's gradients are not 0), saved once
and loaded by each, on the same examples in the same batches of 8: training examples of the packaged
default (BIG-bench prompts and answers, every source), or with --data random the random tokens of
benchmarks/gradients.py (their answers' CE mostly exceeds -log(1e-6), where gradex clips u_s and its
gradient is 0: timing only). The loss is the answer tokens' mean cross-entropy (prompt and padding
labelled -100) for the peers; gradex differentiates u_s = -log(expm1(CE_s)) of the same CE_s, whose
gradient is the CE gradient times a negative number per example, so every cosine between two examples
is the same. gradex runs without its Adam preconditioner. `libraries.<name>.computes` says how each
is called:

- gradex:  gradex.gradients.compute_store with the default sparse projector (CountSketch), the store
           written to disk;
- bergson: bergson.collect_gradients (what `bergson build` runs per worker) on the model bergson's own
           setup_model_and_peft loads from the adapter folder, hooks on the LoRA linears, one global
           Rademacher projection to 256 (projection_target="global"), written to its on-disk index;
- dattri:  the steps TRAKAttributor.cache takes per training batch: AttributionTask.get_grad_loss_func
           (torch.func vmap of grad over the flattened LoRA parameters), then random_project with its
           CPU projector (BasicProjector, Rademacher; its CUDA projectors need fast_jl / sjlt).

The peers are not gradex dependencies: the script installs them, pinned (benchmarks/peers-requirements.txt),
into benchmarks/.peers-venv with gradex itself (pip -c constraints.txt, the local CPU torch), once.
Each measurement runs in its own process of that environment, so its peak memory is its own: a worker
loads the model, makes one warm-up pass over a batch, resets its peak RSS (/proc/self/clear_refs) and
times one pass over all examples, from projector construction to gradients written. Throughput
(examples/s) and the peak RSS of the timed pass are medians over repeats; within each repeat the
libraries run one after the other, in an order rotated from repeat to repeat, so they see the same load.
The projections differ, so the gradients are compared through what they should preserve: the cosine
similarity of every pair of examples. For each peer, the Pearson and Spearman correlation of its
pairwise cosines with gradex's; for every library, with the exact cosines of the unprojected gradients
(computed once, untimed), whose spread says how much a correlation can show (the JL error of one
cosine is about 1/sqrt(d) = 0.06). A library that cannot run here is recorded with its error message,
its ratios None. `summary`: gradex_vs_<peer> = gradex examples/s / the peer's (> 1: gradex faster),
memory_vs_<peer> = the peer's pass peak RSS / gradex's. Writes benchmarks/results/peers.json (not with
--quick, unless --out); the last printed line is the JSON.

DSIR, the cheap alternative for the selection itself, is timed apart, on a run gradex has made:

    .venv/bin/python benchmarks/peers.py --dsir runs/default [--repeats R]

It scores the run's sources by DSIR (gradex.baselines.dsir_scores: the authors' data-selection
package, hashed n-grams of every source's training texts against the target's validation texts, as
compare's `dsir` baseline), R times in this process, and sets the median beside the seconds gradex's
own selection took in that run (meta-train + gradients + select, from its ledger: the same host, not
the same process). It adds `dsir` to peers.json and `dsir_seconds`, `gradex_selection_seconds`,
`selection_vs_dsir` (gradex's seconds / DSIR's) to its summary, keeping everything else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from machine import cpu_model  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(__file__).resolve().parent / ".peers-venv"
REQUIREMENTS = Path(__file__).resolve().parent / "peers-requirements.txt"
RESULTS = Path(__file__).resolve().parent / "results" / "peers.json"
LIBRARIES = ("gradex", "bergson", "dattri")
BATCH = 8
ANSWER = 4
DIM = 256
SEED = 0
PACKAGES = ("torch", "transformers", "peft", "numpy", "gradex", "bergson", "dattri")


# ---------------------------------------------------------------------------- the peers' environment

def venv_python() -> Path:
    return VENV / "bin" / "python"


def install_fingerprint() -> str:
    """What the environment was built from: rebuilt when any of these files changes."""
    digest = hashlib.sha256()
    for path in (REQUIREMENTS, ROOT / "constraints.txt", ROOT / "pyproject.toml"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def pip_install(args: list[str]) -> None:
    cmd = [str(venv_python()), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"peers: `{shlex.join(cmd)}` failed:\n{proc.stderr[-4000:]}")


def ensure_venv() -> Path:
    """benchmarks/.peers-venv with gradex (editable) and the pinned peers, made once. The peers go in
    with --no-deps: peers-requirements.txt pins what they import (see its header for why)."""
    stamp = VENV / ".installed"
    want = install_fingerprint()
    if venv_python().exists() and stamp.exists() and stamp.read_text() == want:
        return venv_python()
    print(f"peers: installing gradex and the peers into {VENV.relative_to(ROOT)} (once, a few minutes) ...", flush=True)
    if not venv_python().exists():
        # from the project's interpreter: the venv gets its base Python (3.11, the local torch wheel's)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip_install(["-e", str(ROOT)])
    pip_install(["--no-deps", "-r", str(REQUIREMENTS)])
    stamp.write_text(want)
    return venv_python()


# ---------------------------------------------------------------------------- worker side (runs in .peers-venv)

def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB on Linux


def current_rss_gb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 2**20, 3)  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0), so ru_maxrss after the timed
    pass is that pass's peak (the model resident, its loading transients not). Freed heap goes back to
    the system first, or what the allocator kept from the warm-up would count as the pass's."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_examples(work: Path) -> list[dict]:
    return json.loads((work / "examples.json").read_text())["examples"]


def pad_id(work: Path) -> int:
    return json.loads((work / "examples.json").read_text())["pad_id"]


def padded(examples: list[dict], pad: int) -> tuple[list[list[int]], list[list[int]]]:
    """input ids right-padded with `pad`, and labels: -100 on the prompt and the padding. A causal LM's
    answer positions never see later (padded) positions, so no attention mask is needed."""
    width = max(len(e["ids"]) for e in examples)
    ids = [e["ids"] + [pad] * (width - len(e["ids"])) for e in examples]
    labels = [[-100] * e["n_prompt"] + e["ids"][e["n_prompt"]:] + [-100] * (width - len(e["ids"])) for e in examples]
    return ids, labels


def batch_indices(n: int) -> list[list[int]]:
    return [list(range(lo, min(lo + BATCH, n))) for lo in range(0, n, BATCH)]


def gradex_model(work: Path) -> Any:
    """The saved adapter on the base model, through gradex's own loader (what its stages use)."""
    from gradex.config import ModelConfig
    from gradex.saved import load_model

    return load_model(ModelConfig(), work / "adapter")


def prepare(work: Path, settings: dict) -> dict:
    """The shared inputs: the LoRA adapter (saved as a peft folder) and the examples."""
    import torch

    from gradex.assets import smollm2_dir
    from gradex.config import ModelConfig
    from gradex.model import load_base, load_tokenizer, make_trainable, trainable
    from gradex.saved import save_model

    model = make_trainable(load_base(ModelConfig()), ModelConfig(), seed=SEED)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # a trained-looking adapter (peft starts lora_B at 0, where lora_A's gradient is 0)
        for name, p in trainable(model):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    save_model(model, work / "adapter")
    pad_id, n = load_tokenizer(ModelConfig()).pad_token_id, settings["examples"]
    if settings["data"] == "default":
        examples = default_examples(n)
    else:
        examples = random_examples(n, settings["seq_len"], model.config.vocab_size)
    (work / "examples.json").write_text(json.dumps({"pad_id": pad_id, "examples": examples}))
    lengths = [len(e["ids"]) for e in examples]
    return {"base_model": str(smollm2_dir()), "trainable_params": sum(p.numel() for _, p in trainable(model)),
            "tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
                       "answer_median": statistics.median(len(e["ids"]) - e["n_prompt"] for e in examples)},
            "sources": sorted({e["source"] for e in examples}), "pad_id": pad_id,
            "torch_threads": torch.get_num_threads(), "versions": versions()}


def default_examples(n: int) -> list[dict]:
    """n training examples of the packaged default (BIG-bench arithmetic, language and unit tasks),
    evenly spaced over them so every source is in, tokenized as gradex does, sorted by length: in
    batches of 8 in this order every library gets the same batches with little padding (gradex sorts
    by length within its chunks, and the sort keeps this order)."""
    from gradex.config import load
    from gradex.data import load_examples as gradex_examples, tokenize
    from gradex.model import load_tokenizer

    cfg = load(None)
    train = [e for e in gradex_examples(cfg) if e.split == "train"]
    if n > len(train):
        raise ValueError(f"the packaged default has {len(train)} training examples; asked for {n}")
    picked = [train[i * len(train) // n] for i in range(n)]
    tokens = tokenize(load_tokenizer(cfg.model), picked)
    out = [{"ids": t.ids, "n_prompt": t.n_prompt, "source": e.source} for t, e in zip(tokens, picked)]
    return sorted(out, key=lambda e: len(e["ids"]))


def random_examples(n: int, length: int, vocab: int) -> list[dict]:
    """benchmarks/gradients.py's examples: random tokens, the last 4 the answer. Their answers' CE is
    mostly above -log(1e-6), where gradex's u_s is clipped and its gradient 0: for timing only."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    return [{"ids": torch.randint(10, vocab, (length,), generator=gen).tolist(), "n_prompt": length - ANSWER,
             "source": "random"} for _ in range(n)]


def exact_cosines(work: Path, settings: dict) -> dict:
    """Pairwise cosines of the unprojected per-example gradients (gradex's hooks, identity projector)."""
    import torch

    from gradex.data import Tokenized, collate
    from gradex.gradients import make_projector
    from gradex.gradients.compute import GradientComputer

    model = gradex_model(work)
    tokens = [Tokenized(e["ids"], e["n_prompt"]) for e in load_examples(work)]
    computer = GradientComputer(model)
    projector = make_projector("none", model)
    rows = []
    for idx in batch_indices(len(tokens)):
        x, _ = computer.projected(collate([tokens[i] for i in idx], idx, pad_id(work)), projector, "fp32")
        rows.append(torch.nn.functional.normalize(x.double(), dim=1))
    unit = torch.cat(rows)
    np.save(work / "exact-cosines.npy", (unit @ unit.T).numpy())
    return {"parameters": projector.input_dim}


def gradex_library() -> tuple[Callable, Callable, dict]:
    def setup(work: Path, settings: dict) -> dict:
        from gradex.data import Tokenized

        tokens = [Tokenized(e["ids"], e["n_prompt"]) for e in load_examples(work)]
        return {"model": gradex_model(work), "tokens": tokens, "pad_id": pad_id(work)}

    def run(state: dict, n: int, out_dir: Path) -> np.ndarray:
        from gradex.gradients import compute_store, make_projector

        projector = make_projector("sparse", dim=DIM, seed=SEED)  # bound to the LoRA parameters in compute_store
        store = compute_store(state["model"], state["tokens"][:n], range(n), pad_id=state["pad_id"], out_dir=out_dir,
                              projector=projector, batch_size=BATCH, chunk_size=64, precision="fp32", progress=False)
        return np.array(store.x, dtype=np.float32)

    computes = {
        "call": "gradex.gradients.compute_store(model, tokens, range(n), pad_id, out_dir, "
                "projector=make_projector('sparse', dim=256, seed=0), batch_size=8, chunk_size=64, precision='fp32')",
        "model": "gradex.saved.load_model (PeftModel.from_pretrained on load_base) from the saved adapter",
        "gradient": "of u_s = -log(expm1(CE_s)), CE_s the mean cross-entropy of the answer tokens ('ce' output), "
                    "w.r.t. every lora_A and lora_B matrix; forward hooks and one batched backward, per-example "
                    "weight gradients as one bmm per layer; no Adam preconditioner",
        "projection": "sparse (CountSketch: one +-1 per coordinate into one of 256 buckets, drawn from (seed, "
                      "parameter name)), applied layer by layer",
        "output": "a gradex store on disk (x.npy (n, 256), u.npy, index.npy, manifest.json)",
    }
    return setup, run, computes


def bergson_library() -> tuple[Callable, Callable, dict]:
    def setup(work: Path, settings: dict) -> dict:
        from datasets import Dataset

        from bergson.config.config import IndexConfig
        from bergson.utils.worker_utils import setup_model_and_peft

        cfg = IndexConfig(run_path=str(work / "bergson-model"), model=str(work / "adapter"), precision="fp32")
        model, targets = setup_model_and_peft(cfg)  # bergson's loader: base from the adapter's config, then peft
        examples = load_examples(work)
        data = Dataset.from_dict({
            "input_ids": [e["ids"] for e in examples],
            "labels": [[-100] * e["n_prompt"] + e["ids"][e["n_prompt"]:] for e in examples],  # the answer only
            "length": [len(e["ids"]) for e in examples],
        })
        return {"model": model, "targets": targets, "data": data, "work": work}

    def run(state: dict, n: int, out_dir: Path) -> np.ndarray:
        from bergson import collect_gradients
        from bergson.config.config import IndexConfig
        from bergson.data import load_gradients
        from bergson.utils.worker_utils import create_processor

        cfg = IndexConfig(run_path=str(out_dir / "index"), model=str(state["work"] / "adapter"), precision="fp32",
                          projection_dim=DIM, projection_type="rademacher", projection_target="global",
                          projection_seed=SEED, loss_fn="ce", loss_reduction="mean")
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)  # as bergson.build.build does first
        processor = create_processor(state["model"], cfg, state["targets"])
        data = state["data"].select(range(n))
        collect_gradients(state["model"], data, processor, cfg, batches=batch_indices(n),
                          target_modules=state["targets"])
        return np.array(load_gradients(cfg.partial_run_path), dtype=np.float32)

    computes = {
        "call": "bergson.collect_gradients(model, data, create_processor(model, cfg, targets), cfg, batches=<8 "
                "in order>, target_modules=targets) with IndexConfig(precision='fp32', projection_dim=256, "
                "projection_type='rademacher', projection_target='global', projection_seed=0, loss_fn='ce', "
                "loss_reduction='mean'); gradients read back with bergson.data.load_gradients",
        "model": "bergson.utils.worker_utils.setup_model_and_peft from the saved adapter folder (base model from "
                 "the adapter's base_model_name_or_path, a local folder; bergson freezes every parameter but the "
                 "input embeddings, so its backward hooks fire); targets: the 240 lora_A / lora_B linears",
        "gradient": "of the mean cross-entropy of the answer tokens (labels -100 on the prompt), from backward "
                    "hooks: each module's per-example gradient from its output gradients and inputs",
        "projection": "global: each module's gradient times its block of one 256 x p Rademacher matrix (Philox "
                      "counters, regenerated in blocks on every batch, numpy on the CPU), summed, / sqrt(256)",
        "output": "a bergson index on disk (gradients.bin, info.json, data.hf)",
        "not_used": "projection_target='per_module' (the default) projects each module to projection_dim^2 "
                    "entries, one block per module (240 x 256 here), not one 256-vector per example",
    }
    return setup, run, computes


def dattri_library() -> tuple[Callable, Callable, dict]:
    def setup(work: Path, settings: dict) -> dict:
        import torch
        from torch.nn import functional as F

        from dattri.task import AttributionTask

        model = gradex_model(work)
        model.eval()

        def loss_func(params: dict, data: tuple) -> torch.Tensor:
            ids, labels = data  # one example (vmap maps the batch)
            logits = torch.func.functional_call(model, params, (ids.unsqueeze(0),)).logits[0, :-1]
            return F.cross_entropy(logits, labels[1:], ignore_index=-100)  # mean over the answer tokens

        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        params, _ = task.get_param()  # the trainable (LoRA) parameters, flattened, as TRAKAttributor.cache
        return {"task": task, "params": params, "examples": load_examples(work), "pad_id": pad_id(work),
                "norm": sum(p.numel() for p in model.parameters() if p.requires_grad) ** 0.5}

    def run(state: dict, n: int, out_dir: Path) -> np.ndarray:
        import torch

        from dattri.func.projection import random_project

        grad_loss = state["task"].get_grad_loss_func(in_dims=(None, 0))
        project, out = None, []
        for idx in batch_indices(n):
            ids, labels = padded([state["examples"][i] for i in idx], state["pad_id"])
            grad_t = grad_loss(state["params"], (torch.tensor(ids), torch.tensor(labels)))  # (B, p)
            grad_t = torch.nan_to_num(grad_t) / state["norm"]  # as TRAKAttributor.cache
            if project is None:  # TRAK builds one per batch; once is the cheaper use of the same projector
                project = random_project(grad_t, grad_t.shape[0], proj_dim=DIM, proj_max_batch_size=32,
                                         proj_seed=SEED, proj_type="rademacher", device="cpu")
            out.append(project(grad_t, ensemble_id=0).detach())
        x = torch.cat(out).numpy().astype(np.float32)
        np.save(out_dir / "x.npy", x)  # dattri keeps them in memory; written like the others' outputs
        return x

    computes = {
        "call": "dattri.task.AttributionTask(loss_func, model, checkpoints=model.state_dict()); params = "
                "task.get_param()[0]; per batch of 8: task.get_grad_loss_func(in_dims=(None, 0))(params, (ids, "
                "labels)), nan_to_num, / sqrt(p), then dattri.func.projection.random_project(grad, 8, proj_dim=256, "
                "proj_max_batch_size=32, proj_seed=0, proj_type='rademacher', device='cpu') (the steps of "
                "TRAKAttributor.cache, without its TRAK-specific kernel solve)",
        "model": "gradex.saved.load_model from the saved adapter (dattri has no model loader of its own)",
        "gradient": "torch.func vmap(grad) of the mean cross-entropy of the answer tokens (functional_call on "
                    "the PeftModel, labels -100 on the prompt) w.r.t. the flattened LoRA parameters: the full "
                    "(8, 921600) per-example gradients of a batch at once",
        "projection": "BasicProjector, dattri's CPU projector: dense Rademacher, held as a p x 100 block that is "
                      "regenerated for each of the 3 column blocks (100, 100, 56) of the 256 outputs on every "
                      "batch, / sqrt(256); its CUDA projectors (fast_jl, sjlt, grass) need a GPU",
        "output": "in memory (written to x.npy here)",
        "not_used": "LoGraAttributor / BlockProjectedIFAttributor project each layer on its own (a per-layer "
                    "dimension summed over layers), not to one 256-vector per example",
    }
    return setup, run, computes


LIBRARY_CODE = {"gradex": gradex_library, "bergson": bergson_library, "dattri": dattri_library}


def measure(library: str, work: Path, settings: dict, tag: str) -> dict:
    """Load (untimed), warm up on one batch, then time one pass over every example."""
    setup, run, computes = LIBRARY_CODE[library]()
    t0 = time.perf_counter()
    state = setup(work, settings)
    load_s = time.perf_counter() - t0
    n = settings["examples"]
    with tempfile.TemporaryDirectory(dir=work) as warm:
        run(state, min(BATCH, n), Path(warm))
    rss_before = peak_rss_gb()
    reset = reset_peak_rss()
    rss_start = current_rss_gb()
    with tempfile.TemporaryDirectory(dir=work) as out, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # what the library warns about in the pass (a slow fallback, say)
        t0 = time.perf_counter()
        x = run(state, n, Path(out))
        seconds = time.perf_counter() - t0
    if x.shape != (n, DIM) or not np.isfinite(x).all():
        raise RuntimeError(f"{library} gave gradients of shape {x.shape} (finite: {bool(np.isfinite(x).all())}), "
                           f"expected ({n}, {DIM})")
    np.save(work / f"grads-{library}.npy", x)
    pass_peak = peak_rss_gb()  # the timed pass's own, where the reset worked; else the process's so far
    return {"seconds": round(seconds, 3), "examples_per_s": round(n / seconds, 3), "load_s": round(load_s, 2),
            "pass_peak_rss_gb": pass_peak if reset else None, "process_peak_rss_gb": max(rss_before, pass_peak),
            "rss_at_pass_start_gb": rss_start,
            "warnings": sorted({f"{w.category.__name__}: {str(w.message).strip()[:400]}" for w in caught}),
            "versions": versions(), "computes": computes}


def worker(role: str, work: Path, tag: str) -> None:
    """One role in its own process; the result (or the error) goes to a JSON file in `work`."""
    settings = json.loads((work / "settings.json").read_text())
    try:
        if role == "prepare":
            result = prepare(work, settings)
        elif role == "exact":
            result = exact_cosines(work, settings)
        else:
            result = measure(role, work, settings, tag)
    except BaseException as err:  # recorded, not raised: a peer that cannot run here is a result
        result = {"error": f"{type(err).__name__}: {err}".strip(), "traceback_tail": traceback.format_exc()[-3000:]}
    (work / f"{role}-{tag}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------- parent side

def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # no hub at run time: every model is a local folder, and a library asking the hub would hang or fail
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("VIRTUAL_ENV", None)
    return env


def run_worker(python: Path, role: str, work: Path, tag: str = "0") -> dict:
    out = work / f"{role}-{tag}.json"
    proc = subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", role, "--work", str(work),
                           "--tag", tag], cwd=ROOT, env=worker_env(), capture_output=True, text=True)
    if out.exists():
        result = json.loads(out.read_text())
    else:  # died before writing (killed for memory, a crash in native code)
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        result = {"error": f"the {role} worker died ({how}) before reporting"}
    if "error" in result:
        result["stderr_tail"] = proc.stderr[-3000:]
    return result


def pair_cosines(x: np.ndarray) -> np.ndarray:
    """The cosine of every pair i < j of rows (NaN where a row is zero)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return (unit @ unit.T)[np.triu_indices(len(x), 1)]


def correlations(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    from scipy.stats import spearmanr

    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return {"pearson": None, "spearman": None, "pairs": int(keep.sum())}
    return {"pearson": round(float(np.corrcoef(a[keep], b[keep])[0, 1]), 4),
            "spearman": round(float(spearmanr(a[keep], b[keep]).statistic), 4), "pairs": int(keep.sum())}


def data_description(args: argparse.Namespace, prep: dict) -> dict:
    if args.data == "default":
        what = ("training examples of the packaged default config (BIG-bench tasks), evenly spaced over all of "
                "them (every source in), tokenized by gradex.data.tokenize, sorted by length")
    else:
        what = f"random tokens (seed 0), {args.seq_len} per example, the last {ANSWER} the answer"
    return {"kind": args.data, "what": what, "tokens": prep["tokens"], "sources": prep["sources"]}


def median_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def library_report(lib: str, rows: list[dict], failure: dict | None, cosines: np.ndarray | None,
                   exact_pairs: np.ndarray | None) -> dict:
    """One library's medians over repeats (or why it could not run) and how its cosines match the exact ones."""
    if failure is not None:
        return {"ran": False, "error": failure["error"], "traceback_tail": failure.get("traceback_tail"),
                "stderr_tail": failure.get("stderr_tail"), "computes": LIBRARY_CODE[lib]()[2]}
    out = {"ran": True, "examples_per_s": median_of(rows, "examples_per_s"),
           "pass_peak_rss_gb": median_of(rows, "pass_peak_rss_gb"),
           "process_peak_rss_gb": median_of(rows, "process_peak_rss_gb"),
           "rss_at_pass_start_gb": median_of(rows, "rss_at_pass_start_gb"),
           "load_s": median_of(rows, "load_s"), "warnings_in_pass": rows[-1]["warnings"],
           "per_repeat_examples_per_s": [r["examples_per_s"] for r in rows],
           "per_repeat_pass_peak_rss_gb": [r["pass_peak_rss_gb"] for r in rows],
           "versions": rows[-1]["versions"], "computes": rows[-1]["computes"]}
    if exact_pairs is not None and cosines is not None:
        out["cosines_vs_exact"] = correlations(cosines, exact_pairs)
    return out


def summarize(libs: dict[str, dict], cosines: dict[str, np.ndarray]) -> dict[str, Any]:
    """The headline figures: throughput and memory ratios against gradex, cosine correlations."""
    def figure(lib: str, key: str) -> float | None:
        return libs.get(lib, {}).get(key)

    summary: dict[str, Any] = {f"{lib}_examples_per_s": figure(lib, "examples_per_s") for lib in libs}
    for peer in ("bergson", "dattri"):
        summary[f"gradex_vs_{peer}"] = ratio(figure("gradex", "examples_per_s"), figure(peer, "examples_per_s"))
        summary[f"memory_vs_{peer}"] = ratio(figure(peer, "pass_peak_rss_gb"), figure("gradex", "pass_peak_rss_gb"))
        both = "gradex" in cosines and peer in cosines
        corr = correlations(cosines["gradex"], cosines[peer]) if both else {"pearson": None, "spearman": None}
        summary[f"cosine_pearson_vs_{peer}"] = corr["pearson"]
        summary[f"cosine_spearman_vs_{peer}"] = corr["spearman"]
    for lib, report in libs.items():
        summary[f"cosine_pearson_{lib}_vs_exact"] = report.get("cosines_vs_exact", {}).get("pearson")
    summary["not_run"] = {lib: report["error"] for lib, report in libs.items() if not report["ran"]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=None, help="examples per pass (default 64; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 3; 1 with --quick)")
    parser.add_argument("--data", choices=("default", "random"), default="default",
                        help="default: training examples of the packaged default (the default); random: random "
                             "tokens as in benchmarks/gradients.py (gradex's u_s is clipped on most: timing only)")
    parser.add_argument("--seq-len", type=int, default=64, help="with --data random: tokens per example, the last 4 "
                                                                 "the answer")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 examples, one repeat, nothing saved")
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS.relative_to(ROOT)}, "
                                                              f"none with --quick)")
    parser.add_argument("--dsir", type=Path, metavar="RUN_DIR", help="time DSIR's selection on a run gradex made, "
                                                                      "beside gradex's own (see the top); nothing else")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="0", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.work, args.tag)
        return
    n = args.examples or (8 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.dsir is not None:
        dsir_main(args.dsir, repeats, args.out or RESULTS)
        return
    if n < 2 or repeats < 1 or args.seq_len <= ANSWER:
        parser.error("need --examples >= 2, --repeats >= 1 and --seq-len > 4")
    libraries = list(dict.fromkeys(args.libraries))
    python = ensure_venv()

    runs: dict[str, list[dict]] = {lib: [] for lib in libraries}
    failed: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gradex-peers-") as tmp:
        work = Path(tmp)
        settings = {"examples": n, "data": args.data, "seq_len": args.seq_len}
        (work / "settings.json").write_text(json.dumps(settings))
        prep = run_worker(python, "prepare", work)
        if "error" in prep:
            sys.exit(f"peers: preparing the model and examples failed: {prep['error']}\n{prep.get('stderr_tail', '')}")
        exact = run_worker(python, "exact", work)
        for r in range(repeats):
            shift = r % len(libraries)
            for lib in libraries[shift:] + libraries[:shift]:
                if lib in failed:
                    continue  # the same error again would say nothing new
                result = run_worker(python, lib, work, str(r))
                if "error" in result:
                    failed[lib] = result
                    print(f"[repeat {r + 1}/{repeats}] {lib}: could not run: {result['error'].splitlines()[0][:300]}",
                          flush=True)
                    continue
                runs[lib].append(result)
                print(f"[repeat {r + 1}/{repeats}] {lib}: {result['examples_per_s']:.2f} ex/s, pass peak RSS "
                      f"{result['pass_peak_rss_gb']} GB (process {result['process_peak_rss_gb']} GB)", flush=True)
        cosines = {lib: pair_cosines(np.load(work / f"grads-{lib}.npy")) for lib in libraries if runs[lib]}
        exact_pairs = None
        if "error" not in exact:
            full = np.load(work / "exact-cosines.npy")
            exact_pairs = full[np.triu_indices(len(full), 1)]

    libs_out = {lib: library_report(lib, runs[lib], failed.get(lib), cosines.get(lib), exact_pairs)
                for lib in libraries}
    summary = summarize(libs_out, cosines)
    body = {
        "summary": summary,
        "libraries": libs_out,
        "exact_cosines": ({"error": exact["error"], "stderr_tail": exact.get("stderr_tail")} if "error" in exact else
                          {"parameters": exact["parameters"], "pairs": int(len(exact_pairs)),
                           "mean": round(float(np.mean(exact_pairs)), 4), "std": round(float(np.std(exact_pairs)), 4),
                           "min": round(float(np.min(exact_pairs)), 4), "max": round(float(np.max(exact_pairs)), 4)}),
        "settings": {"model": "SmolLM2-135M-Instruct", "base_model_path": prep["base_model"],
                     "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                     "trainable_params": prep["trainable_params"], "d": DIM, "precision": "fp32", "device": "cpu",
                     "examples": n, "batch_size": BATCH, "data": data_description(args, prep),
                     "loss": "mean cross-entropy of the answer tokens (gradex: u_s = -log(expm1(CE_s)), the same "
                             "cosines)", "repeats": repeats,
                     "timed": "one pass over all examples after a one-batch warm-up, projector construction and "
                              "the library's output write included, model loading not",
                     "memory": "pass_peak_rss_gb: ru_maxrss of the worker process over the timed pass (peak reset "
                               "through /proc/self/clear_refs before it; the model resident); process_peak_rss_gb: "
                               "the whole worker, loading included"},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": prep["versions"]["torch"],
                    "torch_threads": prep["torch_threads"], "platform": platform.platform(),
                    "python": platform.python_version()},
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "repeats": repeats,
        "quick": args.quick,
    }
    target = args.out or (None if args.quick else RESULTS)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps(body))


def dsir_cost(run_dir: Path, repeats: int) -> dict[str, Any]:
    """DSIR's wall time for the selection of the run in `run_dir`, beside gradex's own (see the top)."""
    from gradex import config as config_mod
    from gradex import ledger, pipeline
    from gradex.baselines import dsir_inputs, dsir_scores

    if not (run_dir / "select" / "stage.json").exists():
        sys.exit(f"peers: --dsir {run_dir}: no finished select there; run `gradex select` on its config first")
    run = pipeline.Run(config_mod.load(run_dir / "config.yaml"))
    pool, groups, sources, target = dsir_inputs(run)
    seconds = []
    with tempfile.TemporaryDirectory(prefix="gradex-dsir-") as tmp:
        for _ in range(repeats):
            t0 = time.perf_counter()
            scores = dsir_scores(pool, groups, sources, target, Path(tmp) / "dsir")
            seconds.append(time.perf_counter() - t0)
    stages = {name: ledger.read(run_dir / where).get("seconds")
              for name, where in (("meta-train", "meta"), ("gradients", "store"), ("select", "select"))}
    gradex = sum(stages.values())
    dsir = statistics.median(seconds)
    return {"run_dir": str(run_dir), "pool_examples": len(pool), "target_examples": len(target),
            "sources": len(sources), "repeats": repeats, "seconds": [round(t, 3) for t in seconds],
            "median_seconds": round(dsir, 3), "gradex_stages_seconds": stages,
            "gradex_selection_seconds": round(gradex, 1), "selection_vs_dsir": round(gradex / dsir, 1),
            "top_source_by_dsir": max(scores, key=scores.get),
            "timed": "DSIR: writing its JSONL inputs, fitting both n-gram models and weighting the pool, in this "
                     "process; gradex: the run's ledger seconds of meta-train, gradients and select"}


def dsir_main(run_dir: Path, repeats: int, out: Path) -> None:
    body = json.loads(out.read_text()) if out.exists() else {"summary": {}}
    found = dsir_cost(run_dir, repeats)
    body["dsir"] = {**found, "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
                    "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()}}
    body["summary"].update(dsir_seconds=found["median_seconds"], gradex_selection_seconds=found["gradex_selection_seconds"],
                           selection_vs_dsir=found["selection_vs_dsir"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps(body["dsir"]))


if __name__ == "__main__":
    main()
