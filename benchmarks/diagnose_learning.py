"""Where does learning fail? Ablations of the demo recipe at one fixed budget, scored zero-shot, on SYNTHETIC phantoms.

Every RadZ run trains `train_radz.py` with the demo recipe (`radz.presets.DEMO_TRAINING`) at the same budget
(`--max_steps` DFAT steps, `--tower_steps` label-free tower steps, batch 16), with one change each (see RUNS), on the
6 seen phantom labels (`DEMO_HELD_OUT` are never labels). The saved checkpoint is then scored on the test split
through the shipped `pipeline("zero-shot-image-classification", ...)`, single-label, with the DKAM anchors and with
the label prompts, as per-label ROC AUC (all 8 labels, the 6 seen, the 2 held out). From the training log: L_CA,
L_CG (image and text side), image→text retrieval top-1 and the seconds per step. Two supervised upper bounds train
on the same images and steps with a sigmoid head on all 8 labels: the tower alone, and the full image pass.

    python benchmarks/diagnose_learning.py                                   # every run, the default budget
    python benchmarks/diagnose_learning.py --runs radz,vit_tower --max_steps 100 --tower_steps 300

Outputs in --output_dir: results.json, table.md (also printed), curves.png, and runs/<name>/ (logs, checkpoint).
A run whose result.json exists (same settings) is skipped; --force reruns it. A failed run is reported with the last
line of its error, and the others go on.

The data are SYNTHETIC phantoms (`radz.phantom`): the numbers diagnose the method and the code, nothing clinical.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from radz.phantom import PHANTOM_LABELS  # noqa: E402
from radz.presets import DEMO_HELD_OUT, DEMO_TRAINING, training_flags  # noqa: E402

SEEN = [label for label in PHANTOM_LABELS if label not in DEMO_HELD_OUT]
HELD_OUT = [label for label in PHANTOM_LABELS if label in DEMO_HELD_OUT]
DATA_SIZE, DATA_SEED, N_VALIDATION = 128, 0, 100
SUPERVISED_BATCH = 16
# Supervised upper bounds. The tower: tower + projector + head at 1e-3 (the tower stage's rate). The full image pass
# has no tower stage before it, so its tower and projector get the old recipe's 1e-3, LoRA and token rows the
# recipe's 2e-4, the new head 1e-3; one-cycle schedules (10 % warm-up), AdamW, weight decay 0.01. The head is a
# LayerNorm without parameters (LLM states have a few huge channels) and a linear layer.
SUPERVISED_TOWER_LR = 1e-3
SUPERVISED_LLM_LR = {"vision": 1e-3, "llm": DEMO_TRAINING["learning_rate"], "head": 1e-3}

# name -> (preset overrides, recipe overrides, description)
RUNS = {
    "radz": ({}, {}, "reference: the demo recipe as is"),
    "no_tower_pretraining": (
        {}, {"tower_pretraining_steps": 0, "vision_learning_rate": 1e-3}, "no tower stage, tower lr 1e-3 (old recipe)"
    ),
    "tower_frozen_at_init": (
        {}, {"tower_pretraining_steps": 0, "train_vision_tower": False}, "no tower stage, tower frozen (random)"
    ),
    "tower_frozen_after_pretraining": ({}, {"train_vision_tower": False}, "tower stage, then tower frozen"),
    "alignment_cross": ({"alignment": "cross"}, {}, "alignment cross, the paper's (ref. global)"),
    "anchor_head_separate": ({"anchor_head": "separate"}, {}, "a separate anchor MLP, the paper's (ref. shared)"),
    "label_template_bare": ({"label_template": "{}"}, {}, "labels without anchors as bare names (ref. IMPRESSION: {}.)"),
    "lambda_1": ({"dkam_lambda": 1.0}, {}, "dkam_lambda 1: L_CA only, no L_CG (ref. 0.5)"),
    "cls_tokens_1": ({"num_cls_tokens": 1}, {}, "1 special token per modality (ref. 8; tiny 4)"),
    "llm_layers_4": ({"num_llm_layers": 4}, {}, "4 LLM layers (ref. --llm_layers)"),
    "feature_layer_last": ({"feature_layer": -1}, {}, "LLM feature_layer -1, the last (ref. -2)"),
    "vit_tower": ({"vision": "vit"}, {}, "CLIP-ViT from scratch instead of the conv tower"),
    "supervised_tower": (
        {}, {},
        f"SUPERVISED bound: tower+projector, mean image token, BCE head on all 8 labels, lr {SUPERVISED_TOWER_LR:g}",
    ),
    "supervised_llm": (
        {}, {},
        "SUPERVISED bound: full image pass (LoRA, special tokens), BCE head on pooled_cls_states, all 8 labels, "
        f"lr tower {SUPERVISED_LLM_LR['vision']:g} / LLM {SUPERVISED_LLM_LR['llm']:g} / head {SUPERVISED_LLM_LR['head']:g}",
    ),
}
SUPERVISED = ("supervised_tower", "supervised_llm")
CURVE_KEYS = {
    "loss_alignment": "L_CA",
    "loss_category_image": "L_CG image",
    "loss_category_text": "L_CG text",
    "retrieval_top1": "retrieval top-1 (batch)",
}
DISCLAIMER = "SYNTHETIC phantoms: these numbers diagnose the method and the code on generated images, nothing clinical."


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------


def preset_settings(args, run_preset: dict) -> dict:
    """The preset JSON of a run: the preset, its image size, the conv tower, the budget's LLM depth, the change."""
    settings = {"preset": args.preset, "image_size": args.image_size, "vision": "conv"}
    if args.preset == "demo":
        settings["num_llm_layers"] = args.llm_layers
    return {**settings, **run_preset}


def recipe(args, run_recipe: dict) -> dict:
    """The demo recipe, the budget flags over it, the run's change over those."""
    budget = {"max_steps": args.max_steps, "tower_pretraining_steps": args.tower_steps}
    return {**DEMO_TRAINING, **budget, **run_recipe}


def logging_steps(max_steps: int) -> int:
    """10, as the demo; fewer for a smoke budget so that the curves have points."""
    return min(10, max(1, max_steps // 10))


def run_settings(args, name: str, data_spec: dict) -> dict:
    """Everything a run's result depends on; a stored result with other settings is rerun."""
    run_preset, run_recipe, _ = RUNS[name]
    settings = {"run": name, "preset_json": preset_settings(args, run_preset), "data": data_spec,
                "n_eval": args.n_eval, "knowledge": args.knowledge}
    if name in SUPERVISED:
        settings.update(steps=args.max_steps, batch_size=SUPERVISED_BATCH)
    else:
        settings["recipe"] = recipe(args, run_recipe)
    return settings


def skip_reason(args, name: str) -> str | None:
    """Why a run does not apply to this preset (None: it does)."""
    if args.preset != "demo" and "num_llm_layers" in RUNS[name][0]:
        return f"preset {args.preset!r} has no num_llm_layers"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def ensure_data(args) -> tuple[Path, dict]:
    """The phantom dataset in <output_dir>/data, written unless one with the same spec is there."""
    from radz.phantom import write_phantom_dataset

    data = args.output_dir / "data"
    spec = {"n_train": args.n_train, "n_validation": N_VALIDATION, "n_test": args.n_eval, "size": DATA_SIZE,
            "seed": DATA_SEED}
    spec_file = data / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec and (data / "test.jsonl").is_file():
        return data, spec
    print(f"writing SYNTHETIC phantoms to {data}: {spec}", flush=True)
    started = time.time()
    write_phantom_dataset(data, num_workers=max(1, min(4, os.cpu_count() or 1)), **spec)
    spec_file.write_text(json.dumps(spec))
    print(f"  {time.time() - started:.0f} s", flush=True)
    return data, spec


# ----------------------------------------------------------------------------------------------------------------
# Running (the parent process)
# ----------------------------------------------------------------------------------------------------------------


def child_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_logged(command: list[str], log: Path) -> tuple[int, float]:
    """Run `command` in the repository with stdout+stderr to `log`; (exit status, seconds)."""
    started = time.time()
    with open(log, "w") as handle:
        handle.write("$ " + shlex.join(command) + "\n")
        handle.flush()
        status = subprocess.run(command, cwd=REPO, env=child_env(), stdout=handle, stderr=subprocess.STDOUT).returncode
    return status, time.time() - started


def last_error_line(log: Path) -> str:
    """The exception line of a traceback in `log`, else its last non-empty line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line):
            return line[:300]
    return (lines[-1] if lines else "no output")[:300]


class RunFailed(Exception):
    pass


def run_radz(args, name: str, run_dir: Path, settings: dict, data: Path) -> dict:
    """Train with train_radz.py, score with the pipeline; the run's result."""
    model_dir = run_dir / "model"
    preset_json = run_dir / "preset.json"
    preset_json.write_text(json.dumps(settings["preset_json"]))
    command = [
        sys.executable, "train_radz.py",
        "--config", str(preset_json),
        "--knowledge", args.knowledge,
        "--train_file", str(data / "train.jsonl"),
        "--label_columns", ",".join(SEEN),
        "--output_dir", str(model_dir),
        "--save_strategy", "no",
        "--logging_steps", str(logging_steps(settings["recipe"]["max_steps"])),
        "--logging_first_step", "True",
        "--report_to", "none",
        "--dataloader_pin_memory", "False",
        "--seed", "0",
        "--use_cpu", "True",
        *training_flags(settings["recipe"]),
    ]  # fmt: skip
    status, train_seconds = run_logged(command, run_dir / "train.log")
    if status != 0:
        raise RunFailed(f"training: {last_error_line(run_dir / 'train.log')}")
    status, score_seconds = run_logged(
        [sys.executable, __file__, "--_score", str(run_dir), "--output_dir", str(args.output_dir),
         "--n_eval", str(args.n_eval)],
        run_dir / "score.log",
    )
    if status != 0:
        raise RunFailed(f"scoring: {last_error_line(run_dir / 'score.log')}")
    scores = json.loads((run_dir / "scores.json").read_text())
    result = {"kind": "radz", **scores, **training_summary(model_dir, run_dir / "train.log")}
    result.update(train_wall_s=round(train_seconds, 1), score_wall_s=round(score_seconds, 1))
    if args.delete_models:
        for path in model_dir.glob("*.safetensors"):
            path.unlink()
    return result


def run_supervised(args, name: str, run_dir: Path, settings: dict, data: Path) -> dict:
    preset_json = run_dir / "preset.json"
    preset_json.write_text(json.dumps(settings["preset_json"]))
    command = [sys.executable, __file__, "--_supervised", name, "--_run_dir", str(run_dir),
               "--output_dir", str(args.output_dir), "--max_steps", str(args.max_steps), "--n_eval", str(args.n_eval)]
    status, seconds = run_logged(command, run_dir / "supervised.log")
    if status != 0:
        raise RunFailed(last_error_line(run_dir / "supervised.log"))
    result = json.loads((run_dir / "supervised.json").read_text())
    return {"kind": "supervised", **result, "train_wall_s": round(seconds, 1)}


def training_summary(model_dir: Path, log: Path) -> dict:
    """Curves and first/last values from trainer_state.json, the tower stage's curve and time."""
    state = json.loads((model_dir / "trainer_state.json").read_text())
    history = state["log_history"]
    logged = [entry for entry in history if "loss_alignment" in entry]
    curves = {key: [[entry["step"], entry[key]] for entry in logged if key in entry] for key in CURVE_KEYS}
    summary = {"curves": curves, "global_step": state.get("global_step")}
    for key, points in curves.items():
        summary[f"{key}_first"] = points[0][1] if points else None
        summary[f"{key}_last"] = points[-1][1] if points else None
    runtime = next((entry["train_runtime"] for entry in history if "train_runtime" in entry), None)
    steps = state.get("global_step") or state.get("max_steps")
    summary["train_runtime_s"] = runtime
    summary["s_per_step"] = runtime / steps if runtime and steps else None
    tower_file = model_dir / "tower_pretraining.json"
    summary["tower_curve"] = json.loads(tower_file.read_text()) if tower_file.is_file() else []
    # The stage's elapsed seconds: in its curve, or (older code) in its log line "tower pretraining {...} (N s)".
    last = summary["tower_curve"][-1] if summary["tower_curve"] else None
    seconds = last.get("seconds") if last else None
    if last and seconds is None:
        times = re.findall(r"tower pretraining \{.*?\} \((\d+) s\)", log.read_text(errors="replace"))
        seconds = float(times[-1]) if times else None
    if seconds is not None:
        summary.update(tower_s=seconds, tower_s_per_step=seconds / last["step"])
    return summary


def main_parent(args, argv: list[str]):
    names = list(RUNS) if args.runs == "all" else [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"unknown run(s) {unknown}; the runs are: {', '.join(RUNS)}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    command_line = shlex.join(["python", "benchmarks/diagnose_learning.py", *argv])
    print(DISCLAIMER, flush=True)
    data, spec = ensure_data(args)
    results = earlier_results(args, spec)
    for name in names:
        run_dir = args.output_dir / "runs" / name
        result_file = run_dir / "result.json"
        reason = skip_reason(args, name)
        if reason:
            print(f"--- {name}: skipped ({reason})", flush=True)
            results[name] = {"name": name, "status": "skipped", "error": reason, "description": RUNS[name][2]}
            continue
        settings = run_settings(args, name, spec)
        if result_file.is_file() and not args.force:
            stored = json.loads(result_file.read_text())
            if stored.get("settings") == settings:
                print(f"--- {name}: done before ({result_file}); --force reruns it", flush=True)
                results[name] = stored
                continue
            print(f"--- {name}: stored result has other settings; rerunning", flush=True)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        print(f"--- {name}: {RUNS[name][2]}", flush=True)
        started = time.time()
        base = {"name": name, "description": RUNS[name][2], "settings": settings}
        try:
            runner = run_supervised if name in SUPERVISED else run_radz
            result = {**base, "status": "ok", **runner(args, name, run_dir, settings, data)}
            result["wall_s"] = round(time.time() - started, 1)
            result_file.write_text(json.dumps(result, indent=1))
            print(f"    {format_brief(result)}  ({result['wall_s'] / 60:.1f} min)", flush=True)
        except RunFailed as error:
            result = {**base, "status": "failed", "error": str(error), "wall_s": round(time.time() - started, 1)}
            (run_dir / "error.json").write_text(json.dumps(result, indent=1))
            print(f"    FAILED: {error}  (log in {run_dir})", flush=True)
        results[name] = result
        write_outputs(args, results, command_line)
    write_outputs(args, results, command_line)
    print((args.output_dir / "table.md").read_text())


def earlier_results(args, spec: dict) -> dict:
    """Results (and failures) in <output_dir>/runs of earlier invocations with the current settings: the table shows
    every run done at this budget, not only those named now."""
    results = {}
    for name in RUNS:
        if skip_reason(args, name):
            continue
        for file in ("result.json", "error.json"):
            path = args.output_dir / "runs" / name / file
            if path.is_file():
                stored = json.loads(path.read_text())
                if stored.get("settings") == run_settings(args, name, spec):
                    results[name] = stored
                break
    return results


def format_brief(result: dict) -> str:
    if result["kind"] == "supervised":
        return (f"AUC {fmt(result['auc_all'])}, BCE {fmt(result['bce_first'])}→{fmt(result['bce_last'])}, "
                f"s/step {fmt(result['s_per_step'], 2)}")
    return (f"AUC anchors {fmt(result.get('auc_anchors_all'))}, no anchors {fmt(result.get('auc_prompts_all'))}, "
            f"s/step {fmt(result.get('s_per_step'), 2)}")


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def table_row(result: dict) -> str:
    name = result["name"]
    if result["status"] != "ok":
        what = f"{result['description']} — **{result['status'].upper()}**: {result.get('error', '')}"
        return f"| {name} | {what.replace('|', '/')} |" + " |" * 12
    if result["kind"] == "supervised":
        cells = [fmt(result["auc_all"]), fmt(result["auc_seen"]), fmt(result["auc_held_out"]) + "†", "—",
                 min_cell(result["auc_per_label"]), "—", "—", "—", "—", fmt(result["s_per_step"], 2), "—", "—"]
    else:
        cells = [
            fmt(result["auc_anchors_all"]), fmt(result["auc_anchors_seen"]), fmt(result["auc_anchors_held_out"]),
            fmt(result["auc_prompts_all"]), min_cell(result["auc_prompts_per_label"]),
            f"{fmt(result['loss_alignment_first'], 2)}→{fmt(result['loss_alignment_last'], 2)}",
            fmt(result["loss_category_image_last"], 2), fmt(result["loss_category_text_last"], 2),
            fmt(result["retrieval_top1_last"], 2), fmt(result["s_per_step"], 2), fmt(result.get("tower_s_per_step"), 2),
            tower_cell(result.get("tower_curve") or []),
        ]  # fmt: skip
    return f"| {name} | {result['description']} | " + " | ".join(cells) + " |"


def tower_cell(curve: list[dict]) -> str:
    if not curve:
        return "—"
    return f"{curve[0]['loss']:.2f}→{curve[-1]['loss']:.2f} / {curve[-1]['retrieval_top1']:.2f}"


def min_cell(per_label: dict) -> str:
    defined = {k: v for k, v in per_label.items() if v is not None and not math.isnan(v)}
    if not defined:
        return "—"
    label = min(defined, key=defined.get)
    return f"{defined[label]:.3f} ({label})"


def write_outputs(args, results: dict, command_line: str):
    ordered = [results[name] for name in RUNS if name in results]
    budget = (f"preset {args.preset} (image {args.image_size} px, conv tower unless the run says"
              f"{', ' + str(args.llm_layers) + ' LLM layers' if args.preset == 'demo' else ''}); "
              f"{args.max_steps} DFAT steps at batch {DEMO_TRAINING['per_device_train_batch_size']} after "
              f"{args.tower_steps} tower steps at batch {DEMO_TRAINING['tower_pretraining_batch_size']}; supervised "
              f"bounds {args.max_steps} steps at batch {SUPERVISED_BATCH}; {args.n_train} training phantoms, scored on "
              f"{args.n_eval} test phantoms; knowledge {args.knowledge!r}; seen labels {', '.join(SEEN)}; held out "
              f"{', '.join(HELD_OUT)}")
    lines = [
        "# Learning diagnosis on SYNTHETIC phantoms",
        "",
        DISCLAIMER,
        "",
        f"Command: `{command_line}`",
        "",
        f"Budget: {budget}.",
        "",
        "Zero-shot ROC AUC of the shipped pipeline (single-label softmax over the 8 labels) on the test split, with the "
        "DKAM anchors (all 8 / 6 seen / 2 held out) and with the label prompts (all 8, and the worst label). Losses and "
        "retrieval (image→text top-1 in the batch of 16) are the training log's averages over logging intervals; "
        "s/step is train_runtime / steps of the DFAT stage, tower s/step that of the label-free stage (batch 32), whose "
        "InfoNCE and retrieval (among 32) are its log's averages over 25-step intervals.",
        "",
        "| run | what changed | AUC anchors all | seen | held-out | AUC no anchors all | min | L_CA first→last "
        "| L_CG img last | L_CG txt last | retrieval last | s/step | tower s/step | tower InfoNCE first→last / retrieval |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[table_row(result) for result in ordered],
        "",
        "† Supervised rows: the AUC of their sigmoid head, trained on all 8 labels (the \"held-out\" two included), in "
        "the anchors columns; min is their worst label.",
        "",
    ]
    (args.output_dir / "table.md").write_text("\n".join(lines))
    payload = {"command": command_line, "budget": budget, "disclaimer": DISCLAIMER, "runs": results}
    (args.output_dir / "results.json").write_text(json.dumps(payload, indent=1))
    plot_curves(args.output_dir / "curves.png", ordered)


def plot_curves(path: Path, results: list[dict]):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves.png", flush=True)
        return
    ok = [r for r in results if r.get("status") == "ok"]
    panels = [*CURVE_KEYS.items(), ("tower", "tower stage InfoNCE"), ("supervised", "supervised BCE")]
    colors = {result["name"]: plt.cm.tab20(index % 20) for index, result in enumerate(ok)}
    figure, axes = plt.subplots(2, 3, figsize=(17, 9))
    for axis, (key, title) in zip(axes.flat, panels):
        for result in ok:
            if key == "tower":
                points = [[p["step"], p["loss"]] for p in result.get("tower_curve", [])]
            elif key == "supervised":
                points = result.get("curve", []) if result["kind"] == "supervised" else []
            else:
                points = result.get("curves", {}).get(key, [])
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker=".", label=result["name"], color=colors[result["name"]])
        axis.set_title(title)
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend(fontsize=7)
    figure.suptitle("LLaVA-RadZ learning diagnosis — SYNTHETIC phantoms")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# Children: scoring a checkpoint, the supervised bounds
# ----------------------------------------------------------------------------------------------------------------


def test_rows(output_dir: Path, n_eval: int) -> list[dict]:
    data = output_dir / "data"
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()][:n_eval]
    for row in rows:
        row["image"] = str(data / row["image"])
    return rows


def per_label_auc(scores, truth) -> dict:
    """`{label: ROC AUC}` over PHANTOM_LABELS; NaN where the test rows hold one class only."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    return {
        label: float(roc_auc_score(truth[:, k], scores[:, k])) if len(np.unique(truth[:, k])) == 2 else math.nan
        for k, label in enumerate(PHANTOM_LABELS)
    }


def macro(per_label: dict, labels) -> float:
    values = [per_label[label] for label in labels if not math.isnan(per_label[label])]
    return float(sum(values) / len(values)) if values else math.nan


def aggregate(per_label: dict, prefix: str) -> dict:
    return {f"{prefix}_all": macro(per_label, PHANTOM_LABELS), f"{prefix}_seen": macro(per_label, SEEN),
            f"{prefix}_held_out": macro(per_label, HELD_OUT), f"{prefix}_per_label": per_label}


def child_score(run_dir: Path, output_dir: Path, n_eval: int):
    """The saved checkpoint through the shipped zero-shot pipeline, with anchors and with label prompts."""
    import numpy as np
    from transformers import pipeline

    rows = test_rows(output_dir, n_eval)
    truth = np.array([[row[label] for label in PHANTOM_LABELS] for row in rows], dtype=float)
    classifier = pipeline("zero-shot-image-classification", model=str(run_dir / "model"), trust_remote_code=True)
    result = {}
    for use_knowledge, prefix in ((True, "auc_anchors"), (False, "auc_prompts")):
        started = time.time()
        outputs = classifier([row["image"] for row in rows], candidate_labels=PHANTOM_LABELS, multi_label=False,
                             use_knowledge=use_knowledge, batch_size=32, return_anchors=True)
        scores = np.array([[{item["label"]: item["score"] for item in out}[label] for label in PHANTOM_LABELS]
                           for out in outputs])
        anchored = sorted({item["label"] for out in outputs for item in out if item.get("anchor")})
        result.update(aggregate(per_label_auc(scores, truth), prefix))
        result[f"{prefix}_anchored_labels"] = anchored
        print(f"use_knowledge={use_knowledge}: {len(rows)} images in {time.time() - started:.0f} s; anchored {anchored}")
    (run_dir / "scores.json").write_text(json.dumps(result, indent=1))


def child_supervised(name: str, run_dir: Path, output_dir: Path, max_steps: int, n_eval: int):
    """A supervised bound: `max_steps` steps at batch 16 of BCE on all 8 labels; per-label AUC on the test split."""
    import numpy as np
    import torch
    from torch import nn

    from radz.presets import build_from_preset
    from radz.training import DataArguments, ModelArguments, RadZCollator, load_training_data, prepare_for_training
    from radz.training.tower import pooled_image_tokens

    torch.manual_seed(0)
    preset_json = str(run_dir / "preset.json")
    model, processor = build_from_preset(preset_json)
    data = output_dir / "data"
    data_args = DataArguments(train_file=str(data / "train.jsonl"), label_columns=",".join(PHANTOM_LABELS))
    train, _ = load_training_data(data_args, "train")
    collator = RadZCollator(processor, max_bad_fraction=0.05, fallback_dataset=train, seed=0)

    if name == "supervised_tower":
        model.requires_grad_(False)
        inner = model.llava.model
        trunk = [inner.vision_tower, inner.multi_modal_projector]
        for module in trunk:
            module.requires_grad_(True)

        def features(batch):
            return pooled_image_tokens(model, batch["pixel_values"])

        groups = [{"params": [p for m in trunk for p in m.parameters()], "lr": SUPERVISED_TOWER_LR}]
        head_lr = SUPERVISED_TOWER_LR
    else:
        model = prepare_for_training(model, ModelArguments(config=preset_json, lora_r=16, train_vision_tower=True))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model

        def features(batch):
            return base.get_image_features(**{k: v for k, v in batch.items() if k != "labels"}).pooled_cls_states

        vision, llm = [], []
        for parameter_name, parameter in model.named_parameters():
            if parameter.requires_grad:
                is_vision = re.search(r"(^|\.)(vision_tower|multi_modal_projector)\.", parameter_name)
                (vision if is_vision else llm).append(parameter)
        groups = [
            {"params": vision, "lr": SUPERVISED_LLM_LR["vision"]}, {"params": llm, "lr": SUPERVISED_LLM_LR["llm"]}
        ]
        head_lr = SUPERVISED_LLM_LR["head"]

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()

    def batch_at(step):
        start = (step * SUPERVISED_BATCH) % len(order)
        indices = [order[(start + i) % len(order)] for i in range(SUPERVISED_BATCH)]
        return collator([train[i] for i in indices])

    model.train()
    with torch.no_grad():
        dim = features(batch_at(0)).shape[-1]
    head = nn.Sequential(nn.LayerNorm(dim, elementwise_affine=False), nn.Linear(dim, len(PHANTOM_LABELS)))
    groups.append({"params": list(head.parameters()), "lr": head_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=max_steps, pct_start=0.1
    )
    loss_fn = nn.BCEWithLogitsLoss()
    curve, running, started = [], [], time.time()
    every = logging_steps(max_steps)
    for step in range(max_steps):
        batch = batch_at(step)
        labels = batch["labels"]
        known = ~torch.isnan(labels)
        logits = head(features(batch))
        loss = loss_fn(logits[known], labels[known])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        running.append(float(loss))
        if (step + 1) % every == 0 or step + 1 == max_steps:
            curve.append([step + 1, sum(running) / len(running)])
            running = []
            print(f"step {step + 1}: BCE {curve[-1][1]:.4f} ({time.time() - started:.0f} s)", flush=True)
    train_seconds = time.time() - started

    model.eval()
    head.eval()
    rows = test_rows(output_dir, n_eval)
    eval_collator = RadZCollator(processor, max_bad_fraction=1.0)
    scores = []
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            batch = eval_collator(rows[start : start + 32])
            scores.append(torch.sigmoid(head(features(batch))).numpy())
    truth = np.array([[row[label] for label in PHANTOM_LABELS] for row in rows], dtype=float)
    per_label = per_label_auc(np.concatenate(scores), truth)
    result = {**aggregate(per_label, "auc"), "curve": curve, "bce_first": curve[0][1], "bce_last": curve[-1][1],
              "s_per_step": train_seconds / max_steps, "train_runtime_s": train_seconds}
    (run_dir / "supervised.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=REPO / "outputs" / "diagnosis")
    parser.add_argument("--runs", default="all", help=f"comma-separated, or 'all': {', '.join(RUNS)}")
    parser.add_argument("--max_steps", type=int, default=100, help="DFAT steps (and supervised steps) of every run")
    parser.add_argument("--tower_steps", type=int, default=300, help="label-free tower stage steps (where it runs)")
    parser.add_argument("--llm_layers", type=int, default=2, help="the demo preset's num_llm_layers")
    parser.add_argument("--n_train", type=int, default=3000)
    parser.add_argument("--n_eval", type=int, default=300, help="test phantoms scored (also the test split's size)")
    parser.add_argument("--preset", default="demo", choices=["demo", "tiny"])
    parser.add_argument("--image_size", type=int, default=None, help="model input size (default: demo 128, tiny 32)")
    parser.add_argument("--knowledge", default="phantom", help="DKAM knowledge: a bundled set or a JSON file")
    parser.add_argument("--force", action="store_true", help="rerun runs that have a result.json")
    parser.add_argument("--delete_models", action="store_true", help="delete each run's weights after scoring")
    parser.add_argument("--_score", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_supervised", help=argparse.SUPPRESS)
    parser.add_argument("--_run_dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir.resolve()
    if args.image_size is None:
        args.image_size = 128 if args.preset == "demo" else 32
    if args._score is not None:
        child_score(args._score, args.output_dir, args.n_eval)
    elif args._supervised is not None:
        child_supervised(args._supervised, args._run_dir, args.output_dir, args.max_steps, args.n_eval)
    else:
        main_parent(args, argv)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
