import re

import numpy as np
import pandas as pd
import pytest

from asl_tune.alphabet import ASL_CLASSES
from asl_tune.analysis.compute import (
    DEFAULT_OBJECTIVES,
    finished_pair_rates,
    hypervolume,
    importance_problem,
    pair_rates,
    pair_summary,
    param_importance,
    pareto_front,
    parse_objectives,
    reference_point,
    summary,
)
from asl_tune.analysis.figures import SWEEP_FIGURES
from asl_tune.analysis.report import analyze
from asl_tune.errors import AslTuneError
from asl_tune.results import ResultsStore, trial_row, write_atomic

MAX2 = [("val_accuracy", "max"), ("infer_img_per_s", "max")]


def trials(*rows: tuple) -> pd.DataFrame:
    """A hand-made trials frame from (trial_id, status, val_accuracy, infer_img_per_s) tuples."""
    return pd.DataFrame(rows, columns=["trial_id", "status", "val_accuracy", "infer_img_per_s"])


def front_ids(df: pd.DataFrame, objectives=MAX2) -> set:
    return set(pareto_front(df, objectives)["trial_id"])


# --- the front ---------------------------------------------------------------------------------


def test_front_keeps_exactly_the_non_dominated_finished_trials():
    df = trials(
        ("a", "completed", 0.95, 800.0),
        ("b", "completed", 0.90, 1200.0),
        ("c", "completed", 0.85, 1000.0),  # dominated by b
        ("d", "stopped_early", 0.70, 1500.0),  # stopped early still counts
        ("e", "running", 0.99, 2000.0),  # would dominate everything, but is not finished
        ("f", "diverged", 0.99, 3000.0),
        ("g", "errored", None, None),
    )
    assert front_ids(df) == {"a", "b", "d"}


def test_identical_points_are_all_on_the_front():
    df = trials(("a", "completed", 0.9, 100.0), ("b", "completed", 0.9, 100.0), ("c", "completed", 0.8, 100.0))
    assert front_ids(df) == {"a", "b"}  # c is dominated: equal speed, lower accuracy


def test_a_single_trial_is_its_own_front():
    assert front_ids(trials(("only", "completed", 0.5, 10.0))) == {"only"}


def test_nan_in_any_objective_keeps_a_trial_off_the_front():
    df = trials(("a", "completed", float("nan"), 5000.0), ("b", "completed", 0.9, 100.0), ("c", "stopped_early", 0.95, None))
    assert front_ids(df) == {"b"}


def test_min_objectives_flip_which_side_wins():
    df = pd.DataFrame(
        {"trial_id": ["fast", "slow", "mid"], "status": "completed", "val_accuracy": [0.8, 0.95, 0.7], "latency_ms_p95": [5.0, 40.0, 10.0]}
    )
    assert front_ids(df, [("val_accuracy", "max"), ("latency_ms_p95", "min")]) == {"fast", "slow"}
    # Minimising accuracy too: mid (least accurate) now wins on one axis.
    assert front_ids(df, [("val_accuracy", "min"), ("latency_ms_p95", "min")]) == {"fast", "mid"}
    assert front_ids(df, [("latency_ms_p95", "max")]) == {"slow"}


def test_three_objectives():
    df = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d"],
            "status": "completed",
            "val_accuracy": [0.9, 0.8, 0.8, 0.7],
            "infer_img_per_s": [100.0, 200.0, 200.0, 150.0],
            "n_parameters": [1e6, 2e6, 1e6, 5e5],
        }
    )
    # c beats b (fewer parameters, else equal); d is best on size, a on accuracy.
    assert front_ids(df, [("val_accuracy", "max"), ("infer_img_per_s", "max"), ("n_parameters", "min")]) == {"a", "c", "d"}


def test_front_tolerates_none_metrics_and_missing_pair_columns():
    df = trials(("a", "running", None, None), ("b", "completed", 0.9, 100.0))
    assert front_ids(df) == {"b"}
    assert pareto_front(df, [("pair_U_as_R", "min")]).empty


# --- hypervolume -------------------------------------------------------------------------------


def test_hypervolume_2d_matches_a_hand_computed_area():
    front = trials(("a", "completed", 0.9, 100.0), ("b", "completed", 0.8, 200.0), ("c", "completed", 0.95, 50.0))
    # Against (0, 0): 0.95*50 + 0.9*(100-50) + 0.8*(200-100) = 47.5 + 45 + 80
    assert hypervolume(front, MAX2) == pytest.approx(172.5)
    assert hypervolume(front, MAX2, reference=[0.5, 0.0]) == pytest.approx(0.45 * 50 + 0.4 * 50 + 0.3 * 100)
    assert hypervolume(front.iloc[:0], MAX2) == 0.0


def test_hypervolume_min_objective_default_reference_is_past_the_worst_value():
    df = pd.DataFrame(
        {
            "trial_id": ["a", "b"],
            "status": "completed",
            "val_accuracy": [0.8, 0.9],
            "latency_ms_p95": [10.0, 30.0],
            "pair_U_as_R": [0.1, 0.1],
        }
    )
    objectives = [("val_accuracy", "max"), ("latency_ms_p95", "min")]
    assert reference_point(df, objectives) == pytest.approx([0.0, 33.0])  # 10% past the slowest
    assert hypervolume(df, objectives) == pytest.approx(0.8 * 23 + (0.9 - 0.8) * 3)
    assert reference_point(df, [("pair_U_as_R", "min")]) == [1.0]  # a rate's worst is 1
    assert hypervolume(df, [("pair_U_as_R", "min")]) == pytest.approx(0.9)
    assert hypervolume(df, objectives, reference=[0.0, 40.0]) == pytest.approx(0.8 * 30 + (0.9 - 0.8) * 10)  # b adds only the strip above a


def test_hypervolume_3d_is_exact():
    df = pd.DataFrame(
        {
            "trial_id": ["a", "b"],
            "status": "completed",
            "val_accuracy": [2.0, 1.0],
            "test_accuracy": [1.0, 2.0],
            "infer_img_per_s": [1.0, 1.0],
        }
    )
    objectives = [("val_accuracy", "max"), ("test_accuracy", "max"), ("infer_img_per_s", "max")]
    assert hypervolume(df, objectives) == pytest.approx(3.0)  # two 2x1x1 boxes overlapping in a unit cube
    from optuna._hypervolume import compute_hypervolume

    rng = np.random.default_rng(0)
    points = rng.random((12, 3))
    df = pd.DataFrame(
        {
            "trial_id": [str(i) for i in range(12)],
            "status": "completed",
            "val_accuracy": points[:, 0],
            "test_accuracy": points[:, 1],
            "infer_img_per_s": points[:, 2],
        }
    )
    expected = compute_hypervolume(-points, np.zeros(3))  # Optuna minimises: negate against the origin
    assert hypervolume(pareto_front(df, objectives), objectives) == pytest.approx(expected)


# --- objectives --------------------------------------------------------------------------------


def test_parse_objectives_reads_the_default_form():
    assert parse_objectives("val_accuracy:max,infer_img_per_s:max") == DEFAULT_OBJECTIVES
    assert parse_objectives(" latency_ms_p95:min , pair_U_as_R:min") == [("latency_ms_p95", "min"), ("pair_U_as_R", "min")]


@pytest.mark.parametrize(
    "text, message",
    [
        ("accuracy:max", "--objectives: metric must be one of .*, got 'accuracy'"),
        ("pair_U_as_Q1:min", "--objectives: metric must be one of .*, got 'pair_U_as_Q1'"),
        ("val_accuracy:up", "--objectives: mode must be max or min, got 'up'"),
        ("val_accuracy", "--objectives: each objective must be metric:max or metric:min, got 'val_accuracy'"),
        ("val_accuracy:max,,", "--objectives: must be a comma-separated list"),
        ("", "--objectives: must be a comma-separated list"),
        ("val_accuracy:max,val_accuracy:min", "--objectives: each metric may appear once"),
        ("status:max", "got 'status'"),
    ],
)
def test_parse_objectives_refuses_in_one_line(text, message):
    with pytest.raises(AslTuneError, match=message) as info:
        parse_objectives(text)
    assert "\n" not in str(info.value)


# --- summary and importance --------------------------------------------------------------------


def test_summary_ranks_by_the_first_objective_and_marks_the_front():
    df = trials(("a", "completed", 0.9, 100.0), ("b", "completed", 0.95, 50.0), ("c", "completed", 0.9, 200.0), ("d", "running", 0.99, 1.0))
    df["params_lr"] = [0.1, 0.01, 0.05, 0.2]
    table = summary(df, MAX2, top=5)
    assert list(table["trial_id"]) == ["b", "c", "a"]  # ties on accuracy broken by speed; running left out
    assert list(table["on_front"]) == [True, True, False]
    assert "params_lr" in table.columns


def synthetic_sweep(n: int = 40) -> pd.DataFrame:
    """Trials where lr alone decides accuracy; head width and dropout are noise."""
    rng = np.random.default_rng(1)
    lr = 10 ** rng.uniform(-4, -1, n)
    return pd.DataFrame(
        {
            "trial_id": [f"t{i}" for i in range(n)],
            "status": "completed",
            "val_accuracy": 1 - np.abs(np.log10(lr) + 2) / 3 + rng.normal(0, 0.005, n),
            "params_lr": lr,
            "params_head_width": rng.choice([64, 128, 256, 512], n),
            "params_dropout": rng.uniform(0.1, 0.6, n),
            "params_split": "blocked",  # never varies: not assessed
        }
    )


def test_param_importance_finds_the_setting_that_drives_the_objective():
    table = param_importance(synthetic_sweep(), ("val_accuracy", "max"))
    assert list(table.columns) == ["param", "importance"]
    assert set(table["param"]) == {"lr", "head_width", "dropout"}
    assert table.iloc[0]["param"] == "lr" and table.iloc[0]["importance"] > 0.5
    assert table["importance"].sum() == pytest.approx(1.0)


def test_param_importance_is_empty_when_it_cannot_be_computed():
    one = synthetic_sweep().head(1)
    assert param_importance(one, ("val_accuracy", "max")).empty
    assert importance_problem(one, ("val_accuracy", "max")) == "it needs at least 2 finished trials with val_accuracy, this sweep has 1"
    fixed = synthetic_sweep().drop(columns=["params_lr", "params_head_width", "params_dropout"])
    assert param_importance(fixed, ("val_accuracy", "max")).empty
    assert importance_problem(fixed, ("val_accuracy", "max")) == "no setting varies between the finished trials"
    assert importance_problem(synthetic_sweep(), ("val_accuracy", "max")) is None


# --- a real sweep folder, end to end -----------------------------------------------------------


def confusion_counts(errors: dict[tuple[str, str], int], per_class: int = 10) -> list[list[int]]:
    """A 29x29 count matrix: per_class test images per class, some moved off the diagonal."""
    index = {c: i for i, c in enumerate(ASL_CLASSES)}
    matrix = np.eye(len(ASL_CLASSES), dtype=int) * per_class
    for (true, pred), n in errors.items():
        matrix[index[true], index[true]] -= n
        matrix[index[true], index[pred]] += n
    return matrix.tolist()


# trial_id, status, val_accuracy, infer_img_per_s, head_width, lr, data_fraction, epochs run
SWEEP = [
    ("t0", "completed", 0.95, 800.0, 512, 0.010, 1.0, 4),
    ("t1", "completed", 0.90, 1200.0, 128, 0.020, 0.5, 4),
    ("t2", "completed", 0.85, 1000.0, 256, 0.005, 0.7, 4),
    ("t3", "stopped_early", 0.70, 1500.0, 64, 0.003, 0.3, 1),
    ("t4", "diverged", None, 900.0, 512, 0.030, 0.9, 2),
    ("t5", "running", 0.60, 2000.0, 64, 0.008, 0.4, 1),
]
SWEEP_FRONT = {"t0", "t1", "t3"}


def make_sweep(folder, scale: float = 1.0, external: bool = False):
    store = ResultsStore(folder)
    for tid, status, acc, speed, head, lr, fraction, ran in SWEEP:
        params = dict(
            head_width=head,
            lr=lr,
            data_fraction=fraction,
            epochs=4,
            batch_size=64,
            image_size=64,
            split="blocked",
            seed=0,
            momentum=0.9,
            weight_decay=0.0,
            dropout=0.5,
        )
        done = status == "completed"
        metrics = {
            "val_accuracy": None if acc is None else acc * scale,
            "infer_img_per_s": speed,
            "test_accuracy": acc - 0.02 if done else None,
            "external_accuracy": 0.4 if done and external else None,
            "latency_ms_p50": 2000 / speed,
            "latency_ms_p95": 30000 / speed,  # t0: 37.5 ms, too slow for 30 fps; t1: 25 ms, fast enough
            "keeps_up_30fps": 30000 / speed <= 1000 / 30,
            "n_parameters": head * 16384,
            "epochs_completed": ran,
            "images_seen": ran * int(1000 * fraction),
            "train_seconds": 10.0 * ran * fraction,
        }
        if done:
            metrics.update(
                {
                    "pair_U_as_R": 0.1 * scale,
                    "pair_R_as_U": 0.0,
                    "pair_K_as_V": 0.05,
                    "pair_V_as_K": 0.0,
                    "pair_M_as_N": 0.3,
                    "pair_E_as_S": 0.2,
                }
            )
        store.put_trial(trial_row(tid, status, params, metrics, hostname="node-a", device="cpu"))
        for epoch in range(1, ran + 1):
            val = None if status == "diverged" else (acc or 0) * scale * epoch / ran
            store.put_epoch(
                tid,
                {
                    "epoch": epoch,
                    "train_loss": 1.0 / epoch,
                    "train_accuracy": 0.5,
                    "val_loss": 1.0,
                    "val_accuracy": val,
                    "train_img_per_s": 300.0,
                    "images_seen": epoch * int(1000 * fraction),
                    "seconds": 5.0,
                },
            )
        if done:
            store.put_confusion(tid, list(ASL_CLASSES), confusion_counts({("U", "R"): 1, ("K", "V"): 1, ("M", "N"): 3, ("E", "S"): 2}))
    store.flush()
    return folder


def assert_png(path, min_side: int = 300):
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= min_side, (path, image.shape)
    assert image[..., :3].std() > 0.05, f"{path} is blank"


PNGS = ["pareto.png", "learning_curves.png", "confusion_best.png", "pairs.png", "importance.png"]


def test_analyze_writes_the_whole_report_from_a_real_sweep(tmp_path):
    make_sweep(tmp_path / "quick", external=True)
    written = analyze(["quick"], tmp_path, DEFAULT_OBJECTIVES)
    report, text = written.report, written.text
    folder = tmp_path / "quick" / "report"
    assert report == folder / "report.md"
    for name in PNGS:
        assert_png(folder / name)
    front = pd.read_parquet(folder / "pareto_front.parquet")
    assert set(front["trial_id"]) == SWEEP_FRONT and len(front) == 3
    md = report.read_text()
    for name in PNGS:
        assert f"]({name})" in md  # linked relatively, beside report.md
    assert "3 finished trials are on the front" in md and "hypervolume" in md
    assert "## Top 4 trials" in md and "| trial_id | status | val_accuracy | infer_img_per_s | on_front |" in md
    assert "## Best trial: t0" in md and "| head_width | 512 |" in md and "| lr | 0.01 |" in md and "| split | blocked |" in md
    assert "external accuracy: 0.4" in md
    assert "keeps up with 30 fps video at batch 1 (measured during training, under load): no: batch-1 latency p95 37.5 ms" in md
    assert "Held at one value in every finished trial: batch_size = 64" in md and "epochs = 4" in md
    assert "M->N" in md  # the sweep's worst pair is reported beside the watch-list
    importance = pd.read_parquet(folder / "importance.parquet")
    assert set(importance["objective"]) == {"val_accuracy", "infer_img_per_s"}
    # On the terminal: the best trials, the front's size, the most accurate trial.
    assert "front: 3 trials" in text and "most accurate: t0" in text and "t0  val_accuracy 0.95" in text
    # For a notebook: the front and top trials as DataFrames, and the plots as the Figures the PNGs were saved from.
    assert list(written.front["trial_id"]) == list(front["trial_id"]) and set(written.front["sweep"]) == {"quick"}
    assert list(written.summary["trial_id"][:2]) == ["t0", "t1"] and written.summary["on_front"].iloc[0]
    assert [name + ".png" for name in written.figures] == PNGS
    assert [ax.get_title() for ax in written.figures["learning_curves"].axes] == ["Learning curves"]


def test_best_trial_without_external_set_says_so(tmp_path):
    make_sweep(tmp_path / "quick")
    report = analyze(["quick"], tmp_path, [("infer_img_per_s", "max")]).report
    md = report.read_text()
    assert "## Best trial: t3" in md  # fastest finished trial; it was stopped early, so no confusion counts
    assert "external accuracy: no external set attached" in md
    assert "keeps up with 30 fps video at batch 1 (measured during training, under load): yes" in md
    assert "shown: t1, the best trial that has them" in md
    assert set(pd.read_parquet(tmp_path / "quick" / "report" / "pareto_front.parquet")["trial_id"]) == {"t3"}


def test_two_sweeps_are_compared_in_one_report(tmp_path):
    make_sweep(tmp_path / "a")
    make_sweep(tmp_path / "b", scale=1.02)
    written = analyze(["a", "b"], tmp_path, DEFAULT_OBJECTIVES)
    report, text = written.report, written.text
    assert report == tmp_path / "compare-a-b" / "report" / "report.md"
    assert_png(report.parent / "pareto.png")
    md = report.read_text()
    assert "# Sweep comparison: a, b" in md
    assert "[a](../../a/report/report.md)" in md and "[b](../../b/report/report.md)" in md
    assert "| a | 6 | 4 | 3 |" in md and "| b | 6 | 4 | 3 |" in md
    assert md.index("| b | t0 |") < md.index("| a | t0 |")  # b's t0 is more accurate: first in the joint top table
    for name in ("a", "b"):  # each sweep still gets its own report
        assert (tmp_path / name / "report" / "report.md").exists()
    assert text.count("front: 3 trials") == 2 and "comparison:" in text
    assert set(written.front["sweep"]) == {"a", "b"} and len(written.front) == 6
    assert set(written.figures) == {f"{n}/{stem}" for n in ("a", "b") for stem in SWEEP_FIGURES} | {"comparison"}
    assert written.figures["comparison"].axes[0].get_title() == "Pareto fronts, overlaid"


def test_refusals_are_one_line(tmp_path):
    with pytest.raises(AslTuneError, match=r"/nope: no such sweep folder$"):
        analyze(["nope"], tmp_path, DEFAULT_OBJECTIVES)
    store = ResultsStore(tmp_path / "young")
    store.put_trial(trial_row("t0", "running", {"lr": 0.01}, {"val_accuracy": 0.5}))
    store.put_trial(trial_row("t1", "errored", {"lr": 0.02}, {}))
    store.flush()
    with pytest.raises(AslTuneError, match="young: no finished trials .*found 1 running, 1 errored"):
        analyze(["young"], tmp_path, DEFAULT_OBJECTIVES)
    make_sweep(tmp_path / "quick")
    with pytest.raises(AslTuneError, match="--objectives: pair_A_as_B is not recorded in .*trials.parquet"):
        analyze(["quick"], tmp_path, [("pair_A_as_B", "min")])
    assert not (tmp_path / "quick" / "report").exists()  # refused before writing anything
    with pytest.raises(AslTuneError, match="no such sweep folder"):
        analyze(["quick", "nope"], tmp_path, DEFAULT_OBJECTIVES)
    assert not (tmp_path / "quick" / "report").exists()


# --- confusion-pair rates ----------------------------------------------------------------------

# Two completed trials' test counts by hand (true, predicted, count); 4 images per class.
# a: every G taken for H, one U for R.  b: one H taken for G, two R for U.
COUNTS = {
    "a": [("G", "H", 4), ("H", "H", 4), ("U", "U", 3), ("U", "R", 1), ("R", "R", 4)],
    "b": [("G", "G", 4), ("H", "H", 3), ("H", "G", 1), ("U", "U", 4), ("R", "R", 2), ("R", "U", 2)],
}
# What each trial recorded in trials.parquet: the watch list present, plus its own worst pairs only.
RECORDED = {
    "a": {"pair_U_as_R": 0.25, "pair_R_as_U": 0.0, "pair_G_as_H": 1.0},
    "b": {"pair_U_as_R": 0.0, "pair_R_as_U": 0.5, "pair_H_as_G": 0.25},
}


def counts_frame(counts: dict = COUNTS) -> pd.DataFrame:
    """confusion.parquet's long form, by hand: one row per non-zero (trial, true, predicted) cell."""
    rows = [(tid, t, p, n) for tid, cells in counts.items() for t, p, n in cells]
    return pd.DataFrame(rows, columns=["trial_id", "true_label", "pred_label", "count"])


def pair_trials() -> pd.DataFrame:
    """a and b completed (a more accurate), c stopped early and d diverged: neither has test counts."""
    rows = [
        {"trial_id": "a", "status": "completed", "val_accuracy": 0.8, "infer_img_per_s": 100.0, **RECORDED["a"]},
        {"trial_id": "b", "status": "completed", "val_accuracy": 0.7, "infer_img_per_s": 100.0, **RECORDED["b"]},
        {"trial_id": "c", "status": "stopped_early", "val_accuracy": 0.5, "infer_img_per_s": 100.0},
        {"trial_id": "d", "status": "diverged", "val_accuracy": None, "infer_img_per_s": 100.0},
    ]
    return pd.DataFrame(rows)


def test_pair_rates_cover_every_confused_pair_for_every_trial_from_the_counts():
    counts = pd.concat([counts_frame(), counts_frame({"e": [("H", "H", 2)]})], ignore_index=True)  # e's test split has no G, U or R
    rates = pair_rates(counts).set_index("trial_id")
    # The watch-list pairs whose classes occur come first, then every pair any trial confused.
    assert list(rates.columns) == ["pair_U_as_R", "pair_R_as_U", "pair_G_as_H", "pair_H_as_G"]
    assert rates.loc["a"].tolist() == [0.25, 0.0, 1.0, 0.0]  # a never took R for U: 0, not missing
    assert rates.loc["b"].tolist() == [0.0, 0.5, 0.0, 0.25]
    assert rates.loc["e"].isna().tolist() == [True, True, True, False] and rates.loc["e", "pair_H_as_G"] == 0.0
    asked = pair_rates(counts_frame(), [("G", "U")]).set_index("trial_id")["pair_G_as_U"]  # a pair asked for by name
    assert asked.tolist() == [0.0, 0.0]


def test_pair_table_averages_every_finished_trial_not_only_those_that_recorded_the_pair():
    pairs = finished_pair_rates(pair_trials(), counts_frame())
    assert pairs.from_counts and list(pairs.rates["trial_id"]) == ["a", "b"] and pairs.left_out == 1  # c has no counts
    table = pair_summary(pairs, worst=4).set_index("pair")
    # G->H is in a's recorded top pairs only (1.0); b's counts say 0.0 for it.
    assert table.loc["G->H", ["mean", "worst", "trials"]].tolist() == [0.5, 1.0, 2]
    assert list(table.index) == ["U->R", "R->U", "G->H", "H->G"]  # the watch list first, then by mean rate
    assert pair_summary(pairs, worst=1)["pair"].tolist() == ["U->R", "R->U", "G->H"]
    # Without counts (a sweep from before confusion.parquet) the recorded columns are all there is.
    old = finished_pair_rates(pair_trials(), counts_frame().iloc[0:0])
    assert not old.from_counts and pair_summary(old, worst=4).set_index("pair").loc["G->H", ["mean", "trials"]].tolist() == [1.0, 1]


def write_pair_sweep(folder, with_counts: bool = True):
    """pair_trials() as a sweep folder; confusion.parquet only when with_counts."""
    store = ResultsStore(folder)
    for row in pair_trials().to_dict("records"):
        tid, status = row.pop("trial_id"), row.pop("status")
        store.put_trial(
            trial_row(tid, status, {"lr": {"a": 0.01, "b": 0.02, "c": 0.03, "d": 1.0}[tid]}, {k: v for k, v in row.items() if pd.notna(v)})
        )
    store.flush()
    if with_counts:
        write_atomic(counts_frame(), folder / "confusion.parquet")
    return folder


def test_report_pair_table_is_computed_from_the_confusion_counts_of_every_finished_trial(tmp_path):
    write_pair_sweep(tmp_path / "pairs")
    report = analyze(["pairs"], tmp_path, DEFAULT_OBJECTIVES).report
    md = report.read_text()
    expected = """Rates from each trial's full test confusion matrix (`confusion.parquet`: true X predicted as Y, over X's test images), over the 2 finished trials that have one: the seed's watch list, then the sweep's most confused other pairs by mean rate. 1 finished trial has no test counts (stopped before the test evaluation) and is left out.

| pair (true->predicted) | mean rate | worst rate |
|---|---|---|
| U->R | 0.125 | 0.25 |
| R->U | 0.25 | 0.5 |
| G->H | 0.5 | 1 |
| H->G | 0.125 | 0.25 |
"""
    assert expected in md
    assert_png(tmp_path / "pairs" / "report" / "pairs.png")


def test_pair_objectives_rank_every_trial_on_its_rate_from_the_counts(tmp_path):
    write_pair_sweep(tmp_path / "pairs")
    written = analyze(["pairs"], tmp_path, [("pair_G_as_H", "min"), ("val_accuracy", "max")])
    report, text = written.report, written.text
    md = report.read_text()
    # b never took G for H (0 of 4), though only a recorded the pair: b ranks first, and joins a (more accurate) on the front.
    assert "## Best trial: b" in md and "2 finished trials are on the front" in md
    assert "  b  pair_G_as_H 0  val_accuracy 0.7  [front]" in text and "  a  pair_G_as_H 1  val_accuracy 0.8  [front]\n" in text
    assert set(pd.read_parquet(tmp_path / "pairs" / "report" / "pareto_front.parquet")["trial_id"]) == {"a", "b"}


def test_report_without_confusion_counts_falls_back_to_the_recorded_pair_columns_and_says_so(tmp_path):
    write_pair_sweep(tmp_path / "old", with_counts=False)
    report = analyze(["old"], tmp_path, DEFAULT_OBJECTIVES).report
    expected = """No finished trial has confusion counts (`confusion.parquet`; a sweep from an older version), so these rates are trials.parquet's `pair_*` columns, which hold the watch list and each trial's own five most confused pairs: a pair's mean and worst cover only the trials that recorded it (`trials`, of 2), and the other pairs are ranked by mean with unrecorded rates taken as 0.

| pair (true->predicted) | mean rate | worst rate | trials |
|---|---|---|---|
| U->R | 0.125 | 0.25 | 2 |
| R->U | 0.25 | 0.5 | 2 |
| G->H | 1 | 1 | 1 |
| H->G | 0.25 | 0.25 | 1 |
"""
    assert expected in report.read_text()


# --- the best trial's weights ------------------------------------------------------------------


def set_checkpoint(folder, trial_id: str, location: str) -> None:
    store = ResultsStore(folder)
    store.put_trial({"trial_id": trial_id, "checkpoint": location})
    store.flush()


def test_report_names_weights_inside_the_sweep_folder_relative_to_the_results_folder(tmp_path, monkeypatch):
    real = tmp_path / "real"
    folder = make_sweep(real / "quick")
    inside = folder / "ray" / "run-1" / "run_trial_t0" / "checkpoint_000003"  # Ray records absolute paths
    set_checkpoint(folder, "t0", str(inside))
    load = "(`asl_tune.train.load_trained(path)` gives the network, ready to `classify` images)"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(real)
    for results in ("real", tmp_path / "real", "link"):  # named relatively, absolutely, through a symlink
        written = analyze(["quick"], results, DEFAULT_OBJECTIVES)
        report, text = written.report, written.text
        assert f"- weights: `quick/ray/run-1/run_trial_t0/checkpoint_000003`, relative to the results folder {load}" in report.read_text()
        assert str(tmp_path) not in report.read_text().split("## Best trial")[1]
        assert f"best trial's weights: {inside}\n" in text  # the terminal: the path as recorded, to copy
    for outside in ("s3://bucket/runs/quick/run-1/run_trial_t0/checkpoint_000003", str(tmp_path / "elsewhere" / "checkpoint_000003")):
        set_checkpoint(folder, "t0", outside)
        written = analyze(["quick"], "real", DEFAULT_OBJECTIVES)
        report, text = written.report, written.text
        assert f"- weights: `{outside}` {load}" in report.read_text() and f"best trial's weights: {outside}\n" in text


def test_the_report_names_no_absolute_path_however_the_results_folder_is_named(tmp_path, monkeypatch):
    real = tmp_path / "real"
    folder = make_sweep(real / "quick")
    set_checkpoint(folder, "t0", str(folder / "ray" / "run-1" / "run_trial_t0" / "checkpoint_000003"))  # Ray records absolute paths
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(real)
    for results in ("real", tmp_path / "real", "link"):
        md = analyze(["quick"], results, DEFAULT_OBJECTIVES).report.read_text()
        assert "trials (" in md and "read from `quick`, relative to the results folder." in md
        assert str(tmp_path) not in md and str(tmp_path.resolve()) not in md
        assert not re.search(r"`/|\(/", md), re.findall(r".*(?:`/|\(/).*", md)  # no absolute path, quoted or linked
