"""The stages of a run, one module each; every stage is a function of a gradex.run.Run that reads
and writes the run directory and never calls another stage. gradex.graph declares them (names, what
each needs); gradex.pipeline runs them in order.

    prepare    read, check and tokenize every source: data/
    meta       meta-train: multitask-train theta*: meta/theta_star/ (a peft adapter or a model folder)
    gradients  projected per-example gradients at theta* (and Adam's preconditioner): store/
    estimate   the estimation problem from the store, the run's estimator, `gradex estimate`
    select     select sources by their estimates, and how stable that is: selection.json, estimates.parquet
    finetune   fine-tunes of mixes under the finetune recipe and budget; the final model: final/
    compare    every candidate mix fine-tuned over seeds against the selection: compare.json
"""
