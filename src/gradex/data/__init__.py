"""Sources -> examples -> tokens.

An `Example` is one (prompt, answer) pair of one source and one split. The target's examples are
split into train / validation / test; every auxiliary source's examples are training examples.
Errors name the source, the file and the file's own line (or row), and are raised before any model
is loaded. A training example whose prompt repeats a target validation or test prompt would inflate
every score; `data.leakage` says whether such examples are dropped, refused or only reported.

The package, by concern: examples (the records), readers (a source's rows), build (rows -> examples,
the split and the leakage check), tokens (examples -> tokens, batches), manifest (the prepared data
on disk). Its public names are importable from gradex.data itself.
"""

from gradex.data.build import expand_sources, load_examples, prompt_key, shuffle_answers
from gradex.data.examples import END, SPLITS, Batch, Example, Examples, Tokenized
from gradex.data.manifest import data_sha256, read_examples, save_examples
from gradex.data.readers import READERS, Row, answer_pattern, hf_label, hf_local_files, target_scores
from gradex.data.tokens import (CHAT, ENCODER_DECODER, batches, chat_parts, check_lengths, collate, for_encoder_decoder,
                                generated_answer, leading_special_ids, prompt_ids, tokenize, tokenize_openings,
                                uses_chat_template)

__all__ = [
    "expand_sources", "load_examples", "prompt_key", "shuffle_answers",
    "END", "SPLITS", "Batch", "Example", "Examples", "Tokenized",
    "data_sha256", "read_examples", "save_examples",
    "READERS", "Row", "answer_pattern", "hf_label", "hf_local_files", "target_scores",
    "CHAT", "ENCODER_DECODER", "batches", "chat_parts", "check_lengths", "collate", "for_encoder_decoder",
    "generated_answer", "leading_special_ids", "prompt_ids", "tokenize", "tokenize_openings", "uses_chat_template",
]
