"""Ablation of the CPU default's training options, scored by the demo shapes benchmark.

    python benchmarks/ablation.py --output_dir ./ablation                        # every row, the tables' budget
    python benchmarks/ablation.py --rows baseline default "no EMA" --steps 500 --nproc 1  # some rows, smaller budget
    python benchmarks/ablation.py --output_dir ./ablation --table                 # only rewrite the table

Each row runs ``train.sh``'s CPU default (the kit, the demo data, ``--nproc`` data-parallel
processes: 2 like train.sh) with one change: environment overrides of train.sh's settings and/or
extra trainer flags. Every row gets the same budget of optimizer steps at batch 32 per process
(rows with another batch size get the same number of images, i.e. steps × 32 / batch). The final
UNet (its EMA weights when the row keeps an EMA) is then scored with ``eval.py --evaluate shapes``
on two disjoint seed sets:

* tuning seeds (``--tune_seed``, default 0..3): the ones looked at while choosing the default;
* report seeds (``--report_seed``, default 1000..1003): never looked at while choosing; the figures
  docs/results.md quotes.

Training runs under ``nice -n 5`` (the CPU is shared). Written to ``--output_dir``: one folder per
row (train log, final UNet, eval outputs), ``ablation.json`` (everything measured, appended row by
row, so an interrupted run keeps what it finished) and ``ablation.md`` (the table).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANDOM_TEXT_ENCODER = "text_encoder_random_init"  # folder in --output_dir (not a row's name: eval would read it as one)
BASE_BATCH = 32  # the budget is counted in steps of batch 32 (the CPU default's batch when the tables were measured)


@dataclass
class Row:
    what: str  # one line for the table
    env: Dict[str, str] = field(default_factory=dict)  # train.sh settings (see its header)
    args: List[str] = field(default_factory=list)  # extra trainer flags ("{random_text_encoder}" is filled in)
    batch: int = BASE_BATCH
    raw_weights_of: str = ""  # score this row's raw (non-EMA) UNet of that row's training instead of training again


# Every row is the default of train.sh with one change, except "baseline" (PaddleMIX's options all off).
ROWS: Dict[str, Row] = {
    "baseline": Row("no min-SNR, no offset noise, no EMA (plain ε-MSE)",
                    env={"SNR_GAMMA": "", "NOISE_OFFSET": "0", "FLAG_USE_EMA": "0"}),
    "default": Row("train.sh's CPU recipe at the table's batch 32"),
    "no min-SNR": Row("--snr_gamma off", env={"SNR_GAMMA": ""}),
    "no noise offset": Row("--noise_offset 0", env={"NOISE_OFFSET": "0"}),
    "no EMA": Row("the default's raw UNet weights instead of its EMA (same training run)", raw_weights_of="default"),
    "lr 3e-4": Row("--learning_rate 3e-4", env={"LR": "3e-4"}),
    "lr 1e-3": Row("--learning_rate 1e-3 (the default until the LR rows showed higher rates better)",
                   env={"LR": "1e-3"}),
    "lr 3e-3": Row("--learning_rate 3e-3", env={"LR": "3e-3"}),
    "lr 6e-3": Row("--learning_rate 6e-3", env={"LR": "6e-3"}),
    "cosine": Row("cosine LR decay to 0 with 5 % warm-up", env={"LR_SCHEDULER": "cosine", "WARMUP_STEPS": "{warmup}"}),
    "linear decay": Row("linear LR decay to 0 (no warm-up)", env={"LR_SCHEDULER": "linear"}),
    "beta2 0.99": Row("AdamW's β2 0.99 instead of 0.999", env={"ADAM_BETA2": "0.99"}),
    "batch 16": Row("batch 16, twice the steps", env={"BATCH_SIZE": "16"}, batch=16),
    "batch 64": Row("batch 64, half the steps", env={"BATCH_SIZE": "64"}, batch=64),
    "1 process": Row("NPROC=1: one process of batch 32 (half the images)", env={"NPROC": "1"}),
    "v-prediction": Row("--prediction_type v_prediction", args=["--prediction_type", "v_prediction"]),
    "random text encoder": Row("the kit's text encoder replaced by a randomly initialised one (same config)",
                               args=["--text_encoder_name_or_path", "{random_text_encoder}"]),
    "train text encoder": Row("--train_text_encoder (kit's encoder, trained along, same LR)",
                              args=["--train_text_encoder", "True"]),
}


def make_random_text_encoder(kit: str, out: str, seed: int = 0) -> str:
    """A CLIPTextModel with the kit's config and fresh random weights, saved to ``out``."""
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import paddle
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    paddle.seed(seed)
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(kit, "text_encoder")))
    model.save_pretrained(out)
    return out


def child_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train_row(name: str, row: Row, a, row_dir: str) -> dict:
    """Run train.sh for one row; returns steps, wall and CPU seconds and the trainer's own figures."""
    steps = a.steps * BASE_BATCH // row.batch
    fill = {"random_text_encoder": os.path.join(a.output_dir, RANDOM_TEXT_ENCODER), "warmup": str(steps // 20)}
    env = {**os.environ, "KIT_DIR": a.kit, "FILE_LIST": a.file_list, "OUTPUT_DIR": row_dir, "RECIPE": "demo",
           "MAX_STEPS": str(steps), "BATCH_SIZE": str(BASE_BATCH), "SAVE_STEPS": str(steps), "IMAGE_LOGGING_STEPS": "0",
           "DISABLE_TQDM": "True",
           "NPROC": str(a.nproc),  # unless the row says otherwise
           **{k: v.format(**fill) for k, v in row.env.items()}}
    args = [x.format(**fill) for x in row.args] + ["--overwrite_output_dir", "True", "--report_to", "none",
                                                    "--save_total_limit", "1"]
    cmd = ["nice", "-n", str(a.nice), "bash", os.path.join(ROOT, "train.sh"), *args]
    log_path = os.path.join(row_dir + ".train.log")
    cpu0, t0 = child_cpu_seconds(), time.time()
    with open(log_path, "w") as log:
        log.write("env: " + json.dumps({k: env[k] for k in sorted(set(row.env) | {"MAX_STEPS", "BATCH_SIZE"})}) + "\n")
        log.write("cmd: " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall, cpu = time.time() - t0, child_cpu_seconds() - cpu0
    text = open(log_path, encoding="utf-8", errors="replace").read()
    for worker_log in sorted(glob.glob(os.path.join(row_dir, "launch_logs", "workerlog.*"))):  # NPROC > 1
        text += open(worker_log, encoding="utf-8", errors="replace").read()
    state = os.path.join(row_dir, "trainer_state.json")
    finished = os.path.isfile(state) and json.load(open(state)).get("global_step") == steps
    if proc.returncode and not finished:
        raise RuntimeError(f"row {name!r}: train.sh failed (exit {proc.returncode}); see {log_path}")
    if proc.returncode:  # seen with NPROC=2: a worker aborts at exit after the final save
        print(f"   warning: train.sh exited with {proc.returncode} after saving step {steps}; see {log_path}",
              flush=True)
    runtime = re.findall(r"train_runtime\W+([\d.]+)", text)
    losses = [float(x) for x in re.findall(r"'loss': '?([\d.]+)", text)] or \
             [float(x) for x in re.findall(r"\bloss: ([\d.]+)", text)]
    train_loss = re.findall(r"train_loss\W+([\d.]+)", text)
    return {"steps": steps, "batch": row.batch, "exit_code": proc.returncode, "processes": int(env["NPROC"]),
            "images": steps * row.batch * int(env["NPROC"]), "wall_seconds": round(wall, 1),
            "train_loss": float(train_loss[-1]) if train_loss else None,
            "cpu_seconds": round(cpu, 1), "train_runtime": float(runtime[-1]) if runtime else None,
            "final_loss": losses[-1] if losses else None, "ema": row.env.get("FLAG_USE_EMA", "1") != "0"}


def eval_row(row_dir: str, ema: bool, seed: int, a, out: str) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--evaluate", "shapes", "--unet_model_name_or_path", row_dir,
           "--seed", str(seed), "--num_seeds", str(a.num_seeds), "--guidance_scale", *map(str, a.guidance),
           "--num_inference_steps", str(a.num_inference_steps), "--scheduler", a.scheduler,
           "--batch_size", "36", "--output_dir", out]
    cmd += ["--variant", "ema" if ema else "none"]
    proc = subprocess.run(["nice", "-n", str(a.nice), *cmd], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"eval failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "shapes_eval.json")) as f:
        res = json.load(f)
    return {g: r["scores"] for g, r in res["guidance"].items()} | {
        "vae round trip": res["reference"].get("vae round trip", {}).get("scores")}


def fmt(s: Optional[dict]) -> str:
    """colour / shape / background / all three, % right."""
    if not s:
        return "– / – / – / –"
    return " / ".join("100" if s[m] == 1 else f"{100 * s[m]:.1f}" for m in ("colour", "shape", "background", "all"))


def write_table(results: dict, out_dir: str, guidance: str) -> str:
    """ablation.md: one line per row at guidance ``guidance`` (tuning seeds, then report seeds)."""
    tune, report = results["tune_seeds"], results["report_seeds"]
    lines = [f"Shapes benchmark at guidance {guidance}: % right, colour / shape / background / all three (36 prompts × "
             f"{results['num_seeds']} seeds; {results['scheduler']} {results['num_inference_steps']} steps). Budget: "
             f"{results['steps']} steps of batch {BASE_BATCH} per process, {results.get('nproc', 1)} process(es) "
             "unless "
             "the row says otherwise (other batch sizes: the same number of images).", "",
             f"| row | change | steps × batch × processes (images) | tuning seeds {tune[0]}–{tune[-1]} "
             f"| report seeds {report[0]}–{report[-1]} | wall min | CPU min | final loss |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        t = r.get("train", {})
        images = t.get("images", 0)
        lines.append(f"| {name} | {ROWS[name].what if name in ROWS else ''} | {t.get('steps')} × {t.get('batch')} × "
                     f"{t.get('processes', 1)} ({images / 1000:g} k) | {fmt(r.get('tune', {}).get(guidance))} | "
                     f"{fmt(r.get('report', {}).get(guidance))} | {t.get('wall_seconds', 0) / 60:.1f} | "
                     f"{t.get('cpu_seconds', 0) / 60:.1f} | {t.get('final_loss')} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "ablation.md"), "w") as f:
        f.write(table)
        for g in results["guidance"]:
            if f"{g:g}" != guidance:
                f.write(f"\nAt guidance {g:g}:\n\n| row | tuning seeds | report seeds |\n|---|---|---|\n")
                for name, r in results["rows"].items():
                    f.write(f"| {name} | {fmt(r.get('tune', {}).get(f'{g:g}'))} | "
                            f"{fmt(r.get('report', {}).get(f'{g:g}'))} |\n")
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Ablation of train.sh's CPU default on the shapes benchmark (see the "
                                            "docstring).")
    p.add_argument("--output_dir", default="./ablation", help="row folders, ablation.json, ablation.md")
    p.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows to run, from: {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=1000,
                   help="budget: optimizer steps at batch 32 per process (1000: the budget of docs/ablation.md's "
                   "tables, the CPU default's before it became 3000 steps of batch 16)")
    p.add_argument("--nproc", type=int, default=2,
                   help="training processes per row unless the row sets NPROC (train.sh's CPU default is 2)")
    p.add_argument("--kit", default="./tiny-sd", help="the offline kit (python -m sd.kit)")
    p.add_argument("--file_list", default="./data/filelist/train.filelist.list", help="the demo data's filelist")
    p.add_argument("--guidance", type=float, nargs="+", default=[5.0], help="guidance scales scored (e.g. 3 5 7.5)")
    p.add_argument("--table_guidance", type=float, default=5.0, help="guidance scale of the main table")
    p.add_argument("--tune_seed", type=int, default=0, help="first tuning seed")
    p.add_argument("--report_seed", type=int, default=1000, help="first report seed (held out while tuning)")
    p.add_argument("--num_seeds", type=int, default=4, help="seeds per prompt per seed set")
    p.add_argument("--num_inference_steps", type=int, default=25, help="sampler steps")
    p.add_argument("--scheduler", default="ddim", help="sampler (eval.py --scheduler)")
    p.add_argument("--nice", type=int, default=5, help="niceness of training and eval")
    p.add_argument("--table", action="store_true", help="only rewrite ablation.md from ablation.json")
    a = p.parse_args(argv)
    unknown = [r for r in a.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    os.makedirs(a.output_dir, exist_ok=True)
    a.output_dir, a.kit, a.file_list = (os.path.abspath(x) for x in (a.output_dir, a.kit, a.file_list))
    path = os.path.join(a.output_dir, "ablation.json")
    results = json.load(open(path)) if os.path.isfile(path) else {"rows": {}}
    results.update(steps=a.steps, nproc=a.nproc, num_seeds=a.num_seeds, scheduler=a.scheduler, guidance=a.guidance,
                   num_inference_steps=a.num_inference_steps, tune_seeds=[a.tune_seed + i for i in range(a.num_seeds)],
                   report_seeds=[a.report_seed + i for i in range(a.num_seeds)])
    if not a.table:
        if not os.path.isfile(os.path.join(a.kit, "model_index.json")):
            p.error(f"no kit at {a.kit}: build it with `python -m sd.kit --output_dir {a.kit}` (or run `sh train.sh` "
                    "once)")
        if not os.path.isfile(a.file_list):
            p.error(f"no data at {a.file_list}: run `sh train.sh` once (it makes the demo data), or pass --file_list")
        if "random text encoder" in a.rows:
            make_random_text_encoder(a.kit, os.path.join(a.output_dir, RANDOM_TEXT_ENCODER))
        for name in a.rows:
            row_dir = os.path.join(a.output_dir, re.sub(r"\W+", "_", name))
            print(f"== {name}: {ROWS[name].what}", flush=True)
            source = ROWS[name].raw_weights_of
            if source:  # the same training run, its raw weights
                if source not in results["rows"] or results["rows"][source]["train"]["steps"] != a.steps:
                    raise SystemExit(f"row {name!r} needs row {source!r} at {a.steps} steps first")
                train = {**results["rows"][source]["train"], "ema": False}
                row_dir = os.path.join(a.output_dir, re.sub(r"\W+", "_", source))
                evals = ("eval_tune_raw", "eval_report_raw")
            elif os.path.isfile(os.path.join(row_dir, "ablation_train.json")):  # trained by an interrupted run
                train = json.load(open(os.path.join(row_dir, "ablation_train.json")))
                if train["steps"] != a.steps * BASE_BATCH // ROWS[name].batch:
                    raise SystemExit(f"{row_dir} was trained for {train['steps']} steps; remove it or use another "
                                     "--output_dir")
                evals = ("eval_tune", "eval_report")
            else:
                train = train_row(name, ROWS[name], a, row_dir)
                with open(os.path.join(row_dir, "ablation_train.json"), "w") as f:
                    json.dump(train, f, indent=2)
                evals = ("eval_tune", "eval_report")
            print(f"   trained {train['steps']} steps × {train['batch']} in {train['wall_seconds'] / 60:.1f} min wall, "
                  f"{train['cpu_seconds'] / 60:.1f} min CPU; final loss {train['final_loss']}", flush=True)
            r = {"train": train, "env": ROWS[name].env, "args": ROWS[name].args}
            r["tune"] = eval_row(row_dir, train["ema"], a.tune_seed, a, os.path.join(row_dir, evals[0]))
            r["report"] = eval_row(row_dir, train["ema"], a.report_seed, a, os.path.join(row_dir, evals[1]))
            results["rows"][name] = r
            with open(path, "w") as f:
                json.dump(results, f, indent=2)
            g = f"{a.table_guidance:g}"
            print(f"   guidance {g}: tuning seeds {fmt(r['tune'][g])}; report seeds {fmt(r['report'][g])} "
                  "(colour | shape | background | all, %)", flush=True)
    print(write_table(results, a.output_dir, f"{a.table_guidance:g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
