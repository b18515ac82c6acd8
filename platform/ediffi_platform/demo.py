"""The end-to-end demo on embedded defaults: synthetic shards -> the tiny CLIP fitted to them
(contrastive, standing in for a pretrained CLIP) -> embeddings (Ray Data) -> base model (Ray Train,
2 CPU workers) -> two experts fine-tuned concurrently -> batch generation for held-out captions from
both the base model and the ensemble -> alignment judged from the pixels -> an HTML report, a sample
grid, and the MLflow runs. Every stage resumes when the demo is run again.
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray

from ediffi.conditioning import DropoutConfig
from ediffi.encoders import EncoderConfig
from ediffi.pipeline import SamplerConfig
from ediffi_platform.clip_fit import ClipFitConfig, fit_clip
from ediffi_platform.experts import ExpertPlan, FinetuneConfig, run_finetune
from ediffi_platform.generate import GenerateConfig, run_generate
from ediffi_platform.ingest import ImageFilter, InputConfig
from ediffi_platform.judge import SHAPE_BY_SIZE, alignment, read_labels
from ediffi_platform.precompute import PrecomputeConfig, run_precompute
from ediffi_platform.synthetic import LABELS, SyntheticConfig, make_shard, write_synthetic
from ediffi_platform.tracking import Tracker, TrackingConfig, resolve
from ediffi_platform.train import OptimConfig, TrainConfig, run_training


@dataclass(frozen=True)
class DemoConfig:
    """The demo's sizes (defaults: 9-13 minutes on 2 CPU cores, inside the 15-minute goal; see the README)."""

    workdir: str = "demo"  # everything goes here: data, runs, outputs, mlflow.db, report.html
    rows: int = 4000  # synthetic training rows
    preset: str = "tiny32"  # network preset (its resolution sets the data's; the judge needs >= 32px for shapes)
    batch_size: int = 32  # per worker
    base_steps: int = 1600  # base model steps (2 workers)
    expert_steps: int = 300  # steps per expert (two experts, concurrently)
    lr: float = 4e-3  # peak learning rate
    P_mean: float = 0.0  # training noise centre ln(sigma), above EDM's -1.2: layout, color and shape form at high noise
    clip_steps: int = 500  # contrastive steps fitting the tiny CLIP to the training pairs first (0 = keep it random)
    eval_prompts: int = 100  # held-out captions generated and judged per model
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=18, guidance=3.0))

    def __post_init__(self) -> None:
        if self.clip_steps < 0:
            raise ValueError(f"clip_steps must be >= 0, got {self.clip_steps}")
        for k in ("rows", "batch_size", "base_steps", "expert_steps", "eval_prompts"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


def run_demo(cfg: DemoConfig, progress=print) -> dict:
    """Run (or resume) every stage; returns the summary it also writes to {workdir}/summary.json."""
    t0 = time.time()
    w = Path(cfg.workdir).absolute()
    w.mkdir(parents=True, exist_ok=True)
    say = lambda m: progress(f"[demo {time.time() - t0:5.0f}s] {m}")
    tracking = resolve(TrackingConfig(uri=f"sqlite:///{w / 'mlflow.db'}", artifact_root=(w / "mlruns").as_uri()))
    times: dict[str, float] = {}

    t = time.time()
    _data(cfg, w, say)  # 1. data, the CLIP fitted to it, embeddings
    times["data"] = time.time() - t
    t = time.time()
    train, base = _base(cfg, w, tracking, say)  # 2. the base model: 2 CPU workers
    times["base"] = time.time() - t
    t = time.time()
    experts = _experts(cfg, w, train, base["checkpoint"], say)  # 3. two experts, concurrently
    times["experts"] = time.time() - t
    t = time.time()
    models = {"base": base["checkpoint"], "ensemble": experts["manifest"]}
    held, results = _generate_and_judge(cfg, w, models, tracking, say)  # 4. held-out captions, judged
    times["generate_and_judge"] = time.time() - t

    # 5. Report.
    _log_alignment(tracking, results, cfg)
    grid_path = _grid(w, results["ensemble"]["images"], len(held))
    report = _report(w, cfg, held=held, results=results, base=base, experts=experts, tracking=tracking, times=times)
    summary = {
        "seconds": time.time() - t0,
        "stage_seconds": times,
        "alignment": {k: v["alignment"] for k, v in results.items()},
        "images": str(w / "outputs"),
        "grid": str(grid_path),
        "report": str(report),
        "base_checkpoint": base["checkpoint"],
        "ensemble_manifest": experts["manifest"],
        "mlflow": f"mlflow ui --backend-store-uri {tracking.uri}",
    }
    (w / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


JUDGED = ("color", "shape", "size", "position", "background", "all")  # the judge's labels, all five at once


def standard_error(p: float, n: int) -> float:
    """One binomial standard error of an accuracy p measured on n images."""
    return math.sqrt(p * (1 - p) / n)


def acceptance(alignment: dict, n: int) -> dict[str, bool]:
    """The demo's bar: color and position >= 90 % for both models, and the ensemble's all five not
    below the base's by more than one standard error (of the difference, n images each)."""
    b, e = alignment["base"], alignment["ensemble"]
    se = math.hypot(standard_error(b["all"], n), standard_error(e["all"], n))
    return {
        "color >= 90 %": min(b["color"], e["color"]) >= 0.9,
        "position >= 90 %": min(b["position"], e["position"]) >= 0.9,
        "ensemble all five >= base - 1 SE": e["all"] >= b["all"] - se,
    }


def _data(cfg: DemoConfig, w: Path, say) -> None:
    """Synthetic shards, the tiny CLIP fitted to them (on the cluster, like every stage), embeddings."""
    from ediffi.presets import get_preset

    if not (w / "data" / "synthetic").exists():
        write_synthetic(SyntheticConfig(output=str(w / "data" / "synthetic"), rows=cfg.rows, shards=4), progress=say)
    encoders = EncoderConfig()
    if cfg.clip_steps:
        clip = w / "data" / "clip.safetensors"
        if not clip.exists():
            fit = ClipFitConfig(
                input=InputConfig(path=str(w / "data" / "synthetic")), output=str(clip), steps=cfg.clip_steps
            )
            r = ray.get(ray.remote(num_cpus=1)(fit_clip).remote(fit))
            say(f"clip fit: {r['pairs']} pairs, contrastive loss {r['loss_first']:.2f} -> {r['loss_last']:.2f}")
        else:
            say(f"clip fit: {clip} exists; skipped")
        encoders = EncoderConfig(clip_pretrained=str(clip))
    precompute = PrecomputeConfig(
        input=InputConfig(path=str(w / "data" / "synthetic")),
        output=str(w / "data" / "embeddings"),
        image=ImageFilter(resolution=get_preset(cfg.preset).img_resolution),
        encoders=encoders,
    )
    run_precompute(precompute, progress=say)


def _base(cfg: DemoConfig, w: Path, tracking: TrackingConfig, say) -> tuple[TrainConfig, dict]:
    """The base model's training config and its run's result."""
    train = TrainConfig(
        data=str(w / "data" / "embeddings"),
        preset=cfg.preset,
        steps=cfg.base_steps,
        batch_size=cfg.batch_size,
        num_workers=2,
        cpus_per_worker=0.5,
        threads_per_worker=1,
        optim=OptimConfig(lr=cfg.lr, warmup_steps=min(100, cfg.base_steps // 5)),
        P_mean=cfg.P_mean,
        dropout=DropoutConfig(0.1, 0.1, 0.5),
        ema_decay=0.99,
        checkpoint_every=max(1, cfg.base_steps // 3),
        log_every=max(1, cfg.base_steps // 30),
        sample_images=16,
        output=str(w / "runs"),
        name="base",
        tracking=tracking,
    )
    return train, run_training(train, progress=say)


def _experts(cfg: DemoConfig, w: Path, train: TrainConfig, base: str, say) -> dict:
    """Two experts split at the median of the training noise distribution, fine-tuned at once."""
    expert_train = replace(
        train,
        steps=cfg.expert_steps,
        num_workers=1,
        cpus_per_worker=0.5,
        threads_per_worker=1,
        optim=OptimConfig(lr=cfg.lr / 2, warmup_steps=min(20, cfg.expert_steps // 5)),
        checkpoint_every=cfg.expert_steps,
        log_every=max(1, cfg.expert_steps // 10),
        sample_images=0,
    )
    plan = ExpertPlan(quantiles=(0.5,))
    return run_finetune(
        FinetuneConfig(base=base, plan=plan, train=expert_train, output=str(w / "experts")), progress=say
    )


def _generate_and_judge(cfg: DemoConfig, w: Path, models: dict[str, str], tracking, say) -> tuple[list[dict], dict]:
    """Images of held-out captions from each model, judged from the pixels: (the held-out rows, per model
    its alignment, generation figures and images)."""
    held = make_shard(SyntheticConfig(rows=cfg.eval_prompts, shards=1, seed=12345), 0).to_pylist()
    (w / "prompts.txt").write_text("\n".join(r["caption"] for r in held) + "\n")
    labels = [{k: r[k] for k in LABELS} for r in held]
    results = {}
    for name, model in models.items():
        gen = GenerateConfig(
            prompts=str(w / "prompts.txt"),
            out=str(w / "outputs" / name),
            model=model,
            sampler=cfg.sampler,
            seed=0,
            batch_size=25,
            num_cpus=1.5,
            threads_per_actor=2,
            tracking=tracking,
        )
        summary = run_generate(gen, progress=say)
        images = _images_by_line(w / "outputs" / name)
        scores = alignment([images[i + 1] for i in range(len(held))], labels)
        results[name] = {"alignment": scores, "generation": summary["run"], "images": images}
        say(f"{name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in scores.items()))
    return held, results


def _images_by_line(out: Path) -> dict[int, np.ndarray]:
    import pyarrow.parquet as pq
    from PIL import Image

    meta = pq.read_table(str(out / "metadata")).to_pylist()
    return {m["line"]: np.asarray(Image.open(out / m["image"]).convert("RGB")) for m in meta}


def _grid(w: Path, imgs: dict[int, np.ndarray], n: int) -> Path:
    """Ensemble samples for the first 16 held-out captions, 4x4."""
    import torch
    from PIL import Image

    from ediffi.pipeline import grid

    tiles = torch.from_numpy(np.stack([imgs[i + 1] for i in range(min(16, n))]))
    path = w / "grid.png"
    big = Image.fromarray(grid(tiles, cols=4).numpy())
    big.resize((big.width * 4, big.height * 4), Image.NEAREST).save(path)
    return path


def _log_alignment(tracking, results: dict, cfg: DemoConfig) -> None:
    tracker = Tracker(tracking, run_name="demo-evaluation")
    if not tracker.run_id:
        return
    tracker.params({"eval_prompts": str(cfg.eval_prompts), "sampler.steps": str(cfg.sampler.steps)})
    for name, r in results.items():
        tracker.metrics({f"{name}/{k}": v for k, v in r["alignment"].items()}, 0)
    tracker.finish()


def _svg_curve(points: list[tuple[int, float]], w: int = 360, h: int = 140) -> str:
    if len(points) < 2:
        return "<p>(no curve)</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda x: 30 + (w - 40) * (x - x0) / max(1e-9, x1 - x0)
    sy = lambda y: 10 + (h - 30) * (1 - (y - y0) / max(1e-9, y1 - y0))
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    return (
        f'<svg width="{w}" height="{h}" style="background:#fafafa;border:1px solid #ddd">'
        f'<polyline fill="none" stroke="#c33" stroke-width="1.5" points="{path}"/>'
        f'<text x="32" y="{h - 6}" font-size="10">step {x0}</text>'
        f'<text x="{w - 70}" y="{h - 6}" font-size="10">step {x1}</text>'
        f'<text x="32" y="20" font-size="10">{y1:.3f}</text><text x="32" y="{h - 18}" font-size="10">{y0:.3f}</text>'
        "</svg>"
    )


def _curves(tracking, run_ids: dict[str, str]) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    parts = []
    for name, rid in run_ids.items():
        if not rid:
            continue
        hist = sorted((m.step, m.value) for m in client.get_metric_history(rid, "loss"))
        parts.append(
            f"<div style='display:inline-block;margin:4px'><b>{html.escape(name)}</b><br>{_svg_curve(hist)}</div>"
        )
    return "".join(parts)


def _report(w: Path, cfg: DemoConfig, *, held, results, base, experts, tracking, times) -> Path:
    """report.html: samples per held-out prompt with what the judge read, loss curves, alignment."""
    labels = [{k: r[k] for k in LABELS} for r in held]
    import base64
    import io

    from PIL import Image

    def img_tag(arr: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(arr).resize((96, 96), Image.NEAREST).save(buf, format="PNG")
        return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'

    runs = {"base": base.get("mlflow_run_id")}
    runs.update({n: e.get("mlflow_run_id") for n, e in experts["experts"].items()})
    rows = []
    images = {n: r["images"] for n, r in results.items()}
    for i, (r, lab) in enumerate(zip(held[:24], labels[:24], strict=False)):
        cells = []
        for n in results:
            seen = read_labels(images[n][i + 1])
            ok = " ".join(
                ("&#10003;" if seen[k] == lab[k] else "&#10007;") + k[0] for k in ("color", "shape", "position")
            )
            cells.append(f"<td>{img_tag(images[n][i + 1])}<br><small>{ok}</small></td>")
        rows.append(f"<tr><td>{html.escape(r['caption'])}</td>{''.join(cells)}</tr>")
    columns = (*LABELS, "all", *SHAPE_BY_SIZE.values())
    table = "".join(
        f"<tr><td>{n}</td>"
        + "".join(f"<td>{100 * v['alignment'][k]:.1f}%</td>" if k in v["alignment"] else "<td>-</td>" for k in columns)
        + "</tr>"
        for n, v in results.items()
    )
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>ediffi demo</title>
<style>body{{font-family:sans-serif;margin:24px}} td,th{{padding:4px 8px;border-bottom:1px solid #eee}}</style></head>
<body><h1>ediffi demo report</h1>
<p>{cfg.rows} synthetic rows, preset <b>{cfg.preset}</b>; the tiny CLIP fitted to the training pairs for
{cfg.clip_steps} contrastive steps (0 = random, as shipped); base model {cfg.base_steps} steps on 2 workers, two experts
{cfg.expert_steps} steps each (split at the median of the training noise distribution), Heun {cfg.sampler.steps} steps,
guidance {cfg.sampler.guidance}. Stage times: {", ".join(f"{k} {v:.0f} s" for k, v in times.items())}.</p>
<h2>Text alignment on {len(held)} held-out captions (judged from the pixels)</h2>
<table><tr><th>model</th>{"".join(f"<th>{k}</th>" for k in (*LABELS, "all five", *(f"shape, {s}" for s in SHAPE_BY_SIZE)))}</tr>
{table}</table>
<h2>Training loss</h2>{_curves(tracking, runs)}
<h2>Samples per prompt</h2><table><tr><th>caption</th>{"".join(f"<th>{n}</th>" for n in results)}</tr>{"".join(rows)}</table>
<p>MLflow: <code>mlflow ui --backend-store-uri {html.escape(tracking.uri)}</code></p></body></html>"""
    path = w / "report.html"
    path.write_text(doc)
    return path
