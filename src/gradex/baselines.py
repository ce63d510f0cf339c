"""The obvious answers gradex's selection is compared with: mixes chosen without the estimates.

- all sources, the target alone;
- a random mix of the same size as the selection (drawn afresh for each fine-tuning seed);
- gradient similarity (as in LESS): the cosine between a source's mean projected gradient and the
  target's, read from the store, so it sees the same gradients the estimates do;
- representation similarity: the cosine between the mean last-layer hidden state of a source's
  examples and the target's, under the base model (an encoder-decoder's: its encoder's, over the prompts);
- DSIR (Xie et al. 2023, data selection with importance resampling), through the authors' package
  `data-selection`: hashed word n-gram models of the target and of the pool, and each source scored
  by its examples' log importance weights (`dsir_scores`).

All three score the sources against the target's validation examples, which is what the selection
is judged on, and keep the top k sources, k = the size of gradex's selection.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from gradex.data import Tokenized, batches


def random_mix(sources: Sequence[str], k: int, seed: str) -> list[str]:
    """k sources drawn uniformly without replacement, deterministic from `seed`, in source order."""
    picked = set(random.Random(seed).sample(range(len(sources)), k))
    return [s for j, s in enumerate(sources) if j in picked]


def top_k(scores: dict[str, float], k: int) -> list[str]:
    """The k sources with the highest similarity (ties broken by source order), in source order."""
    names = list(scores)
    best = set(sorted(names, key=lambda s: (-scores[s], names.index(s)))[:k])
    return [s for s in names if s in best]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def mean_cosines(features: np.ndarray, groups: Sequence[str], sources: Sequence[str], target: str) -> dict[str, float]:
    """Cosine between each source's mean feature row and the target's mean row.

    features: (N, d) one row per example; groups: each row's source name (the target's rows carry
    `target`). A source with no rows is an error: its similarity would be meaningless.
    """
    groups = np.asarray(groups)
    reference = features[groups == target]
    if len(reference) == 0:
        raise ValueError(f"no rows of the target {target!r} to compare the sources with")
    ref = reference.astype(np.float64).mean(0)
    out = {}
    for s in sources:
        rows = features[groups == s]
        if len(rows) == 0:
            raise ValueError(f"source {s!r} has no rows")
        out[s] = _cosine(rows.astype(np.float64).mean(0), ref)
    return out


@torch.no_grad()
def mean_hidden_states(model: torch.nn.Module, tokens: Sequence[Tokenized], indices: Sequence[int], pad_id: int,
                       batch_size: int = 32, desc: str = "representations", precision: str = "fp32") -> np.ndarray:
    """(len(indices), hidden) mean over each example's tokens (prompt and answer) of the last hidden layer;
    for an encoder-decoder (T5), over its prompt tokens of the encoder's last hidden layer. The forward
    runs in `precision` (a resolved one: bf16 | fp16 | fp32), the means in fp32."""
    from gradex.device import autocast, device_of
    from gradex.model import encoder_decoder_batch, is_encoder_decoder, language_model

    lm, device = language_model(model), device_of(model)
    rows = []
    for batch in tqdm(list(batches(tokens, list(indices), batch_size, pad_id)), desc=desc, leave=False):
        batch = batch.to(device)
        with autocast(precision, device):
            if is_encoder_decoder(lm):
                prompts = encoder_decoder_batch(lm, batch)
                ids, attention = prompts.input_ids, prompts.attention_mask
                hidden = lm.get_encoder()(input_ids=ids, attention_mask=attention).last_hidden_state
            else:
                attention = batch.attention_mask
                hidden = lm.base_model(input_ids=batch.input_ids, attention_mask=attention).last_hidden_state
        hidden = hidden.float()
        mask = attention[..., None].to(hidden.dtype)
        rows.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(rows).numpy()


# The package's own defaults (its paper's: unigrams and bigrams hashed into 10,000 buckets, its
# wordpunct tokenizer); part of what the cached scores are keyed by.
DSIR_SETTINGS = {"ngrams": 2, "num_buckets": 10000, "tokenizer": "wordpunct"}


def dsir_scores(pool: Sequence[str], groups: Sequence[str], sources: Sequence[str], target: Sequence[str],
                cache_dir: Path) -> dict[str, float]:
    """Per-source DSIR score: the mean, over a source's examples, of the log importance weight that
    `data_selection.HashedNgramDSIR` gives each example of the pool.

    pool: the candidate texts, one per training example of every source; groups: each one's source;
    target: the texts whose distribution DSIR resamples towards. The package fits a bag of hashed
    n-grams to the target and to the pool; an example's log importance weight is the sum, over its
    n-grams, of log p_target - log p_pool (its log likelihood ratio under the two models). Its files
    (the texts as JSONL, the weights) go to `cache_dir`, which is cleared first.

    Why the mean log weight rather than the share of DSIR's resample that lands in each source:
    it is a function of the data alone (the package draws its resample's Gumbel noise from numpy's
    global generator, so no seed of ours would fix it), it uses every example rather than a sample
    sized by the selection (which is empty when gradex selects nothing), and with examples of tens
    of n-grams the weights spread far beyond the noise's scale, so the resample is close to the
    top examples by weight anyway. The resample would also drop every example here: its length
    filter (min_example_length, 100 words by default) is made for pretraining documents.
    A source with no example is an error: its score would be meaningless."""
    from data_selection import HashedNgramDSIR

    groups = np.asarray(groups)
    empty = [s for s in sources if not (groups == s).any()]
    if empty:
        raise ValueError(f"source(s) {empty} have no examples to score")
    if not target:
        raise ValueError("no target examples to resample towards")
    shutil.rmtree(cache_dir, ignore_errors=True)  # weights of other data must never be read back
    cache_dir.mkdir(parents=True)
    paths = []
    for name, texts in (("pool", pool), ("target", target)):
        paths.append(cache_dir / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    # one process: one shard per file, so the pool's weights come back in one file in its order
    dsir = HashedNgramDSIR([str(paths[0])], [str(paths[1])], cache_dir=str(cache_dir), num_proc=1,
                           **DSIR_SETTINGS)
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars, one per pass over a file
        dsir.fit_importance_estimator(num_tokens_to_fit="all")
        dsir.compute_importance_weights()
    weights = np.load(dsir.log_importance_weights_dir / "0.npy")
    if weights.shape != (len(pool),):
        raise RuntimeError(f"data-selection wrote {weights.shape} log importance weights for {len(pool)} examples "
                           f"({dsir.log_importance_weights_dir}); this gradex expects data-selection 1.0.x")
    return {s: float(weights[groups == s].mean()) for s in sources}


def similarity_scores(kind: str, run: Any) -> dict[str, float]:
    """Per-source similarity to the target's validation examples: kind `gradient`, `representation`
    or `dsir` (mean log importance weight)."""
    target = run.cfg.data.target.name
    reference = f"{target}:validation"

    def group(i: int) -> str:  # a source's name, or the target's split
        e = run.examples[i]
        return e.source if e.source != target else f"{target}:{e.split}"

    if kind == "gradient":
        from gradex.gradients import Store

        store = Store.open(run.dir / "store")
        index = store.index.tolist()
        return mean_cosines(np.asarray(store.x), [group(i) for i in index], run.sources, reference)
    if kind == "representation":
        from gradex.model import load_base

        idx = run.train_indices(run.sources) + run.indices("validation")
        model = load_base(run.cfg.model).to(run.device)
        model.eval()
        # in the run's precision, as the run's other forwards: on a bf16 host 0.62x the fp32 time, with
        # the same order of sources on the default, corrupted and strategyqa (cosines within 2.4e-4)
        features = mean_hidden_states(model, run.tokens, idx, run.pad_id, precision=run.precision)
        return mean_cosines(features, [group(i) for i in idx], run.sources, reference)
    if kind == "dsir":
        return dsir_scores(*dsir_inputs(run), run.dir / "compare" / "dsir")
    raise ValueError(f"unknown similarity {kind!r}")


def dsir_inputs(run: Any) -> tuple[list[str], list[str], list[str], list[str]]:
    """(pool, groups, sources, target) of `dsir_scores` for a run: the texts the model reads (the
    templated prompt, then the answer) of every source's training examples, and of the target's
    validation examples."""
    target = run.cfg.data.target.name
    pool = [i for i in run.train_indices(run.sources) if run.examples[i].source != target]
    texts = [run.examples[i].prompt + run.examples[i].answer for i in pool]
    held = [run.examples[i].prompt + run.examples[i].answer for i in run.indices("validation")]
    return texts, [run.examples[i].source for i in pool], list(run.sources), held
