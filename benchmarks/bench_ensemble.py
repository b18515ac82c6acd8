"""eDiff-I's claim at equal compute: one network against the same network split into experts, through
the real jobs (Ray Data precompute, Ray Train, the expert job, the generation job, the judge).

    python benchmarks/bench_ensemble.py                                   # ~2.5 h on 2 cores; resumes
    python benchmarks/bench_ensemble.py --budgets 64000 128000 --captions 100 --workdir /tmp/be-small

For each budget B (images seen, so it transfers across machines) and k experts of E = B * fraction
images each:
- single: one network trained for B images;
- ensemble: the same network trained for B - kE, then split into k experts by each plan, every expert
  fine-tuned for E images (concurrently, by the expert job);
- control (plan `whole`): the same network trained for B - kE, then fine-tuned by the expert job as one
  "expert" over the whole noise range for kE images, with the experts' recipe (half the learning
  rate, a fresh optimiser): what the tail alone is worth, without the split.
All arms share one base run, checkpointed at every B - kE and at every B, so the benchmark costs one
long run plus the experts. Every stage resumes: re-run the same command after an interruption.
Each arm generates one image per held-out caption (same seeds, Heun, guidance), judged from the
pixels with one binomial standard error, and its EDM loss on held-out rows per noise bucket is
measured. Writes results.json, table.md and plot.png to the workdir and logs them to MLflow (its
store in the workdir). The data, CLIP fit and network recipe are the demo's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ediffi.checkpoint import TRAINING_FILES, load_checkpoint
from ediffi.conditioning import DropoutConfig
from ediffi.edm import NoiseDistribution, edm_loss
from ediffi.encoders import EncoderConfig
from ediffi.ensemble import load_ensemble
from ediffi.pipeline import SamplerConfig
from ediffi.presets import get_preset
from ediffi_platform.cluster import ensure_ray
from ediffi_platform.console import job_console
from ediffi_platform.demo import DemoConfig, _data, _images_by_line, standard_error
from ediffi_platform.experts import ExpertPlan, FinetuneConfig, run_finetune
from ediffi_platform.generate import GenerateConfig, run_generate
from ediffi_platform.ingest import ImageFilter, InputConfig
from ediffi_platform.judge import alignment, right_per_image
from ediffi_platform.precompute import PrecomputeConfig, run_precompute
from ediffi_platform.reader import iter_batches
from ediffi_platform.runs import training_state
from ediffi_platform.synthetic import LABELS, SyntheticConfig, make_shard, write_synthetic
from ediffi_platform.tracking import Tracker, TrackingConfig, resolve
from ediffi_platform.train import SIGMA_BUCKETS, OptimConfig, TrainConfig, run_training

BATCH = 64  # images a step, in every run: the base on 2 workers x 32, each expert on 1 worker x 64
JUDGED = ("color", "shape", "size", "position", "background", "all")
# equal-mass quantiles; measured text influence; the paper's (k=3 only); no split: one network over the whole
# range for the k experts' images (the control)
PLANS = ("equal", "auto", "ediffi", "whole")
SETTINGS = ("fraction", "captions", "sampling_steps", "guidance")  # what results.json's figures depend on


def plan_for(name: str, k: int, held: str) -> ExpertPlan | None:
    """The expert plan of that name for k experts (None where it has no k-expert form)."""
    if name == "equal":
        return ExpertPlan(quantiles=tuple(j / k for j in range(1, k)))
    if name == "auto":
        return ExpertPlan(auto=k, auto_data=held, auto_rows=128)
    if name == "whole":
        return ExpertPlan(boundaries=())  # one interval, (0, inf)
    return ExpertPlan() if k == 3 else None  # eDiff-I's quantiles 1/8 and 511/512


def schedule(budgets: list[int], ks: list[int], fraction: float) -> dict[int, dict]:
    """Per budget (images): its steps, the steps of each expert, and each k's prefix of base steps."""
    out = {}
    for b in budgets:
        steps = b // BATCH
        e = max(1, round(steps * fraction))
        prefix = {k: steps - k * e for k in ks}
        if min(prefix.values()) < 1:
            raise SystemExit(f"--fraction {fraction}: at budget {b}, {max(ks)} experts of {e} steps leave no base")
        out[b] = {"steps": steps, "expert_steps": e, "prefix": prefix}
    return out


def base_config(w: Path, demo: DemoConfig, steps: int, tracking: TrackingConfig) -> TrainConfig:
    """The demo's base-model recipe, trained to `steps` (one run, extended milestone by milestone)."""
    return TrainConfig(
        data=str(w / "data" / "embeddings"),
        preset=demo.preset,
        steps=steps,
        batch_size=BATCH // 2,
        num_workers=2,
        cpus_per_worker=0.5,
        threads_per_worker=1,
        optim=OptimConfig(lr=demo.lr, warmup_steps=100),
        P_mean=demo.P_mean,
        dropout=DropoutConfig(0.1, 0.1, 0.5),
        ema_decay=0.99,
        checkpoint_every=500,
        log_every=50,
        sample_images=0,
        output=str(w / "runs"),
        name="base",
        tracking=tracking,
    )


def checkpoint_at(run: Path, step: int) -> str:
    """The base run's complete checkpoint saved at exactly `step`."""
    for c in sorted(run.glob("checkpoint_*")):
        if all((c / f).exists() for f in TRAINING_FILES) and training_state(str(c))["step"] == step:
            return str(c)
    raise SystemExit(
        f"{run}: no checkpoint at step {step}; the base run is past it (budgets or --fraction changed since "
        "this workdir was made): use a new --workdir"
    )


def check_settings(w: Path, a) -> None:
    """A workdir keeps the settings its results were made with; a re-run with others is refused."""
    path, now = w / "settings.json", {k: getattr(a, k) for k in SETTINGS}
    if path.exists() and (was := json.loads(path.read_text())) != now:
        diff = ", ".join(f"{k} {was.get(k)} -> {now[k]}" for k in SETTINGS if was.get(k) != now[k])
        raise SystemExit(f"{w}: its results were made with other settings ({diff}): use a new --workdir")
    path.write_text(json.dumps(now))


def heldout_loss(D, data: str, P_mean: float) -> dict[str, float]:
    """EDM loss on held-out rows per noise bucket (4 fixed noise draws a row, the training distribution)."""
    g = torch.Generator().manual_seed(0)
    per, sig = [], []
    with torch.no_grad():
        for _ in range(4):
            for x, c in iter_batches(data, 256):
                loss, sigma = edm_loss(D, x, c, NoiseDistribution(P_mean, 1.2), g)
                per.append(loss)
                sig.append(sigma)
    per, sig = torch.cat(per), torch.cat(sig)
    out = {"all": per.mean().item()}
    for lo, hi in itertools.pairwise(SIGMA_BUCKETS):
        m = (sig >= lo) & (sig < hi)
        out[f"{lo:g}-{hi:g}"] = per[m].mean().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_ensemble")
    p.add_argument("--budgets", type=int, nargs="+", default=[256000, 512000], help="images seen per arm")
    p.add_argument("--k", type=int, nargs="+", default=[2, 3], help="experts per ensemble")
    p.add_argument("--plans", nargs="+", default=["equal", "auto", "whole"], choices=PLANS)
    p.add_argument("--fraction", type=float, default=1 / 12, help="E, each expert's images, as a fraction of B")
    p.add_argument("--captions", type=int, default=300, help="held-out captions judged per arm")
    p.add_argument("--sampling-steps", type=int, default=18)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--report-only", action="store_true", help="write the table and plot of the arms finished so far")
    a = p.parse_args()
    if min(a.k) < 2:
        p.error("--k: an ensemble has at least 2 experts (the plan 'whole' is the 1-network control)")
    if not 0 < a.fraction < 1 / max(a.k):
        p.error(f"--fraction must be in (0, 1/{max(a.k)})")
    budgets, sched = sorted(a.budgets), schedule(sorted(a.budgets), a.k, a.fraction)
    w = Path(a.workdir).absolute()
    w.mkdir(parents=True, exist_ok=True)
    check_settings(w, a)
    if a.report_only:
        results = json.loads((w / "results.json").read_text()) if (w / "results.json").exists() else {}
        report(a, w, budgets, sched, results, tracking_in(w), held_out(a.captions)[1])
        return
    with job_console("bench-ensemble", str(w)) as con:
        ensure_ray(num_cpus=2)
        run(a, w, budgets, sched, con.say)


def tracking_in(w: Path) -> TrackingConfig:
    """The benchmark's MLflow store, in its workdir."""
    return resolve(TrackingConfig(uri=f"sqlite:///{w / 'mlflow.db'}", artifact_root=(w / "mlruns").as_uri()))


def held_out(n: int) -> tuple[list[str], list[dict]]:
    """The held-out captions every arm draws, and the labels each was made from."""
    rows = make_shard(SyntheticConfig(rows=n, shards=1, seed=12345), 0).to_pylist()
    return [r["caption"] for r in rows], [{k: r[k] for k in LABELS} for r in rows]


def run(a, w: Path, budgets: list[int], sched: dict, say) -> None:
    """Every stage, the base run first; finished stages are read back, not redone."""
    t0 = time.time()
    demo = DemoConfig(workdir=str(w))
    tracking = tracking_in(w)
    results_path = w / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    # 1. Data (the demo's: synthetic rows, the CLIP fitted to them, embeddings), held-out rows and captions.
    _data(demo, w, say)
    held = w / "data" / "held_embeddings"
    if not (held / "manifest.json").exists():
        write_synthetic(SyntheticConfig(output=str(w / "data" / "held_synthetic"), rows=512, shards=1, seed=1))
    run_precompute(
        PrecomputeConfig(
            input=InputConfig(path=str(w / "data" / "held_synthetic")),
            output=str(held),
            image=ImageFilter(resolution=get_preset(demo.preset).img_resolution),
            encoders=EncoderConfig(clip_pretrained=str(w / "data" / "clip.safetensors")),
        ),
        progress=say,
    )
    captions, labels = held_out(a.captions)
    (w / "prompts.txt").write_text("".join(c + "\n" for c in captions))

    def judge(key: str, model: str, ensemble: bool) -> None:
        if key in results:
            return
        out = w / "outputs" / slug(key)
        gen = GenerateConfig(
            prompts=str(w / "prompts.txt"),
            out=str(out),
            model=model,
            sampler=SamplerConfig(steps=a.sampling_steps, guidance=a.guidance),
            seed=0,
            batch_size=50,
            num_cpus=1.5,
            threads_per_actor=2,
            tracking=tracking,
        )
        run_generate(gen, progress=say)
        acc = alignment(arm_images(out, len(labels)), labels)
        D = load_ensemble(model) if ensemble else load_checkpoint(model, use_ema=True)[0]
        results[key] = {"alignment": acc, "loss": heldout_loss(D, str(held), demo.P_mean), "model": model}
        results_path.write_text(json.dumps(results, indent=1))
        say(f"{key}: " + ", ".join(f"{k} {100 * acc[k]:.1f}%" for k in JUDGED))

    # 2. The base run to every milestone (each B - kE and each B), then the single arms, largest budget first.
    milestones = sorted({s for b in budgets for s in (sched[b]["steps"], *sched[b]["prefix"].values())})
    for m in milestones:
        run_training(base_config(w, demo, m, tracking), progress=say)
        say(f"base at step {m} ({m * BATCH} images), {time.time() - t0:.0f} s in")
    for b in reversed(budgets):
        judge(f"{b}/single", checkpoint_at(w / "runs" / "base", sched[b]["steps"]), ensemble=False)

    # 3. The experts of each arm from the base's checkpoint at B - kE, largest budget and k first, the controls last.
    todo = itertools.product(reversed(budgets), sorted(a.k, reverse=True), a.plans)
    for b, k, name in sorted(todo, key=lambda arm: arm[2] == "whole"):  # a stable sort: the order above kept
        plan, key = plan_for(name, k, str(held)), f"{b}/{k} experts, {name}"
        if plan is None or key in results:
            continue
        steps = sched[b]["expert_steps"] * (k if name == "whole" else 1)  # the control: all k experts' images
        expert = replace(
            base_config(w, demo, steps, tracking),
            batch_size=BATCH,
            num_workers=1,
            optim=OptimConfig(lr=demo.lr / 2, warmup_steps=20),
            checkpoint_every=steps,
            threads_per_worker=2 if name == "whole" else 1,  # the control trains alone: both cores
        )
        base = checkpoint_at(w / "runs" / "base", sched[b]["prefix"][k])
        finetune = FinetuneConfig(
            base=base, plan=plan, train=expert, output=str(w / "experts" / slug(key)), name=f"bench {key}"
        )
        judge(key, run_finetune(finetune, progress=say)["manifest"], ensemble=True)

    # 4. Report: table, plot, MLflow.
    report(a, w, budgets, sched, results, tracking, labels)
    say(f"done in {time.time() - t0:.0f} s; {w / 'table.md'}, {w / 'plot.png'}")


def slug(key: str) -> str:
    """A results key as a folder name: "512000/3 experts, auto" -> "512000-k3-auto"."""
    budget, arm = key.split("/")
    return f"{budget}-single" if arm == "single" else f"{budget}-k{arm.split()[0]}-{arm.split()[-1]}"


def label(arm: str) -> str:
    """An arm as the table names it: "3 experts, whole" -> "control: 1 network, 3 experts' tail"."""
    return f"control: 1 network, {arm.split()[0]} experts' tail" if arm.endswith(", whole") else arm


def tail(arm: str, e: int) -> str:
    """What an arm trained after the split, as networks x images ("" for single)."""
    if arm == "single":
        return ""
    k = int(arm.split()[0])
    return f"1 x {k * e:,}" if arm.endswith(", whole") else f"{k} x {e:,}"


def arms(a) -> list[str]:
    """Arm names in table order: single first, then each k and plan."""
    return ["single"] + [f"{k} experts, {n}" for k in a.k for n in a.plans if plan_for(n, k, "") is not None]


def boundaries(model: str) -> str:
    """An ensemble manifest's inner sigma boundaries, as text."""
    doc = json.loads(Path(model).read_text())
    return ", ".join(f"{e['sigma_lo']:.3g}" for e in doc["experts"][1:])


def arm_images(out: Path, n: int) -> list:
    """The arm's image (in `out`) of each of the first n held-out captions, in caption order."""
    images = _images_by_line(out)
    return [images[i + 1] for i in range(n)]


def right_per_caption(out: Path, labels: list[dict]) -> dict[str, np.ndarray]:
    """Per held-out caption, whether the arm's image (in `out`) reads as asked: 1 or 0 per label."""
    return {k: v.astype(float) for k, v in right_per_image(arm_images(out, len(labels)), labels).items()}


def control_of(arm: str) -> str:
    """The control arm for an ensemble arm (the same k's tail as one network); "" for single."""
    return "" if arm == "single" else f"{arm.split()[0]} experts, whole"


def paired(arm: np.ndarray, other: np.ndarray) -> str:
    """The arm's accuracy minus another arm's on the same captions and seeds, and its size in paired standard errors."""
    d = arm - other
    se = d.std(ddof=1) / math.sqrt(len(d))
    return f"{100 * d.mean():+.1f} ({d.mean() / se:+.1f} SE)" if se else f"{100 * d.mean():+.1f}"


def report(a, w: Path, budgets: list[int], sched: dict, results: dict, tracking, labels: list[dict]) -> None:
    """table.md (alignment +- one SE, the paired differences to single and to the control, held-out loss by
    bucket) and plot.png."""
    n = a.captions
    buckets = [f"{lo:g}-{hi:g}" for lo, hi in itertools.pairwise(SIGMA_BUCKETS)]
    head = ["budget (images)", "arm", "tail (nets x images)", "boundaries", *JUDGED]
    head += ["shape vs single", "all vs single", "shape vs control"]
    lines = ["| " + " | ".join(head + [f"loss {b}" for b in buckets]) + " |", "|" + "---|" * (len(head) + len(buckets))]
    for b in budgets:
        rights = {
            arm: right_per_caption(w / "outputs" / slug(f"{b}/{arm}"), labels)
            for arm in arms(a)
            if f"{b}/{arm}" in results
        }
        for arm, right in rights.items():
            r, single, control = results[f"{b}/{arm}"], rights.get("single"), rights.get(control_of(arm))
            acc = r["alignment"]
            cells = ["" if single is None or arm == "single" else paired(right[k], single[k]) for k in ("shape", "all")]
            cells.append("" if control is None or arm == control_of(arm) else paired(right["shape"], control["shape"]))
            row = [f"{b:,}", label(arm), tail(arm, sched[b]["expert_steps"] * BATCH)]
            row.append("" if arm == "single" else boundaries(r["model"]))
            row += [f"{100 * acc[k]:.1f} ± {100 * standard_error(acc[k], n):.1f}" for k in JUDGED]
            row += cells + [f"{r['loss'][k]:.4f}" for k in buckets]
            lines.append("| " + " | ".join(row) + " |")
    (w / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    plot(a, w / "plot.png", budgets, results, buckets)
    tracker = Tracker(tracking, run_name="bench-ensemble")
    if tracker.run_id:
        tracker.params({"budgets": " ".join(map(str, budgets)), "fraction": f"{a.fraction:.4g}", "captions": str(n)})
        for b in budgets:
            for arm in arms(a):
                r = results.get(f"{b}/{arm}")
                if r:
                    tag = arm.replace(" ", "_").replace(",", "")
                    tracker.metrics({f"{tag}/{k}": v for k, v in r["alignment"].items()}, b)
                    tracker.metrics({f"{tag}/loss_{k}": v for k, v in r["loss"].items()}, b)
        for f in ("table.md", "plot.png", "results.json"):
            tracker.artifact(str(w / f))
        tracker.finish()


def plot(a, path: Path, budgets: list[int], results: dict, buckets: list[str]) -> None:
    """Shape, all five and the held-out loss of each noise bucket against the budget, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("shape", "alignment"), ("all", "alignment")] + [(b, "loss") for b in buckets]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), dpi=90)
    for ax, (k, kind) in zip(axes.flat, panels, strict=False):
        for arm in arms(a):
            pts = [(b, results[f"{b}/{arm}"][kind][k]) for b in budgets if f"{b}/{arm}" in results]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            ys = [100 * y for y in ys] if kind == "alignment" else ys
            if kind == "alignment":
                err = [100 * standard_error(y / 100, a.captions) for y in ys]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label(arm))
            else:
                ax.plot(xs, ys, marker="o", label=label(arm))
        ax.set_title(f"{k} (% judged right, ± 1 SE)" if kind == "alignment" else f"held-out loss, sigma {k}")
        ax.set_xlabel("training budget (images)")
    axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
