"""``structvit study ablation``: plan, resume, aggregation, tables and plot, reproducibility, errors."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from structvit import study as S
from structvit.nn import StructSA

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "configs" / "study" / "ablation.yaml"
PAPER = [ROOT / "configs" / "study" / "ablation_ssv2.yaml", ROOT / "configs" / "study" / "ablation_k400.yaml"]

TINY_STUDY = """
name: tiny
seeds: [0]
threads: 1
tasks:
  moving_digits:
    model: structvit_tiny_video
    input_shape: [3, 4, 32, 32]
    model_kwargs: {num_frames: 4, depths: [1, 1, 1, 1], embed_dims: [8, 16, 32, 64], head_dim: 8,
                   drop_path_rate: 0.1, struct_blocks: all, attention: structsa, num_patterns: 2}
    recipe: {lr: 2.0e-3, warmup_steps: 1, ema_decay: 0.9}
    data:
      class_path: structvit.data.VideoDataModule
      init_args: {dataset: moving_digits, num_frames: 4, batch_size: 4, num_workers: 0}
    steps: 3
    val_every: 2
    val_batches: 4
    variants:
      - {name: sa, label: SA, model_kwargs: {struct_blocks: [0, 0]}}
      - {name: structsa_d2, label: StructSA D=2, model_kwargs: {num_patterns: 2}}
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_STUDY)
    return p


# ------------------------------------------------------------------ plan
def test_default_plan_has_every_variant_seed_and_equal_budget():
    study = S.load_study(DEFAULT)
    runs = S.expand_plan(study)
    video = {r.variant for r in runs if r.task == "moving_digits"}
    image = {r.variant for r in runs if r.task == "digits"}
    assert {"sa", "convsa", "structsa_d2", "structsa_d4", "structsa_d8", "structsa_d4_w5",
            "structsa_d4_per_pattern"} == video
    assert video - image == {"structsa_d4_w5"}  # windows 3x3 only for images
    assert len(runs) == (len(video) + len(image)) * 3 and sorted({r.seed for r in runs}) == [0, 1, 2]
    for task in ("moving_digits", "digits"):  # equal budget: everything but the model's attention is shared
        specs = [r.spec for r in runs if r.task == task]
        for key in ("steps", "recipe", "data", "model", "input_shape", "val_every"):
            assert all(s[key] == specs[0][key] for s in specs), key
    by = {(r.task, r.variant): r for r in runs}
    assert S.variant_D(by["moving_digits", "sa"].spec["model_kwargs"]) == 0
    assert S.variant_D(by["moving_digits", "convsa"].spec["model_kwargs"]) == 1
    assert [S.variant_D(by["digits", f"structsa_d{d}"].spec["model_kwargs"]) for d in (2, 4, 8)] == [2, 4, 8]
    w5 = by["moving_digits", "structsa_d4_w5"].spec["model_kwargs"]
    assert w5["window"] == [5, 5, 5] and w5["embed_dims"] == [24, 48, 96, 192]  # variant merged over the task
    assert by["digits", "structsa_d4_per_pattern"].spec["model_kwargs"]["normalize"] == "per_pattern"


def test_plan_selection_and_steps_override():
    study = S.load_study(DEFAULT)
    runs = S.expand_plan(study, seeds=[3, 5], variants=["sa", "moving_digits/structsa_d8"], steps=7)
    assert [(r.task, r.variant, r.seed) for r in runs] == [  # order: seed (every variant at seed 3 first)
        ("moving_digits", "sa", 3), ("moving_digits", "structsa_d8", 3), ("digits", "sa", 3),
        ("moving_digits", "sa", 5), ("moving_digits", "structsa_d8", 5), ("digits", "sa", 5)]
    assert all(r.spec["steps"] == 7 for r in runs)
    only = S.expand_plan(study, tasks=["digits"], seeds=[0])
    assert {r.task for r in only} == {"digits"} and len(only) == 6
    # the spec hash changes with the budget and the seed (a resumed study never mixes budgets)
    a, b = S.expand_plan(study, variants=["digits/sa"], seeds=[0], steps=7)[0], runs[2]
    assert a.spec_hash != b.spec_hash and a.spec_hash != S.expand_plan(study, variants=["digits/sa"], seeds=[0],
                                                                         steps=8)[0].spec_hash


@pytest.mark.parametrize("kwargs, words", [
    (dict(variants=["structsa_d16"]), ["structsa_d16", "moving_digits/sa"]),
    (dict(variants=["digits/structsa_d4_w5"]), ["digits/structsa_d4_w5"]),
    (dict(tasks=["ssv2"]), ["ssv2", "moving_digits, digits"]),
    (dict(seeds=[0, 0]), ["distinct"]),
    (dict(seeds=[-1]), ["non-negative"]),
    (dict(seeds=[]), ["non-empty"]),
    (dict(steps=0), ["--steps"]),
])
def test_bad_choices_are_named(kwargs, words):
    with pytest.raises(S.StudyError) as err:
        S.expand_plan(S.load_study(DEFAULT), **kwargs)
    for w in words:
        assert w in str(err.value)


def test_bad_study_files_are_named(tmp_path):
    with pytest.raises(S.StudyError, match="nope.yaml.*not found"):
        S.load_study(tmp_path / "nope.yaml")
    p = tmp_path / "s.yaml"
    p.write_text(TINY_STUDY.replace("    val_every: 2\n", "    val_evry: 2\n"))
    with pytest.raises(S.StudyError, match="val_evry"):
        S.load_study(p)
    p.write_text(TINY_STUDY.replace("{name: structsa_d2,", "{name: sa,"))
    with pytest.raises(S.StudyError, match="duplicate variant names.*sa"):
        S.load_study(p)
    p.write_text(TINY_STUDY.replace("    steps: 3\n", ""))
    with pytest.raises(S.StudyError, match="needs 'steps'"):
        S.load_study(p)


def test_command_line_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        S.main(["ablation", "--variants", "structsa_d3", "--out", str(tmp_path)])
    assert e.value.code == 2 and "structsa_d3" in capsys.readouterr().err
    assert S.main(["ablations"]) == 2 and "unknown study 'ablations'" in capsys.readouterr().err
    from structvit.cli import main as cli_main

    assert cli_main(["study", "ablation", "--plan", "--variants", "digits/sa", "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert "digits/sa" in out and "1 runs" in out and "M params" in out


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_scale_configs_build(path):
    study = S.load_study(path)
    runs = S.expand_plan(study, seeds=[0])
    assert len(runs) == 7
    for r in runs:
        assert r.spec["input_shape"] == [3, 16, 224, 224] and r.spec["model"] == "structvit_s_4_1_video"
        m = S.build_model(r.spec, "meta")
        assert m.num_frames == 16 and m.embed_dims[0] == 64  # StructViT-S, 16 frames
        kw = r.spec["model_kwargs"]
        assert m.struct_blocks == ((0, 0) if r.variant == "sa" else (8, 3))  # StructSA in every attention block
        assert m.window == tuple(kw.get("window", (3, 3, 3)))
        assert m.attention == kw["attention"]
        layers = [x for x in m.modules() if isinstance(x, StructSA)]
        assert all(x.patterns == "channel" and x.kv_stride == (1, 1, 1) for x in layers)
        assert all(x.num_patterns == S.variant_D(kw) for x in layers)
    by = {r.variant: r for r in runs}
    cost = {v: S.model_cost(by[v].spec) for v in ("sa", "structsa_d4", "structsa_d8")}
    assert 20e6 < cost["sa"]["params"] < cost["structsa_d4"]["params"] < cost["structsa_d8"]["params"] < 24e6
    # per view, the paper's K400 GFLOPs (multiply-adds) / 4 views: UniFormer-S 167, S-4-1 327, S-8-1 541
    for variant, published in (("sa", 167), ("structsa_d4", 327), ("structsa_d8", 541)):
        assert cost[variant]["gmacs"] == pytest.approx(published / 4, rel=0.02), variant
        assert cost[variant]["gflops"] == pytest.approx(2 * cost[variant]["gmacs"])


# ------------------------------------------------------------------ aggregation, tables, plot
def _fake_result(task, variant, seed, acc, D=4, secs=10.0):
    return {"task": task, "variant": variant, "label": variant.upper(), "seed": seed, "D": D, "steps": 5,
            "acc1": acc, "ema_acc1": acc + 0.01, "val_loss": 1.0, "train_seconds": secs, "params": 1000,
            "gflops": 0.5, "threads": 1, "spec_hash": "x",
            "spec": {"model_kwargs": {"num_patterns": D}}}


def test_aggregate_mean_and_sample_std():
    rows = [_fake_result("t", "a", s, acc, secs=s + 1.0) for s, acc in enumerate([0.5, 0.6, 0.7])]
    rows += [_fake_result("t", "b", 0, 0.9, D=0)]
    summ = {s["variant"]: s for s in S.aggregate(rows, order=[("t", "b"), ("t", "a")])}
    assert list(summ) == ["b", "a"]  # the study file's order
    a = summ["a"]
    assert a["seeds"] == 3 and math.isclose(a["acc1_mean"], 0.6) and math.isclose(a["acc1_std"], 0.1)
    assert math.isclose(a["ema_acc1_mean"], 0.61) and math.isclose(a["train_seconds"], 2.0)
    assert summ["b"]["acc1_std"] == 0.0 and summ["b"]["seed_list"] == "0"


def test_tables_and_plot_from_finished_runs(tmp_path):
    for variant, D, accs in (("sa", 0, [0.5, 0.7]), ("convsa", 1, [0.6, 0.6]), ("structsa_d4", 4, [0.8, 0.9])):
        for seed, acc in enumerate(accs):
            folder = tmp_path / "vid" / variant / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / S.RESULT).write_text(json.dumps(_fake_result("vid", variant, seed, acc, D=D)))
            with open(folder / "metrics.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["epoch", "step", "train/loss", "val/acc1"])
                for step in (1, 3, 5):
                    w.writerow([0, step, 1.0, ""])
                    w.writerow([0, step, "", acc * step / 5])
    res = S.report(tmp_path, command="structvit study ablation --x")
    assert [s["variant"] for s in res["summary"]] == ["convsa", "sa", "structsa_d4"]  # no plan: sorted
    md = res["md"].read_text()
    assert "`structvit study ablation --x`" in md and "| 60.0 ± 14.1 |" in md and "| 85.0 ± 7.1 |" in md
    with open(res["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["variant"] for r in rows} == {"sa", "convsa", "structsa_d4"}
    assert S.learning_curve(tmp_path / "vid" / "sa" / "seed1") == ([2, 4, 6], pytest.approx([0.14, 0.42, 0.7]))
    assert res["png"].is_file() and res["png"].stat().st_size > 10_000
    assert res["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(S.StudyError, match="no finished runs"):
        S.report(tmp_path / "empty")


# ------------------------------------------------------------------ resume
def test_resume_skips_finished_runs_and_retrains_unfinished(tmp_path):
    runs = S.expand_plan(S.load_study(_tiny(tmp_path)), seeds=[0, 1])
    calls = []

    def fake_train(run, folder, threads=1):
        calls.append(run.key)
        folder.mkdir(parents=True, exist_ok=True)
        res = _fake_result(run.task, run.variant, run.seed, 0.5)
        res["spec_hash"] = run.spec_hash
        (folder / S.RESULT).write_text(json.dumps(res))
        return res

    out = tmp_path / "out"
    S.run_study(runs[:2], out, trainer_fn=fake_train, log=lambda m: None)  # "killed" after two runs
    (runs[2].folder(out)).mkdir(parents=True)  # the third had started: a folder without result.json
    assert calls == [r.key for r in runs[:2]]
    with pytest.raises(S.StudyError, match="--resume"):
        S.run_study(runs, out, trainer_fn=fake_train, log=lambda m: None)
    calls.clear()
    log = []
    results = S.run_study(runs, out, resume=True, trainer_fn=fake_train, log=log.append)
    assert calls == [r.key for r in runs[2:]] and len(results) == 4
    assert sum("skipped" in m for m in log) == 2
    # a finished run with another budget is not silently reused
    other = S.expand_plan(S.load_study(_tiny(tmp_path)), seeds=[0], steps=9)
    with pytest.raises(S.StudyError, match="other settings"):
        S.run_study(other, out, resume=True, trainer_fn=fake_train, log=lambda m: None)


# ------------------------------------------------------------------ real runs
def test_same_seed_same_accuracy_and_weights(tmp_path):
    from structvit.engine.weights import load_weights

    run = S.expand_plan(S.load_study(_tiny(tmp_path)), variants=["structsa_d2"], seeds=[0])[0]
    a = S.train_run(run, tmp_path / "a")
    b = S.train_run(run, tmp_path / "b")
    assert a["steps"] == b["steps"] == 3
    assert a["acc1"] == b["acc1"] and a["ema_acc1"] == b["ema_acc1"] and a["val_loss"] == b["val_loss"]
    wa, _ = load_weights(str(tmp_path / "a" / "final.safetensors"))
    wb, _ = load_weights(str(tmp_path / "b" / "final.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    other = S.Run(run.task, run.variant, run.label, 1, run.spec)
    c = S.train_run(other, tmp_path / "c")
    wc, _ = load_weights(str(tmp_path / "c" / "final.safetensors"))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # the seed matters
    assert c["val_loss"] != a["val_loss"]


def test_one_command_end_to_end_and_resume(tmp_path, capsys):
    cfg, out = _tiny(tmp_path), tmp_path / "out"
    assert S.main(["ablation", "--config", str(cfg), "--out", str(out), "--steps", "2"]) == 0
    text = capsys.readouterr().out
    for f in ("results.csv", "results.md", "ablation.png"):
        assert (out / f).is_file(), f
    assert (out / "moving_digits" / "sa" / "seed0" / "metrics.csv").is_file()
    md = (out / "results.md").read_text()
    assert "| SA | 0 |" in md and "| StructSA D=2 | 2 |" in md and "### moving_digits" in md
    assert "top-1" in text
    res = json.loads((out / "moving_digits" / "structsa_d2" / "seed0" / S.RESULT).read_text())
    assert res["steps"] == 2 and 0.0 <= res["acc1"] <= 1.0 and res["params"] > 0 and res["gflops"] > 0
    docs = tmp_path / "docs"  # --write: the finished runs published with their page
    assert S.main(["ablation", "--config", str(cfg), "--out", str(out), "--steps", "2", "--resume", "--write",
                   "--results-dir", str(docs)]) == 0
    assert capsys.readouterr().out.count("(skipped)") == 2
    published = S.read_results_csv(docs / "study_ablation_results.csv")
    assert [(r["variant"], r["acc1"]) for r in published] == [
        (r["variant"], r["acc1"]) for r in S.collect(out)]
    page = (docs / "study_ablation.md").read_text()
    assert "| SA | 0 |" in page and (docs / "study_ablation.png").is_file()
    assert f"--report --config {cfg} --results-dir {docs}`" in page


# ------------------------------------------------------------------ the paper's ablations (study paper)
PAPER_STUDY = ROOT / "configs" / "study" / "paper.yaml"


def test_paper_plan_tables_variants_and_equal_budget():
    from structvit.models.structvit_deit import StructDeiT
    from structvit.nn.attention import SelfAttention

    study = S.load_study(PAPER_STUDY)
    runs = S.expand_plan(study)
    names = ["sa", "convsa", "d2", "d4", "d8", "m1", "m5", "m7", "elem", "dot", "chcorr"]
    assert len(runs) == 2 * len(names) * 5 and sorted({r.seed for r in runs}) == [0, 1, 2, 3, 4]
    assert {r.seed for r in runs[:2 * len(names)]} == {0}  # seed-major: every variant at seed 0 first
    for task in ("digit_relations", "moving_digits"):
        specs = {r.variant: r.spec for r in runs if r.task == task and r.seed == 0}
        assert list(specs) == names
        for key in ("steps", "recipe", "data", "model", "input_shape", "val_every", "trainer"):
            assert all(s[key] == specs["sa"][key] for s in specs.values()), (task, key)
        rank = len(specs["sa"]["input_shape"]) - 1
        for name, spec in specs.items():
            m = S.build_model(spec, "meta")
            assert isinstance(m, StructDeiT) and m.depth == 4 and m.embed_dim == 64
            attn = [b.attn for b in m.blocks]
            if name == "sa":
                assert all(isinstance(a, SelfAttention) and not isinstance(a, StructSA) for a in attn)
                continue
            assert all(isinstance(a, StructSA) for a in attn)  # every attention replaced
            a = attn[0]
            want_d = {"convsa": 1, "d2": 2, "d8": 8}.get(name, 4)
            want_m = {"m1": 1, "m5": 5, "m7": 7}.get(name, 3)
            assert S.variant_D(spec["model_kwargs"]) == want_d == a.num_patterns
            assert a.window == (want_m,) * rank
            assert a.window_v == ((1,) * rank if name == "elem" else (want_m,) * rank)
            assert a.patterns == ("head" if name == "dot" else "channel")
            tied = name == "chcorr"
            assert hasattr(a, "parametrizations") == tied and spec.get("value_patterns") == ("head" if tied else None)
    tables = study["tables"]
    assert list(tables) == ["1a", "1b", "1c", "6a"]
    assert [r["variant"] for r in tables["1a"]["rows"]] == ["sa", "convsa", "d2", "d4", "d8"]
    assert [r["variant"] for r in tables["1b"]["rows"]] == ["sa", "m1", "d4", "m5", "m7"]
    assert [r["variant"] for r in tables["1c"]["rows"]] == ["elem", "d4"]
    assert [(r["variant"], r["paper"]) for r in tables["6a"]["rows"]] == [
        ("dot", {"IN-1K": 80.7, "SSv1": 48.7}), ("chcorr", {"IN-1K": 81.0, "SSv1": 49.9}),
        ("d4", {"IN-1K": 81.1, "SSv1": 50.4})]
    assert study["baselines"] == ["sa", "convsa"]
    quick = S.expand_plan(S.quick_study(study))
    assert len(quick) == 2 * len(names) and {r.spec["steps"] for r in quick} == {20}
    assert {r.seed for r in quick} == {0}


def test_tie_value_patterns_shares_aggregators_over_channels():
    torch.manual_seed(0)
    layer = StructSA(16, 2, window=(3, 3), num_patterns=3, patterns="channel")
    assert S.tie_value_patterns(torch.nn.Sequential(layer)) == 1
    u_v = layer.u_v
    assert u_v.shape == (2, 8, 3, 3, 3)  # the op's channel-wise layout ...
    assert torch.equal(u_v, u_v[:, :1].expand_as(u_v))  # ... the same aggregator on every channel of a head
    assert layer.parametrizations.u_v.original.shape == (2, 1, 3, 3, 3)  # parameters: per head, as dot-product
    x = torch.randn(2, 16, 16)
    y = layer(x, (4, 4))
    ref = StructSA(16, 2, window=(3, 3), num_patterns=3, patterns="channel")
    with torch.no_grad():
        for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "u_k"):
            ref.get_parameter(name).copy_(layer.get_parameter(name))
        ref.u_v.copy_(u_v)
    assert torch.allclose(y, ref(x, (4, 4)), atol=1e-6)  # the same function as untied weights
    y.square().sum().backward()
    g = layer.parametrizations.u_v.original.grad
    assert g is not None and g.shape == (2, 1, 3, 3, 3) and g.abs().sum() > 0
    with pytest.raises(S.StudyError, match="channel-wise"):
        S.tie_value_patterns(torch.nn.Sequential(StructSA(16, 2, patterns="head")))


def test_welch_test():
    a, b = [0.50, 0.55, 0.60, 0.52], [0.40, 0.45, 0.41]
    t, p = S.welch(a, b)
    (ma, sa), (mb, sb) = S.mean_std(a), S.mean_std(b)
    va, vb = sa ** 2 / len(a), sb ** 2 / len(b)
    assert t == pytest.approx((ma - mb) / math.sqrt(va + vb))
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    from scipy import stats

    assert p == pytest.approx(2 * stats.t.sf(abs(t), dof)) and 0 < p < 0.05
    assert math.isnan(S.welch([0.5], b)[1]) and math.isnan(S.welch([0.5, 0.5], [0.4, 0.4])[1])


PAPER_TINY = """
name: tinypaper
seeds: [0, 1]
threads: 1
jobs: 1
order: seed
baselines: [sa, convsa]
quick: {seeds: [0], steps: 1, val_every: 1, val_batches: 1}
tables:
  1a:
    title: D
    rows:
      - {variant: sa, label: "D = 0 (SA)"}
      - {variant: convsa, label: "D = 1"}
      - {variant: d2, label: "D = 2", paper: {IN-1K: 80.5}}
  6a:
    title: correlation
    rows:
      - {variant: chcorr, label: "channel-wise correlation", paper: {IN-1K: 81.0}, note: "tied"}
tasks:
  rel:
    paper_column: IN-1K
    model: structvit_deit_tiny
    input_shape: [3, 32, 32]
    model_kwargs: {embed_dim: 8, num_heads: 2, depth: 1, patch_size: 8, num_patterns: 2}
    recipe: {lr: 2.0e-3, warmup_steps: 1, ema_decay: 0.9}
    data:
      class_path: structvit.data.builtin.DigitRelationsDataModule
      init_args: {batch_size: 8, options: {samples_per_image: 1}}
    steps: 2
    val_every: 2
    val_batches: 2
    variants:
      - {name: sa, model_kwargs: {attention: sa}}
      - {name: convsa, model_kwargs: {attention: convsa}}
      - {name: d2, model_kwargs: {num_patterns: 2}}
      - {name: chcorr, value_patterns: head}
"""


def _paper_tiny(tmp_path) -> Path:
    p = tmp_path / "paper_tiny.yaml"
    p.write_text(PAPER_TINY)
    return p


def test_paper_study_file_errors_are_named(tmp_path):
    p = tmp_path / "s.yaml"
    for old, new, words in (
            ("value_patterns: head}", "value_patterns: channel}", "value_patterns must be one of"),
            ("baselines: [sa, convsa]", "baselines: [sa, conv]", "baseline 'conv'"),
            ("{variant: d2,", "{variant: d3,", "every row needs a 'variant'"),
            ("order: seed", "order: random", "order must be"),
            ("jobs: 1", "jobs: 0", "jobs must be"),
            ("quick: {seeds: [0],", "quick: {seed: [0],", "quick must be")):
        assert old in PAPER_TINY
        p.write_text(PAPER_TINY.replace(old, new))
        with pytest.raises(S.StudyError, match=words):
            S.load_study(p)
    p.write_text(PAPER_TINY.replace("quick: {seeds: [0], steps: 1, val_every: 1, val_batches: 1}\n", ""))
    with pytest.raises(S.StudyError, match="no 'quick' block"):
        S.quick_study(S.load_study(p))


def test_paper_tables_welch_and_plot_from_finished_runs(tmp_path):
    study = S.load_study(_paper_tiny(tmp_path))
    accs = {"sa": [0.50, 0.52, 0.48], "convsa": [0.60, 0.62, 0.61], "d2": [0.70, 0.75, 0.72]}  # chcorr: not run
    for variant, values in accs.items():
        for seed, acc in enumerate(values):
            folder = tmp_path / "rel" / variant / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / S.RESULT).write_text(json.dumps(_fake_result("rel", variant, seed, acc)))
    runs = S.expand_plan(study, seeds=[0, 1, 2])
    res = S.report(tmp_path, runs, command="structvit study paper --x", study=study)
    by = {(e["table"], e["variant"]): e for e in res["paper"]}
    d2 = by["1a", "d2"]
    assert d2["seeds"] == 3 and d2["acc1_mean"] == pytest.approx(0.7233333) and d2["paper_top1"] == 80.5
    assert d2["delta_sa"] == pytest.approx(0.7233333 - 0.5) and d2["p_sa"] == pytest.approx(
        S.welch(accs["d2"], accs["sa"])[1])
    assert d2["delta_convsa"] == pytest.approx(0.7233333 - 0.61)
    assert math.isnan(by["1a", "sa"]["delta_sa"]) and by["6a", "chcorr"]["seeds"] == 0
    md = res["paper_md"].read_text()
    assert "`structvit study paper --x`" in md and "### Table 1a: D" in md and "### Table 6a: correlation" in md
    assert f"| D = 2 | 80.5 | 72.3 ± 2.5 (n=3) | +22.3, p={S.welch(accs['d2'], accs['sa'])[1]:.2g} | +11.3, p=" in md
    assert "| channel-wise correlation | 81.0 | not run |" in md and "tied" in md
    with open(res["paper_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["variant"] for r in rows} == {"sa", "convsa", "d2", "chcorr"}
    assert res["png"].name == "paper.png" and res["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_results_page_written_from_the_csv_alone(tmp_path, capsys):
    """``--write`` publishes runs as a CSV and a page made from it; ``--report`` rewrites the same
    page from the CSV with no run folders; the page's numbers are the CSV's."""
    config = _paper_tiny(tmp_path)
    study = S.load_study(config)
    accs = {"sa": [0.50, 0.52, 0.48], "d2": [0.70, 0.75, 0.72]}
    rows = [_fake_result("rel", v, seed, acc) for v, values in accs.items() for seed, acc in enumerate(values)]
    docs = tmp_path / "docs"
    command = f"structvit study paper --report --config {config} --results-dir {docs} --results-name study_tiny"
    written = S.publish(rows, study, docs, "study_tiny", command=command)
    assert written["results_csv"] == docs / "study_tiny_results.csv"
    back = S.read_results_csv(written["results_csv"])  # sorted by task, variant, seed
    assert [(r["variant"], r["seed"], r["acc1"]) for r in back] == sorted((r["variant"], r["seed"], r["acc1"]) for r in rows)
    page = written["md"].read_text()
    delta = f"+22.3, p={S.welch(accs['d2'], accs['sa'])[1]:.2g}"
    assert f"Regenerate this page: `{command}`" in page and f"| 72.3 ± 2.5 (n=3) | {delta} |" in page
    assert "| channel-wise correlation | 81.0 | not run |" in page and "![tinypaper](study_tiny.png)" in page
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written["summary_csv"].is_file()
    written["md"].unlink()
    assert S.main(["paper", "--config", str(config), "--report", "--results-dir", str(docs),
                   "--results-name", "study_tiny"]) == 0
    regenerated = (docs / "study_tiny.md").read_text()
    assert regenerated == page
    assert "wrote" in capsys.readouterr().out
    # a re-run of one variant, shown with the base study's other rows
    rerun = [_fake_result("rel", "d2", seed, acc) for seed, acc in enumerate([0.80, 0.82])]
    S.write_results_csv(rerun, docs / "study_rerun_results.csv")
    assert S.main(["paper", "--config", str(config), "--report", "--results-dir", str(docs),
                   "--results-name", "study_rerun", "--base-results", "study_tiny"]) == 0
    page = (docs / "study_rerun.md").read_text()
    assert "come from `study_tiny_results.csv`: rel/sa." in page and "--base-results study_tiny`" in page
    assert f"| 81.0 ± 1.4 (n=2) | +31.0, p={S.welch([0.80, 0.82], accs['sa'])[1]:.2g} |" in page
    # a results file that is not one, or rows of a variant the study file lacks, are named
    (docs / "bad_results.csv").write_text("task,variant\nrel,sa\n")
    with pytest.raises(S.StudyError, match="missing column"):
        S.regenerate(study, docs, "bad")
    with pytest.raises(S.StudyError, match="rel/m7 .* is not a variant"):
        S.write_results_page([_fake_result("rel", "m7", 0, 0.5)], study, docs, "x")
    with pytest.raises(S.StudyError, match="not found"):
        S.regenerate(study, docs, "absent")


def _fake_train_top(run, folder, threads=1):
    """A picklable stand-in for train_run (parallel jobs run it in other processes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    res = _fake_result(run.task, run.variant, run.seed, 0.5 + 0.01 * run.seed)
    res["spec_hash"] = run.spec_hash
    (folder / S.RESULT).write_text(json.dumps(res))
    return res


def test_parallel_jobs_write_every_run_and_resume(tmp_path):
    runs = S.expand_plan(S.load_study(_paper_tiny(tmp_path)))
    assert [r.seed for r in runs] == [0] * 4 + [1] * 4  # order: seed
    out = tmp_path / "out"
    _fake_train_top(runs[0], runs[0].folder(out))  # finished before
    log = []
    results = S.run_study(runs, out, resume=True, jobs=2, trainer_fn=_fake_train_top, log=log.append)
    assert [r["variant"] for r in results] == [r.variant for r in runs]  # plan order
    assert all((r.folder(out) / S.RESULT).is_file() for r in runs)
    assert sum("skipped" in m for m in log) == 1 and sum("training" in m for m in log) == 7
    with pytest.raises(S.StudyError, match="jobs"):
        S.run_study(runs, out, resume=True, jobs=0, trainer_fn=_fake_train_top)


def test_paper_tied_variant_trains_reproducibly(tmp_path):
    from structvit.engine.weights import load_weights

    study = S.load_study(_paper_tiny(tmp_path))
    run = S.expand_plan(study, variants=["chcorr"], seeds=[0])[0]
    a = S.train_run(run, tmp_path / "a")
    b = S.train_run(run, tmp_path / "b")
    assert a["steps"] == 2 and a["acc1"] == b["acc1"] and a["val_loss"] == b["val_loss"]
    wa, _ = load_weights(str(tmp_path / "a" / "final.safetensors"))
    wb, _ = load_weights(str(tmp_path / "b" / "final.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    tied = [k for k in wa if k.endswith("parametrizations.u_v.original")]
    assert tied and all(wa[k].shape[1] == 1 for k in tied)  # one aggregator per head, trained as such
    untied = S.expand_plan(study, variants=["d2"], seeds=[0])[0]
    assert a["params"] < S.model_cost(untied.spec)["params"]


def test_paper_quick_command_end_to_end(tmp_path, capsys):
    cfg, out = _paper_tiny(tmp_path), tmp_path / "q"
    assert S.main(["paper", "--config", str(cfg), "--out", str(out), "--quick"]) == 0
    text = capsys.readouterr().out
    for f in ("results.csv", "results.md", "paper_tables.md", "paper_summary.csv", "paper.png"):
        assert (out / f).is_file(), f
    assert "Table 1a" in text and "(n=1)" in text
    res = json.loads((out / "rel" / "chcorr" / "seed0" / S.RESULT).read_text())
    assert res["steps"] == 1 and res["spec"]["value_patterns"] == "head"
