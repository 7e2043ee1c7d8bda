"""The results table (benchmarks/results.py, benchmarks/verdicts.py): t-intervals, Holm–
Bonferroni, the claims' verdicts, the raw results and the markdown rebuilt from them alone."""

import glob
import json
import math
import os
import random
import sys

import pytest

from benchmarks import results, verdicts
from binax.errors import ConfigError
from configs import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_t_interval_is_the_students_t_half_width():
    mean, half = verdicts.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # t(0.975, 4 dof) = 2.776445 (tables); sd = sqrt(2.5), n = 5.
    assert mean == 3.0
    assert half == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert math.isnan(verdicts.t_interval([88.0])[1])


def test_holm_adjusts_as_the_written_out_example():
    # Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> running max 0.06.
    adjusted = verdicts.holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert verdicts.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = verdicts.holm([0.01, float("nan"), 0.02])  # NaN (no test) is outside the family: m = 2
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def _holm_step_down(pvalues, alpha):
    """Holm (1979) as written: sort ascending; reject H(k) while p(k) <= alpha / (m - k + 1)
    (k = 1..m), stop at the first that is not rejected."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected = set()
    for k, i in enumerate(order, start=1):
        if pvalues[i] >= alpha / (len(pvalues) - k + 1):
            break
        rejected.add(i)
    return rejected


def test_holm_rejects_what_the_step_down_procedure_rejects():
    rng = random.Random(0)
    for _ in range(300):
        p = [rng.choice([rng.random(), rng.random() * 0.05, rng.random() * 0.005]) for _ in range(rng.randint(1, 9))]
        alpha = rng.choice([0.01, 0.05, 0.1])
        adjusted = verdicts.holm(p)
        assert {i for i, a in enumerate(adjusted) if a < alpha} == _holm_step_down(p, alpha)


def _claim_values(**overrides):
    """Per-seed test accuracies (%) for every row a claim names: equal noise everywhere."""
    noise = [0.0, 0.3, -0.3, 0.2, -0.2]
    refs = {ref for c in verdicts.CLAIMS for link in c.links for ref in link}
    values = {ref: [88.0 + n for n in noise] for ref in refs}
    values.update(overrides)
    return values


def test_holm_changes_a_verdict_that_the_raw_p_would_pass():
    noise = [0.0, 0.3, -0.3, 0.2, -0.2]
    values = _claim_values(**{"method=irnet": [88.45 + n for n in noise]})
    raw = verdicts.welch(values["method=irnet"], values["method=xnor"])[1]
    assert raw < verdicts.ALPHA  # significant on its own...
    irnet = verdicts.evaluate_claims(values)[0]
    assert irnet["claim"].text == "IR-Net > XNOR-Net"
    link = irnet["links"][0]
    family = sum(len(c.links) for c in verdicts.CLAIMS)
    # ... but IR-Net > XNOR-Net and IR-Net > BNN (XNOR-Net's and BNN's values are equal) share the
    # family's smallest p: the first is multiplied by m, the second by m - 1, then the running maximum.
    assert link["p_adjusted"] == pytest.approx(min(1.0, family * raw), rel=1e-9)
    assert link["p_adjusted"] >= verdicts.ALPHA and irnet["verdict"] == "not resolved"
    strong = verdicts.evaluate_claims(_claim_values(**{"method=irnet": [90.0 + n for n in noise]}))[0]
    assert strong["verdict"] == "reproduced"
    reverse = verdicts.evaluate_claims(_claim_values(**{"method=irnet": [86.0 + n for n in noise]}))[0]
    assert reverse["verdict"] == "not reproduced"


def test_a_claim_with_several_links_needs_all_of_them():
    assert verdicts.claim_verdict(["reproduced", "reproduced"]) == "reproduced"
    assert verdicts.claim_verdict(["reproduced", "not resolved"]) == "not resolved"
    assert verdicts.claim_verdict(["not resolved", "not reproduced"]) == "not reproduced"


def test_verdict_lines_cite_each_claims_paper_and_state_the_rule_once():
    values = _claim_values()
    del values["method=sb"]
    text = "\n".join(verdicts.verdict_lines(values, results.LABELS))
    for claim in verdicts.CLAIMS:
        assert f"**{claim.text}:" in text and claim.source in text
    assert text.count("Holm–Bonferroni: with the m p-values") == 1
    family = sum(len(c.links) for c in verdicts.CLAIMS) - 2  # the two SB tests have no row
    assert f"The {family} tests of this table are one family" in text
    assert "**Self-Binarizing > BNN at the same cost: not resolved (rows missing).**" in text
    assert "Holm-adjusted p = " in text and "nan" not in text


def _table(seeds=2):
    """A raw table as results.py writes it: every row, ``seeds`` seeds, the recipes' extras."""
    runs = []
    for i, (_, spec) in enumerate(results.SWEEP):
        for seed in range(seeds):
            acc = 0.88 + 0.001 * i + 0.002 * seed
            run = dict(spec=spec, seed=seed, epochs=5, binary_ops=524288, packed_bytes=1716224,
                       float32_bytes=3747840, resumed=seed == 1, machine="x86_64, 2 CPU cores, CPU only",
                       date="2026-12-03", validation_accuracy=acc + 0.004, test_accuracy=acc, train_time_s=60.0 + seed,
                       wall_time_s=70.0)
            if spec == "method=sb":
                run.update(agreement=1.0, tanh_test_accuracy=acc, tanh_validation_accuracy=acc + 0.004)
            if spec == "method=binaryduo":
                run.update(coupled_test_accuracy=acc - 0.001, coupled_validation_accuracy=acc, decoupled_test_accuracy=acc - 0.001,
                           decoupled_validation_accuracy=acc, decoupling_max_logit_diff=4e-6, decoupling_differing_fraction=0.0)
            runs.append(run)
    return dict(arch="mlp", epochs=5, seeds=seeds, holdout=10000, runs=runs)


def test_the_block_shows_validation_and_test_deviations_and_the_deployment_check():
    block = results.render_block(_table())
    assert "| method | validation accuracy (%) | test accuracy (%) |" in block
    assert "| BNN (ste_sign, clip) | 88.60 ± " in block  # validation: mean of 0.881 + 0.004 and 0.883 + 0.004
    assert "no distillation from a float teacher" in block and "| Full precision |" in block
    assert "| 61 s |" not in block and "| 60 s |" in block  # the resumed seed 1 is out of the train time
    assert "deployment check (of binax's folding, not a claim of the paper)" in block
    assert "duo_binary for BinaryDuo's total epochs" in block and "fine-tuned 89.30% (validation 89.70%)" in block
    assert "Machine: x86_64, 2 CPU cores, CPU only; 2026-12-03; total wall time of this table's runs 33 min." in block
    # The commits that trained the runs, and how many runs predate the field.
    table = _table()
    for run in table["runs"][:3]:
        run["code"] = "eab404fba6fa"
    assert ("2026-12-03; code: commit eab404fba6fa (3 of 28 runs recorded one); total wall"
            in results.render_block(table))
    for run in table["runs"]:
        run["code"] = "eab404fba6fa"
    assert "2026-12-03; code: commit eab404fba6fa; total wall" in results.render_block(table)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_the_committed_tables_rebuild_byte_for_byte_from_their_raw_results(arch):
    path = os.path.join(ROOT, "docs", "results", f"{arch}.json")
    if not os.path.exists(path):
        pytest.skip(f"docs/results/{arch}.json is not committed: the {arch} table has not been run under the "
                    "validation protocol yet")
    with open(path) as f:
        table = json.load(f)
    with open(os.path.join(ROOT, "docs", "results.md")) as f:
        markdown = f.read()
    assert results.generated_block(markdown, arch) == results.render_block(table)


def test_every_committed_raw_table_is_checked():
    found = {os.path.basename(p)[: -len(".json")] for p in glob.glob(os.path.join(ROOT, "docs", "results", "*.json"))}
    assert found <= {"mlp", "cnn"}, f"raw results {sorted(found)} without a byte-for-byte test"


def test_table_only_rebuilds_the_markdown_from_the_raw_json_alone(tmp_path, monkeypatch):
    table = _table()
    raw, out = tmp_path / "mlp.json", tmp_path / "results.md"
    results.write_raw(str(raw), table)
    out.write_text("# Results\n\nintro\n\n<!-- results:mlp -->\nold\n<!-- /results:mlp -->\n\nreading\n")
    monkeypatch.setattr(sys, "argv", ["results.py", "--table-only", "--raw", str(raw), "--output", str(out)])
    results.main()
    text = out.read_text()
    assert text.startswith("# Results\n\nintro\n\n<!-- results:mlp -->\n## Fashion-MNIST") and text.endswith("\n\nreading\n")
    assert results.generated_block(text, "mlp") == results.render_block(json.loads(raw.read_text()))
    monkeypatch.setattr(sys, "argv", ["results.py", "--table-only", "--raw", str(tmp_path / "none.json")])
    with pytest.raises(SystemExit):
        results.main()


def test_raw_runs_are_written_in_table_order(tmp_path):
    table = _table(seeds=2)
    table["runs"].reverse()
    path = tmp_path / "results" / "mlp.json"  # a folder that does not exist yet, as on a fresh clone
    results.write_raw(str(path), table)
    runs = json.loads(path.read_text())["runs"]
    assert [(r["spec"], r["seed"]) for r in runs] == [(spec, s) for _, spec in results.SWEEP for s in (0, 1)]


def test_a_record_keeps_the_figures_and_marks_resumed_runs():
    summary = {"test_accuracy": 0.88, "validation_accuracy": 0.89, "train_time_s": 40.0, "resumed_from_step": 800,
               "step": 1950}
    run = results.record("method=bnn", 3, summary, (10.0, 20.0, 30), 5, "here", "2026-12-03")
    assert run == dict(spec="method=bnn", seed=3, epochs=5, binary_ops=30, packed_bytes=10, float32_bytes=20,
                       resumed=True, machine="here", date="2026-12-03", test_accuracy=0.88,
                       validation_accuracy=0.89, train_time_s=40.0)
    assert results.record("method=bnn", 3, summary, (10.0, 20.0, 30), 5, "here", "2026-12-03", "abc123")["code"] == "abc123"


def test_a_run_records_the_commit_that_trained_it(tmp_path):
    import subprocess

    assert results.code_version(str(tmp_path)) == "unknown"  # not a git checkout
    head = subprocess.run(["git", "-C", results.ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert results.code_version().removesuffix("+changes") == head
    repo = tmp_path / "repo"
    (repo / "binax").mkdir(parents=True)
    (repo / "binax" / "m.py").write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "m"]):
        subprocess.run(git + args, check=True)
    clean = results.code_version(str(repo))
    (repo / "binax" / "m.py").write_text("x = 2\n")  # an uncommitted change to the library
    assert results.code_version(str(repo)) == clean + "+changes"


def test_duo_binary_can_train_for_binaryduos_total_epochs():
    matched = recipe.get_config("method=duo_binary,epochs_match=binaryduo")
    assert matched.num_epochs == 7 == results.total_epochs(recipe.get_config("method=binaryduo"))
    assert recipe.get_config("method=duo_binary,epochs_match=binaryduo,arch=cnn,epochs=2").num_epochs == 3
    for bad in ("method=duo_binary,epochs_match=sb", "method=binaryduo,epochs_match=binaryduo"):
        with pytest.raises(ConfigError, match="epochs_match="):
            recipe.get_config(bad)


def test_a_recipe_summary_reads_resume_info_from_its_stages(tmp_path):
    (tmp_path / "coupled").mkdir()
    (tmp_path / "decoupled").mkdir()
    (tmp_path / "recipe.json").write_text(json.dumps({"test_accuracy": 0.9}))
    (tmp_path / "coupled" / "final.json").write_text(json.dumps({"resumed_from_step": None}))
    (tmp_path / "decoupled" / "final.json").write_text(json.dumps({"resumed_from_step": 120}))
    assert results._finished(str(tmp_path))["resumed_from_step"] == 120


def test_a_finished_run_without_a_validation_split_is_not_reused(tmp_path):
    workdir = tmp_path / "mlp" / "bnn" / "seed0"
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"recipe": {"procedure": "train"}}))
    (workdir / "final.json").write_text(json.dumps({"test_accuracy": 0.88, "resumed_from_step": None}))
    with pytest.raises(SystemExit, match="without a validation split"):
        results.run_one("mlp", "method=bnn", 0, 5, str(tmp_path), quick=False)
    (workdir / "final.json").write_text(json.dumps({"test_accuracy": 0.88, "validation_accuracy": 0.89}))
    assert results.run_one("mlp", "method=bnn", 0, 5, str(tmp_path), quick=False)["validation_accuracy"] == 0.89


def test_processes_sharing_a_table_lose_no_run(tmp_path):
    path = str(tmp_path / "mlp.json")
    full = _table(seeds=1)
    other = dict(full, runs=full["runs"][:3])  # what another process recorded
    results.write_raw(path, other)
    mine = dict(full, runs=full["runs"][3:5])
    merged = results.merge_recorded(path, mine)
    assert {(r["spec"], r["seed"]) for r in merged["runs"]} == {(r["spec"], r["seed"]) for r in full["runs"][:5]}
    # A table of another protocol (other epochs) on disk is not mixed in.
    assert results.merge_recorded(path, dict(mine, epochs=2))["runs"] == mine["runs"]


def test_the_sb_schedule_is_chosen_on_validation_not_test():
    from benchmarks import sb_schedule, selection

    runs = {"a": [{"validation_accuracy": 0.88, "test_accuracy": 0.90}] * 2,
            "b": [{"validation_accuracy": 0.89, "test_accuracy": 0.85}, {"validation_accuracy": 0.885, "test_accuracy": 0.85}]}
    assert selection.choose(runs) == "b"
    assert selection.summary_lines(runs)[-1] == {"chosen": "b"}
    config = sb_schedule.variant_config("relative_1_to_30_until_90", "mlp", 1, 5)
    assert config.data.validation_holdout == recipe.HOLDOUT and config.seed == 1
    assert config.model.kernel_quantizer_kwargs.nu_start == 30.0 and config.model.kernel_quantizer_kwargs.relative
    # The recipe's schedule per architecture is the variant validation chose for it.
    for arch, chosen in (("mlp", "relative_1_to_3_until_90"), ("cnn", "relative_1_to_10_until_90")):
        model = recipe.get_config(f"method=sb,arch={arch}").model
        assert dict(model.input_quantizer_kwargs) == sb_schedule.VARIANTS[chosen][0]
        assert dict(model.kernel_quantizer_kwargs) == {**sb_schedule.VARIANTS[chosen][0], "relative": True}


def test_the_binaryduo_finetuning_factor_study_reads_the_tables_coupled_runs_only_when_finished(tmp_path):
    from benchmarks import duo_finetune_lr

    config = duo_finetune_lr.base_config("cnn", 1, 2)
    assert (config.recipe.method, config.seed, config.num_epochs) == ("binaryduo", 1, 2)
    assert config.data.validation_holdout == recipe.HOLDOUT
    table = tmp_path / "table" / "cnn" / "binaryduo" / "seed1" / "coupled"
    table.mkdir(parents=True)
    own = os.path.join(tmp_path / "study", "cnn", "seed1", "coupled")
    # An unfinished (e.g. interrupted) table run is not used: the study trains its own.
    assert duo_finetune_lr.coupled_dir(str(tmp_path / "study"), "cnn", 1, str(tmp_path / "table")) == own
    (table / "final.json").write_text("{}")
    assert duo_finetune_lr.coupled_dir(str(tmp_path / "study"), "cnn", 1, str(tmp_path / "table")) == str(table)
    assert duo_finetune_lr.coupled_dir(str(tmp_path / "study"), "cnn", 1, None) == own


@pytest.mark.parametrize("module", ["benchmarks.results", "benchmarks.sb_schedule", "benchmarks.duo_finetune_lr"])
def test_a_signal_stops_a_table_with_one_line_and_the_shells_status(module, tmp_path):
    import subprocess

    # The training loop raises StopRequested after its checkpoint; the benchmark must say
    # how to resume, not print a traceback, and exit 128 + signum like experiments.run.
    script = (
        "import runpy, sys\n"
        "import binax.recipes, binax.train\n"
        "def stop(*a, **k): raise binax.train.loop.StopRequested(15)\n"
        "binax.recipes.run = binax.train.train_and_evaluate = stop\n"
        f"sys.argv = ['{module}', '--arch', 'mlp', '--seeds', '{'1' if module.endswith('results') else '0'}', "
        f"'--root', {str(tmp_path)!r}]"
        + (f" + ['--methods', 'fp', '--raw', {str(tmp_path / 'r.json')!r}, '--output', {str(tmp_path / 'r.md')!r}]"
           if module.endswith("results") else "") + "\n"
        f"runpy.run_module('{module}', run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=results.ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 143, out.stderr[-2000:]
    assert "stopped by SIGTERM" in out.stderr and f"python -m {module} --arch mlp" in out.stderr
    assert "Traceback" not in out.stderr
