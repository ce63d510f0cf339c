"""The whole run on a tiny model: every stage, its artifacts, skipping and resuming."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_run_config, write_config
from gradex import config, pipeline
from gradex.cli import main
from gradex.comparison import format_table
from gradex.writer import LOCK


@pytest.fixture()
def cfg(tmp_path, tiny_model_dir):
    return tiny_run_config(tmp_path, tiny_model_dir)


def test_run_writes_every_artifact_and_skips_unchanged_stages(cfg, capsys):
    summary = pipeline.run_all(cfg)
    run_dir = cfg.run_dir
    store = json.loads((run_dir / "store" / "manifest.json").read_text())
    assert (f"gradex: projected gradients of {store['n']} examples (d=32, fp32) in "
            in capsys.readouterr().err)  # every stage says when it is done, the gradient pass too
    for path in ("config.yaml", "data/manifest.json", "meta/theta_star/adapter_model.safetensors", "meta/log.jsonl", "store/manifest.json",
                 "estimates.parquet", "selection.json", "final/selected/adapter_config.json", "final/metrics.json", "compare.json",
                 "compare.parquet", "summary.json"):
        assert (run_dir / path).exists(), path
    selection = summary["selection"]
    assert set(selection["source_scores"]) == {"add_more", "mul", "sub"}
    # where and in what precision each model stage ran: in the summary, the status and the report
    assert summary["ran_on"] == {"meta-train": "cpu fp32", "gradients": "cpu fp32", "finetune": "cpu fp32"}
    assert summary["compare"]["cost"]["ran_on"]["finetune"] == "cpu fp32"
    from gradex.cli import format_summary

    assert "ran on: meta-train cpu fp32, gradients cpu fp32, finetune cpu fp32 (model.precision: fp32)" in \
        format_summary(summary)
    assert [r["why"] for r in pipeline.status(cfg) if r["stage"] in ("meta-train", "gradients", "finetune")] == \
        ["cpu fp32"] * 3
    assert "<td>cpu fp32</td>" in (run_dir / "report.html").read_text()
    assert set(selection["selected"]) <= {"add_more", "mul", "sub"}
    found = selection["stability"]  # select.bootstrap resamples of the store (gradex.stability)
    assert found["resamples"] == 50 and set(found["share"]) == {"add_more", "mul", "sub"}
    assert all(0 <= v <= 1 for v in found["share"].values())
    assert "selected in" in format_summary(summary) and "selected in" in (run_dir / "report.html").read_text()
    estimates = pd.read_parquet(run_dir / "estimates.parquet")
    assert len(estimates) >= 2 ** 3 and estimates["estimate"].notna().all()  # best: all 8 subsets estimated
    final = summary["final"]
    assert final["members"] == selection["selected"] and final["test"]["examples"] == 16
    # every mix under each of its names (mixes that are the same sources are shown once, under all of them)
    mixes = {n: m for m in summary["compare"]["mixes"] for n in m.get("same_mix", [m["name"]])}
    # an empty selection is compared with single sources: the best by estimate joins the baselines
    single = {"gradex[best single]"} if not selection["selected"] else set()
    assert set(mixes) == {"selected", "all", "target", "random", "gradient", "representation"} | single
    assert mixes["all"]["members"] == [["add_more", "mul", "sub"]] and mixes["target"]["members"] == [[]]
    k = len(selection["selected"])
    assert mixes["selected"]["sizes"] == [k]
    assert all(m["sizes"] == [k or 1] for name, m in mixes.items() if name not in ("all", "target", "selected"))
    rows = summary["compare"]["rows"]
    assert len({r["steps"] for r in rows}) == 1  # the equal budget: every mix got the same steps
    # finetune.epochs (1) over the all-sources mix, batch 8: every training example the data kept (the
    # leakage check drops the target train and add_more rows that repeat a validation or test prompt)
    train = [e for e in pipeline.Run(cfg).examples if e.split == "train"]
    assert len(train) < 20 + 3 * 24 and rows[0]["steps"] == -(-len(train) // 8)

    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK}  # the writer's pid
    assert main(["run", str(write_config(cfg, cfg.run_dir.parent / "cfg.yaml"))]) == 0
    assert "source scores" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in before}
    changed = [p.name for p in before if before[p] != after[p]]
    assert set(changed) <= {"summary.json", "report.html"}, changed  # every stage was skipped (the report is rebuilt)


def test_estimate_and_select_again_leave_the_rows_of_one_call(cfg):
    """estimates.parquet is keyed by (stage, fingerprint, members): a repeated (or killed and rerun)
    call replaces its own rows instead of adding them twice; other calls' rows stay."""
    subsets = [["mul"], ["add_more", "sub"]]
    pipeline.select(cfg)
    pipeline.estimate(cfg, subsets)
    path = cfg.run_dir / "estimates.parquet"

    def by_stage() -> dict[str, list[tuple]]:
        frame = pd.read_parquet(path)
        return {stage: sorted((tuple(r.members), r.estimate) for r in rows.itertuples())
                for stage, rows in frame.groupby("stage")}

    once = by_stage()
    assert len(once["estimate"]) == 2 and len(once["select"]) == 2 ** 3
    pipeline.estimate(cfg, subsets)
    pipeline.select(cfg, force=True)
    assert by_stage() == once
    pipeline.estimate(cfg, [["mul", "sub"]])  # another subset: a row more
    after = by_stage()["estimate"]
    assert len(after) == 3 and set(once["estimate"]) < set(after)


def test_changed_stage_reruns_downstream_only(cfg):
    pipeline.select(cfg)
    meta_mtime = (cfg.run_dir / "meta" / "theta_star" / "adapter_model.safetensors").stat().st_mtime_ns
    store_mtime = (cfg.run_dir / "store" / "manifest.json").stat().st_mtime_ns
    cfg.select.method, cfg.select.subsets = "ensemble", 30  # a select setting: select re-runs, nothing upstream
    body = pipeline.select(cfg)
    assert body["estimated_subsets"] >= 30
    assert (cfg.run_dir / "meta" / "theta_star" / "adapter_model.safetensors").stat().st_mtime_ns == meta_mtime
    assert (cfg.run_dir / "store" / "manifest.json").stat().st_mtime_ns == store_mtime
    cfg.gradients.dim = 16
    pipeline.gradients(cfg)
    assert json.loads((cfg.run_dir / "store" / "manifest.json").read_text())["dim"] == 16
    assert (cfg.run_dir / "meta" / "theta_star" / "adapter_model.safetensors").stat().st_mtime_ns == meta_mtime


def test_gradients_stage_projects_adam_preconditioned_gradients(cfg):
    import torch

    from gradex.gradients import Store, preconditioner

    cfg.gradients.preconditioner = "adam"  # the pass of its own (the default, meta, is checked below)
    store = Store.open(pipeline.gradients(cfg))
    assert store.manifest["projector"]["preconditioner"] == "adam" and store.manifest["output"] == "ce"
    moments = preconditioner.load(store.path / pipeline.PRECONDITIONER_FILE)
    run = pipeline.Run(cfg)
    model = run.meta_model()
    # oracle for one batch: the plain autograd gradient of the training loss, squared
    first = preconditioner.second_moments(model, run.tokens, run.train_indices(run.sources), run.pad_id,
                                          cfg.refit.batch_size, 1, "fp32", seed=cfg.refit.seed, progress=False)
    from gradex.data import collate
    from gradex.model import trainable, training_loss
    from gradex.train import epoch_batches

    chunk = epoch_batches(run.tokens, run.train_indices(run.sources), cfg.refit.batch_size, cfg.refit.seed, 0)[0]
    training_loss(model, collate([run.tokens[i] for i in chunk], chunk, run.pad_id)).backward()
    for name, p in trainable(model):
        torch.testing.assert_close(first[name], p.grad.square(), rtol=1e-4, atol=1e-12)
    assert set(moments) == set(first) and all(bool((m >= 0).all()) for m in moments.values())
    cfg.gradients.preconditioner = "none"
    plain = Store.open(pipeline.gradients(cfg))
    assert "preconditioner" not in plain.manifest["projector"]
    assert not np.allclose(np.asarray(plain.x), np.asarray(store.x))
    # meta: the meta-train's own last moments (kept beside theta*), no pass of their own
    cfg.gradients.preconditioner = "meta"
    meta = Store.open(pipeline.gradients(cfg))
    kept = preconditioner.load(cfg.run_dir / "meta" / "adam_moments.pt")
    used = preconditioner.load(meta.path / pipeline.PRECONDITIONER_FILE)
    assert set(kept) == set(moments) and all(torch.equal(kept[n], used[n]) for n in kept)
    assert not np.allclose(np.asarray(meta.x), np.asarray(store.x))


def test_the_meta_trains_moments_are_its_optimizers_own(tmp_path):
    """preconditioner.from_checkpoint against torch's AdamW state: v / (1 - beta2^t) per parameter."""
    import torch

    from gradex.gradients import preconditioner
    from gradex.train import _save

    p, q = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p, q], lr=1e-2, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        p.grad, q.grad = torch.randn(3, 2, generator=gen), torch.randn(4, generator=gen)
        opt.step()
        sched.step()
    _save(tmp_path / "checkpoint.pt", [p, q], opt, sched, 5, [])
    found = preconditioner.from_checkpoint(tmp_path / "checkpoint.pt", ["p", "q"])
    for name, param in (("p", p), ("q", q)):
        torch.testing.assert_close(found[name], opt.state[param]["exp_avg_sq"] / (1 - 0.99 ** 5))


def test_training_resumes_to_the_same_result(cfg, tmp_path, monkeypatch):
    import torch

    from gradex import train as train_mod

    run = pipeline.prepare(cfg)
    idx = run.train_indices(run.sources)
    full = run.fresh_model()
    steps = len(train_mod.train(full, run.tokens, idx, cfg.meta, run.pad_id, "fp32", progress=False))
    ckpt = tmp_path / "ckpt.pt"
    real_collate, calls = train_mod.collate, []

    def crash_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) > steps // 2:
            raise KeyboardInterrupt  # the process dies mid-run
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "collate", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(run.fresh_model(), run.tokens, idx, cfg.meta, run.pad_id, "fp32", checkpoint=ckpt,
                        save_every=1, progress=False)
    monkeypatch.setattr(train_mod, "collate", real_collate)
    resumed = run.fresh_model()
    history = train_mod.train(resumed, run.tokens, idx, cfg.meta, run.pad_id, "fp32", checkpoint=ckpt, progress=False)
    assert len(history) == steps
    for (_, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_estimate_named_subsets_linear_and_reconstruct(cfg, capsys):
    cfg.run_dir.parent.mkdir(parents=True, exist_ok=True)
    assert main(["estimate", str(write_config(cfg, cfg.run_dir.parent / "cfg.yaml")), "--subset", "mul,sub", "--subset", ""]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and printed[0].endswith("mul, sub") and printed[1].endswith("(target only)")
    assert all("output change" in line for line in printed)
    rows = pipeline.estimate(cfg, [[], ["mul"], ["add_more", "mul", "sub"]])
    assert [r["members"] for r in rows] == [[], ["mul"], ["add_more", "mul", "sub"]]
    assert all(r["mode"] == "linear" and r["step"] >= 0 for r in rows)
    # the all-sources fit changes the training outputs by the calibrated amount ...
    assert rows[2]["output_change"] == pytest.approx(cfg.estimate.output_change, rel=0.02)
    # ... or moves the weights by the requested step when step_size is given instead
    cfg.estimate.step_size = 0.05
    by_step = pipeline.estimate(cfg, [["add_more", "mul", "sub"]])
    assert by_step[0]["step"] == pytest.approx(0.05, rel=0.02)
    cfg.estimate.step_size = None
    cfg.estimate.mode = "reconstruct"
    recon = pipeline.estimate(cfg, [[], ["mul"]])
    assert all(r["mode"] == "reconstruct" and 0 < r["estimate"] < 20 for r in recon)
    with pytest.raises(config.ConfigError, match=r"unknown source\(s\) \['nope'\]"):
        pipeline.estimate(cfg, [["nope"]])


def test_validate_and_check_linearity_on_tiny_model(cfg):
    from gradex import diagnostics, ledger

    cfg.refit.max_steps = 2
    result = diagnostics.validate(cfg, k=3, seeds=2, recipe="refit")
    assert result["subsets"] == 3 and len(result["rows"]) == 3 and result["recipe"] == "refit"
    assert all(len(r["seeds"]) == 2 for r in result["rows"])
    assert [r["output_change"] for r in result["sweep"] if r["in_use"]] == list(diagnostics.SWEEP)
    assert {r["weighting"] for r in result["sweep"] if r["in_use"]} == {"mean"}  # refit capped by max_steps: equal steps
    assert result["real_output_change"] > 0
    rows_dir = cfg.run_dir / "validate" / "rows"

    def rows() -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(rows_dir.iterdir())]

    runs = rows()
    assert len(runs) == 6 and all((cfg.run_dir / r["adapter"]).exists() for r in runs)
    # each row is the keyed record of its recipe, members and seed
    refit_key = diagnostics.recipe_key(pipeline.Run(cfg), "refit")
    assert all(ledger.kept(rows_dir / f"{r['key']}.json",
                           diagnostics.row_path(pipeline.Run(cfg), refit_key, r["members"], r["seed"])[1]) for r in runs)
    assert all(set(r["losses"]) == set(r["output_change"]) == {"ce", "mean-logodds"} for r in runs)
    assert (cfg.run_dir / "validation.json").exists() and (cfg.run_dir / "validation.png").exists()
    # real fine-tunes are keyed by members and seed: fewer subsets reuse them, more add only new ones
    fewer = diagnostics.validate(cfg, k=2, seeds=2, recipe="refit")
    assert len(rows()) == 6
    first = {tuple(r["members"]): r["seeds"] for r in result["rows"]}
    assert all(first[tuple(r["members"])] == r["seeds"] for r in fewer["rows"])
    more = diagnostics.validate(cfg, k=4, seeds=2, recipe="refit")
    assert len(rows()) == 8 and more["subsets"] == 4
    assert diagnostics.missing_rows(pipeline.Run(cfg), 4, 2, "refit") == 0
    assert diagnostics.missing_rows(pipeline.Run(cfg), 5, 2, "refit") == 2
    assert all(first[tuple(r["members"])] == r["seeds"] for r in more["rows"] if tuple(r["members"]) in first)
    # the default truth is the deployed recipe: the same fine-tunes that final/ and compare use
    deployed = diagnostics.validate(cfg, k=2, seeds=1)
    assert deployed["recipe"] == "finetune" and "equal budget" in deployed["recipe_description"]
    steps = {r["steps"] for r in rows() if r["recipe"] == "finetune"}
    assert steps == {pipeline.budget_steps(pipeline.Run(cfg))}
    for row in deployed["rows"]:
        entry = cfg.run_dir / "finetunes" / pipeline.finetune_key(pipeline.Run(cfg), row["members"], 0) / "result.json"
        assert json.loads(entry.read_text())["validation"]["loss"] == pytest.approx(row["real"], rel=1e-4)
    # a row records the losses under every output: another gradients.output needs no fine-tune again
    other = dataclasses.replace(cfg, gradients=dataclasses.replace(cfg.gradients, output="mean-logodds"))
    assert diagnostics.missing_rows(pipeline.Run(other), 2, 1) == 0
    lin = diagnostics.check_linearity(cfg, examples=8, subsets=1)
    kinds = [r["kind"] for r in lin["rows"]]
    assert kinds.count("random") == len(diagnostics.RADII) and kinds.count("trajectory") == len(diagnostics.TRAJECTORY_STEPS)
    # along a tiny random step the first-order model must beat the zeroth-order one
    small = [r for r in lin["rows"] if r["kind"] == "random"][0]
    assert small["first_order_rel_mse"] < small["zeroth_order_rel_mse"]
    table = diagnostics.format_linearity(lin).splitlines()
    assert "in range(P)" in table[0] and len(table) == 1 + len(lin["rows"])
    last = lin["rows"][-1]
    assert table[-1].split()[-1] == f"{last['projected_explained']:.2f}"


def test_gradients_stage_under_a_two_process_launch_equals_one_process(cfg, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    import torch

    pipeline.meta_train(cfg)
    # the one-process pass with each rank's thread count (OMP_NUM_THREADS=1 below): MKL's AVX2 kernels
    # round differently by thread count (an Intel host, MKL_ENABLE_INSTRUCTIONS=AVX2: 849 of 3,200
    # entries off by up to 3.8e-6 at 2 threads against 1), and the launch must not change a byte
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = pipeline.gradients(cfg)
    finally:
        torch.set_num_threads(threads)
    reference = {name: np.load(single / f"{name}.npy") for name in ("x", "u", "index")}
    path = write_config(cfg, cfg.run_dir.parent / "cfg.yaml")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gradex.cli", "gradients", str(path), "--force"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((single / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    for name, array in reference.items():
        np.testing.assert_array_equal(np.load(single / f"{name}.npy"), array)


def test_compare_caches_fine_tunes_labels_unequal_budgets_and_checks_named_mixes(cfg, capsys):
    cfg.compare.baselines = ["all", "random"]
    first = pipeline.compare(cfg, seeds=2, mixes={"mine": ["mul"]})
    names = [n for m in first["mixes"] for n in m.get("same_mix", [m["name"]])]
    single = [] if pipeline.select(cfg)["selected"] else ["gradex[best single]"]  # an empty selection's
    assert sorted(names) == sorted(["selected", "all", "random", "mine", *single]) and first["seeds"] == 2
    assert all(m["seeds"] == [0, 1] for m in first["mixes"])
    assert "equal budget" in first["recipe"]["description"]
    # the price of the answer: a forward search by real fine-tuning over 3 sources evaluates the target
    # alone and 3, 2, 1 candidates in its rounds at most, each at the measured fine-tune's cost
    cost = first["cost"]
    assert 1 + 3 <= cost["forward_finetunes"] <= 1 + 3 + 2 + 1
    assert cost["by_finetuning_seconds"] == pytest.approx(cost["forward_finetunes"] * cost["finetune_seconds"], rel=0.01)
    assert cost["speedup"] == pytest.approx(cost["by_finetuning_seconds"] / cost["selection_seconds"], rel=0.01)
    assert f"would train {cost['forward_finetunes']} fine-tunes" in format_table(first)
    # every compared fine-tune carries the estimate of its mix, the same the estimator gives directly
    fn, _, _ = pipeline.estimator(pipeline.Run(cfg))
    run_sources = pipeline.Run(cfg).sources
    for r in first["rows"]:
        direct = fn(torch.tensor([[n in r["members"] for n in run_sources]])).item()
        assert r["estimate"] == pytest.approx(direct, rel=1e-6)
    trained = sorted(p.name for p in (cfg.run_dir / "finetunes").iterdir())
    again = pipeline.compare(cfg, seeds=2, mixes={"mine": ["mul"]})
    assert again["key"] == first["key"]
    assert sorted(p.name for p in (cfg.run_dir / "finetunes").iterdir()) == trained  # nothing retrained
    # the epochs recipe: each mix takes epochs over its own data, and the table says it is unequal
    cfg.finetune.budget = "epochs"
    unequal = pipeline.compare(cfg, seeds=1)
    assert all(r["steps"] == -(-r["examples"] // 8) for r in unequal["rows"])  # one epoch of its own data
    train = [e for e in pipeline.Run(cfg).examples if e.split == "train"]
    # (the all-sources mix: its own row, or the selection's when that selects every source)
    assert {len(r["members"]): r["steps"] for r in unequal["rows"]}[3] == -(-len(train) // 8)
    assert "UNEQUAL" in unequal["recipe"]["description"] and "UNEQUAL" in format_table(unequal)
    with pytest.raises(config.ConfigError, match=r"compare mix 'bad': unknown source\(s\) \['nope'\]"):
        pipeline.compare(cfg, seeds=1, mixes={"bad": ["nope"]})
    assert main(["compare", str(write_config(cfg, cfg.run_dir.parent / "cfg.yaml")), "--seeds", "1", "--mix", "bad"]) == 2
    assert "expected NAME=A,B" in capsys.readouterr().err


def test_a_store_with_a_non_finite_row_is_refused_by_name(cfg):
    pipeline.gradients(cfg)
    x = np.load(cfg.run_dir / "store" / "x.npy", mmap_mode="r+")
    x[3, 0] = np.inf  # as a damaged disk or a hand edit would leave it
    x.flush()
    del x
    with pytest.raises(FloatingPointError, match=r"store: 1 row\(s\) are not finite, e.g. the row of an example of "
                                                 r"'\w+' \((train|validation)\); rebuild it with `gradex gradients --force`"):
        pipeline.estimate(cfg, [["mul"]])


def test_gradients_offsets_choose_the_rows_whose_offsets_come_from_an_fp32_forward(tmp_path, tiny_model_dir):
    """gradients.offsets under bf16: by default (pass) the store keeps the pass's own offsets; `fp32`
    takes every row's from an fp32 forward; `validation` only the target's validation rows'. A change
    of the setting re-runs the gradient pass alone (theta* is kept), and the gradients are the same."""
    import dataclasses

    from gradex import ledger
    from gradex.gradients import Store

    base = tiny_run_config(tmp_path, tiny_model_dir)
    bf16 = dataclasses.replace(base, model=dataclasses.replace(base.model, precision="bf16"))
    stores = {}
    for setting in ("pass", "fp32", "validation"):
        cfg = dataclasses.replace(bf16, gradients=dataclasses.replace(bf16.gradients, offsets=setting))
        pipeline.gradients(cfg)
        stores[setting] = Store.open(cfg.run_dir / "store")
        if setting == "pass":
            assert cfg.gradients == bf16.gradients  # the default
            theta = ledger.read(cfg.run_dir / "meta")
    assert theta and ledger.read(bf16.run_dir / "meta") == theta  # not trained again
    own, exact, mixed = stores["pass"], stores["fp32"], stores["validation"]
    validation = np.isin(mixed.index, pipeline.Run(bf16).indices("validation"))
    assert validation.sum() == 16 and np.array_equal(mixed.index, exact.index) and np.array_equal(mixed.x, exact.x)
    assert np.array_equal(own.x, exact.x)
    assert np.allclose(mixed.u[validation], exact.u[validation], atol=1e-5)
    assert np.array_equal(mixed.u[~validation], own.u[~validation])
    assert np.abs(own.u - exact.u).max() > 1e-4  # bf16 hidden states move the offsets


def test_select_and_compare_follow_what_they_read(cfg):
    """select serves only the selection.json its record describes; its weights follow the fine-tune
    budget they divide; an earlier weights selection's mixture.yaml goes with it; and compare's
    table is made again when the estimates its rows carry change."""
    cfg.compare.baselines, cfg.select.bootstrap = ["all", "target"], 0
    old = pipeline.compare(cfg, seeds=1)

    def compare_state() -> str:
        return {r["stage"]: r["state"] for r in pipeline.status(cfg)}["compare"]

    assert compare_state() == "done"
    cfg.compare.baselines = ["all", "target", "random"]  # a mix more: `gradex run` would compare again
    assert compare_state() == "stale"
    cfg.compare.baselines = ["all", "target"]
    path = cfg.run_dir / "selection.json"
    made = json.loads(path.read_text())
    path.write_text('{"selected": [')  # cut short, or another config's: a kill between the write and the record
    again = pipeline.select(cfg)
    assert json.loads(path.read_text()) == again and (again["selected"], again["estimate"]) == (made["selected"],
                                                                                               made["estimate"])
    cfg.estimate.l2, cfg.estimate.output_change = 1e6, None  # every estimate near theta*'s own loss
    assert compare_state() == "stale"
    now = pipeline.compare(cfg, seeds=1)
    assert now["key"] != old["key"] and compare_state() == "done"
    fresh = {r["mix"]: r["estimate"] for r in now["rows"]}
    assert all(fresh[r["mix"]] != pytest.approx(r["estimate"], abs=1e-6) for r in old["rows"])
    cfg.select.method = "weights"
    budget = pipeline.select(cfg)["mixture"]["budget_examples"]
    assert (cfg.run_dir / "mixture.yaml").exists()
    cfg.finetune.max_steps = 3
    assert {r["stage"]: r["state"] for r in pipeline.status(cfg)}["select"] != "done"
    assert pipeline.select(cfg)["mixture"]["budget_examples"] == 3 * cfg.finetune.batch_size != budget
    cfg.select.method = "best"
    pipeline.select(cfg)
    assert not (cfg.run_dir / "mixture.yaml").exists()
