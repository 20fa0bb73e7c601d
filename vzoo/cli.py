"""The ``vzoo`` command: ``vzoo list`` shows what the zoo holds, ``vzoo bench`` measures it, ``vzoo train TASK`` /
``vzoo eval`` fine-tune and evaluate. Bad input ends in one line ``vzoo: error: ...`` and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import torch


def _list(_: argparse.Namespace) -> int:
    from vzoo.kernels import backend_status
    from vzoo.registry import OPS, methods

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    status = {d: backend_status(d) for d in devices}
    training = {d: backend_status(d, needs_grad=True) for d in devices}
    print("ops (vzoo.kernels):")
    for name, (doc, backends) in OPS.items():
        print(f"  {name}: {doc}")
        for dev in devices:
            runs = [b if training[dev][b] is None else f"{b} (forward only)" for b in backends if status[dev][b] is None]
            print(f"    {dev}: runs with {', '.join(runs) or 'none'}")
    print("backends that cannot run here:")
    for dev in devices:
        for b, why in status[dev].items():
            if why is not None:
                print(f"  {b} on {dev}: {why}")
    found = methods()
    print("methods:" if found else "methods: none registered yet")
    for m in found:
        print(f"  {m.name} [{m.modality}] {m.paper} (arXiv {m.arxiv}) ops={','.join(m.ops)} {m.status}")
    return 0


def _bench_backbones(args: argparse.Namespace, device: str) -> None:
    import timm

    import vzoo  # noqa: F401  (registers the timm models)
    from vzoo.bench import backbone_rows, format_models

    groups = {  # each vzoo model next to timm models of similar FLOPs
        "biformer_tiny": ["convnextv2_nano", "pvt_v2_b1"] + ([] if args.quick else ["swin_tiny_patch4_window7_224"]),
        "overlock_t": ["convnext_tiny", "biformer_small"],
    }
    batch = 8 if device == "cpu" else 128
    for ours, others in groups.items():
        print(f"\nbackbones: batch {batch}, 224x224, train step (fwd+bwd) and eval forward, median of {args.repeats}")
        names = [ours, *others]
        rows = backbone_rows({n: (lambda n=n: timm.create_model(n)) for n in names}, batch=batch, repeats=args.repeats, device=device)
        print(format_models(rows, ours))


def _bench_neighborhood(args: argparse.Namespace, device: str) -> None:
    from vzoo.bench import neighborhood_rows

    print("\nneighborhood_aggregate (ContMix): fwd+bwd, B=2 C=256 50x68 K=13 8 groups, fast backend vs reference (unfold)")
    fast, ref = neighborhood_rows(device=device, repeats=args.repeats)
    print(f"  {ref.name}: {ref.ms:.1f} ms   {fast.name}: {fast.ms:.1f} ms   {ref.ms / fast.ms:.2f}x faster")


def _bench_video(args: argparse.Namespace) -> None:
    from vzoo.bench_video import format_video, video_rows

    grid = (16, 32, 32)
    print(f"\nvideo sparse attention: grid {grid} (16384 tokens), 4 heads x 64, fp32 CPU, structured inputs, median of {args.repeats}")
    print(format_video(video_rows(grid, repeats=args.repeats)))


def _bench_lm(args: argparse.Namespace) -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        print("\nlanguage models: skipped (pip install 'vzoo[lm]' for transformers)")
        return
    from vzoo.bench_lm import format_lm, lm_rows

    tokens = [16384] if args.quick else [8192, 16384]
    print(f"\nlanguage-model prefill: narrow Llama (4 layers, 4 heads of 64), fp32 CPU, KV cache on, median of {args.repeats}")
    print(format_lm(lm_rows(tokens, args.repeats)))


def _bench_linear(args: argparse.Namespace) -> None:
    import importlib.util

    from vzoo.bench_linear import (
        check_linear_bar, decode_rows, format_decode, format_speed, layer_decode_rows, speed_rows,
    )

    repeats = min(args.repeats, 2)
    print(f"\nlinear and recurrent attention vs causal SDPA: B=1 H=4 D=64 fp32 CPU, median of {repeats}")
    speed = speed_rows([8192, 16384, 32768], modes=("fwd",), ops=["lightning", "rat (chunk 16)"], repeats=repeats)
    speed += speed_rows([32768], modes=("fwd+bwd",), ops=["lightning"], repeats=repeats)
    print(format_speed(speed))
    decode = decode_rows()
    if importlib.util.find_spec("transformers") is not None:
        from vzoo.lm import LightningConfig, RATConfig

        decode += layer_decode_rows({"sdpa": None, "lightning": LightningConfig(), "rat (chunk 16)": RATConfig()})
    print(format_decode(decode))
    print("\n".join(check_linear_bar(speed, decode)))
    if importlib.util.find_spec("transformers") is not None:
        from vzoo.mqar import format_table, mqar_rows

        print(format_table(mqar_rows(quick=True), "\nMQAR (multi-query associative recall): tiny 2-layer models "
                           "trained from scratch, quick budget (benchmarks/linear.py trains to convergence)"))


def _generate(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from diffusers import DiffusionPipeline
    from diffusers.utils import export_to_gif, export_to_video

    from vzoo.atomic import write_atomic
    from vzoo.pipelines import apply_sparse_attention, make_config

    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif", ".png"):
        raise ValueError(f"--out {out} must end in .mp4, .gif or .png")
    if not (Path(args.model) / "model_index.json").is_file():
        raise ValueError(f"--model {args.model} is not a diffusers pipeline folder (no model_index.json)")
    rank = _start_ulysses(args.ulysses) if args.ulysses > 1 else 0
    pipe = DiffusionPipeline.from_pretrained(args.model)
    if args.ulysses > 1:
        _ulysses_pipeline(pipe, args.ulysses)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    config = make_config(args.method, **({"seed": args.seed} if args.method == "psa" else {}))  # PSA's sampled offsets follow --seed
    with apply_sparse_attention(pipe, config) as handle:
        frames = pipe(
            prompt=args.prompt, num_frames=args.frames, height=args.height, width=args.width,
            num_inference_steps=args.steps, generator=generator, output_type="pil",
        ).frames[0]
    wall = time.perf_counter() - start
    densities = [handle.density]
    if args.ulysses > 1:
        import torch.distributed as dist

        densities = [None] * args.ulysses
        dist.all_gather_object(densities, handle.density)
        dist.destroy_process_group()
    if rank != 0:
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".gif":
        write_atomic(out, lambda tmp: export_to_gif(frames, str(tmp), fps=args.fps))
    elif out.suffix.lower() == ".png":  # animated PNG: lossless frames
        duration = round(1000 / args.fps)
        write_atomic(out, lambda tmp: frames[0].save(tmp, format="PNG", save_all=True, append_images=frames[1:], duration=duration, loop=0))
    else:
        write_atomic(out, lambda tmp: export_to_video(frames, str(tmp), fps=args.fps))
    density = "dense" if handle.density is None else (
        f"{sum(densities) / len(densities):.3f} (sparse layers and steps; {handle.dense_calls} of {handle.sparse_calls} calls "
        "above the break-even ran dense)"
    )
    if len(densities) > 1 and handle.density is not None:  # each rank attends its share of the heads
        density += "; per rank " + ", ".join(f"{d:.3f}" for d in densities) + ", the mean is the whole call's"
    print(f"wrote {out}: {len(frames)} frames in {wall:.1f} s; attention density {density}")
    return 0


def _start_ulysses(degree: int) -> int:
    """Join the torchrun process group (nccl on GPU, gloo on CPU); returns this process's rank."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != degree:
        raise ValueError(
            f"--ulysses {degree} needs {degree} processes, found WORLD_SIZE={world}: "
            f"torchrun --nproc_per_node {degree} --no-python vzoo generate ... --ulysses {degree}"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def _ulysses_pipeline(pipe, degree: int) -> None:
    """Each transformer of ``pipe`` under Ulysses context parallelism; the pipeline on this rank's GPU."""
    from vzoo.pipelines.parallel import enable_context_parallel

    if torch.cuda.is_available():
        pipe.to(f"cuda:{torch.cuda.current_device()}")
    for transformer in (pipe.transformer, getattr(pipe, "transformer_2", None)):
        if transformer is not None:
            enable_context_parallel(transformer, ulysses_degree=degree)


_TASKS = ("reid", "detect", "ground")


def _task_run(task: str, model: str, data: str, args: argparse.Namespace):
    import random

    random.seed(args.seed)
    torch.manual_seed(args.seed)  # model initialisation and augmentation draw from the global generator
    if task == "reid":
        from vzoo.tasks.reid import reid_run

        return reid_run(model, data, args.batch_size, tuple(args.image_size), args.pretrained, args.seed, placement=args.attention)
    if task == "detect":
        from vzoo.tasks.detection import detection_run

        return detection_run(model, data, args.batch_size, args.image_size, args.pretrained, args.seed, args.detector, args.rois_per_image)
    from vzoo.tasks.grounding import grounding_run

    return grounding_run(model, data, args.batch_size, tuple(args.image_size), args.pretrained, args.seed, args.text_encoder)


def _train(args: argparse.Namespace) -> int:
    import json

    if args.task == "lm-gates":
        from vzoo.lm.train_gates import train_gates_from_files

        train_gates_from_files(args.model, args.data, args.out, steps=args.steps, seq_len=args.seq_len,
                               block_size=args.block_size, lr=args.lr)
        return 0
    if args.task == "lm-landmark":
        from vzoo.lm.train_landmark import train_landmark_from_files

        metrics = train_landmark_from_files(
            args.model, args.data, args.out, block=args.block, steps=args.steps, seq_len=args.seq_len, lr=args.lr,
            batch_size=args.batch_size, resume=args.resume, ckpt_every=args.ckpt_every, seed=args.seed,
            stop_after=args.stop_after,
        )
        if metrics:
            print(json.dumps(metrics))
        return 0
    if args.task == "lm-diffusion":
        from vzoo.lm.train_diffusion import train_diffusion_from_files

        metrics = train_diffusion_from_files(
            args.model, args.data, args.out, block=args.block, objective=args.objective, steps=args.steps,
            seq_len=args.seq_len, lr=args.lr, batch_size=args.batch_size, resume=args.resume, ckpt_every=args.ckpt_every,
            seed=args.seed, stop_after=args.stop_after,
        )
        if metrics:
            print(json.dumps(metrics))
        return 0
    if args.task == "lm-boundaries":
        from vzoo.lm.train_boundaries import train_boundaries_from_files

        print(train_boundaries_from_files(args.model, args.data, args.out, steps=args.steps, seq_len=args.seq_len,
                                          lr=args.lr, batch_size=args.batch_size))
        return 0
    from vzoo.tasks.trainer import TrainSettings, train

    settings = TrainSettings(
        epochs=args.epochs, out=args.out, lr=args.lr, resume=args.resume, amp=args.amp, eval_every=args.eval_every,
        ckpt_every=args.ckpt_every, stop_after=args.stop_after,
    )
    metrics = train(_task_run(args.task, args.model, args.data, args), settings)
    if metrics:
        print(json.dumps(metrics))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from vzoo.lm.analysis import analyze_rhythm

    analyze_rhythm(args.model, args.text, args.out, gguf_file=args.gguf_file, prompt_tokens=args.prompt_tokens,
                   max_tokens=args.max_tokens)
    print(f"written: {args.out}/rhythm.json and {args.out}/rhythm.png")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    import json

    from vzoo.experiments.icl_linear import ICLConfig, run_icl_linear

    config = ICLConfig(d=args.d, context=args.context, heads=args.heads, steps=args.steps, seed=args.seed,
                       anisotropic=args.anisotropic)
    metrics = run_icl_linear(args.out, config)
    print("\n".join(metrics["bar"]))
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    return 0


def _reid_search(args: argparse.Namespace) -> int:
    from vzoo.tasks.reid_search import search

    search(args.model, args.data, args.placements, epochs=args.epochs, batch_size=args.batch_size, out=args.out,
           size=tuple(args.image_size), lr=args.lr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from vzoo.tasks.trainer import describe_changes, load_checkpoint

    state = load_checkpoint(args.checkpoint)
    meta = state.get("meta", {})
    if meta.get("task") != args.task:
        raise ValueError(f"--checkpoint {args.checkpoint} is a {meta.get('task')!r} checkpoint, not {args.task!r}")
    vars(args).update(image_size=meta.get("size"), detector=meta.get("detector", "fasterrcnn"), pretrained=False,
                      rois_per_image=meta.get("rois_per_image", 512), text_encoder=meta.get("text_encoder", "minilm"),
                      attention=meta.get("placement", "none"))
    run = _task_run(args.task, meta["model"], args.data, args)
    changes = describe_changes(meta, run.meta, skip=("batch_size",))
    if changes:
        raise ValueError(f"--data {args.data} is not the dataset of --checkpoint {args.checkpoint} ({changes})")
    run.model.load_state_dict(state["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = run.evaluate(run.model.to(device), device)
    print(json.dumps(metrics))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from vzoo.bench import check_bar, format_table, kernel_rows, save_plot

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.quick:
        seq_lens, blocks = [8192], [6]
    else:
        seq_lens, blocks = [2048, 4096, 8192, 16384], [3, 6, 16]
    print(f"block-sparse attention: B=1 H=4 D=64 block=128 {args.dtype} on {device}, median of {args.repeats}")
    rows = kernel_rows(seq_lens, blocks, device=device, dtype=dtype, repeats=args.repeats)
    print(format_table(rows))
    verdicts = check_bar(rows)
    print("\n".join(verdicts))
    if args.plot:
        save_plot(rows, args.plot)
        print(f"plot saved to {args.plot}")
    _bench_neighborhood(args, device)
    _bench_video(args)
    _bench_lm(args)
    _bench_linear(args)
    _bench_backbones(args, device)
    return 1 if args.strict and not all(v.startswith("PASS") for v in verdicts) else 0


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``vzoo: error: ...`` (exit code 2), instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vzoo: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


_POSITIVE, _NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


def _add_train_parsers(sub) -> None:
    """``vzoo train TASK``: one sub-command per task, each listing only its own options."""
    tr = sub.add_parser("train", help="fine-tune a timm backbone on re-ID, detection or grounding data, or train "
                        "SeerAttention gates (lm-gates) or DHSA boundary predictors (lm-boundaries) of a saved causal LM, "
                        "or fine-tune one for Landmark Attention (lm-landmark) or into a block-diffusion LM (lm-diffusion)")
    tasks = tr.add_subparsers(dest="task", required=True, metavar="TASK")
    common = argparse.ArgumentParser(add_help=False)  # the options every vision task shares
    common.add_argument("--model", required=True, help="timm model name (vzoo's included)")
    common.add_argument("--data", required=True, metavar="DIR", help="dataset folder")
    common.add_argument("--out", required=True, metavar="DIR", help="output folder (last.pt, metrics.json, curves.png)")
    common.add_argument("--epochs", type=_POSITIVE, default=10)
    common.add_argument("--batch-size", type=_POSITIVE, default=32)
    common.add_argument("--lr", type=float, default=3.5e-4)
    common.add_argument("--resume", action="store_true", help="continue from DIR/last.pt (same epochs, batch size and model)")
    common.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    common.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (downloads)")
    common.add_argument("--eval-every", type=_POSITIVE, default=1, help="epochs between evaluations")
    common.add_argument("--ckpt-every", type=_NON_NEGATIVE, default=0, help="steps between extra checkpoints (0: epoch ends only)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--stop-after", type=_NON_NEGATIVE, default=0, help=argparse.SUPPRESS)  # tests: simulate a kill
    reid = tasks.add_parser("reid", parents=[common], help="person re-identification on a Market-1501 folder")
    reid.add_argument("--image-size", type=_POSITIVE, nargs=2, metavar=("H", "W"), default=[256, 128])
    reid.add_argument("--attention", default="none", metavar="PLACEMENT", help="attention blocks, e.g. lite:3,4 or se:1,2,3,4")
    det = tasks.add_parser("detect", parents=[common], help="object detection on COCO-format data")
    det.add_argument("--image-size", type=_POSITIVE, nargs="+", metavar="SIZE", help="min (and max) resize side (default 800 1333)")
    det.add_argument("--detector", default="fasterrcnn", choices=["fasterrcnn", "retinanet"])
    det.add_argument("--rois-per-image", type=_POSITIVE, default=512, help="Faster R-CNN RoIs sampled per image")
    gr = tasks.add_parser("ground", parents=[common], help="answer grounding: the image region that answers a question")
    gr.add_argument("--image-size", type=_POSITIVE, nargs=2, metavar=("H", "W"), default=[256, 256])
    gr.add_argument("--text-encoder", default="minilm", choices=["minilm", "hash"], help="question encoder")
    lm = argparse.ArgumentParser(add_help=False)  # the options the language-model tasks share
    lm.add_argument("--model", required=True, metavar="DIR", help="saved transformers model folder")
    lm.add_argument("--data", required=True, metavar="FILE", help="plain-text training file")
    lm.add_argument("--lr", type=float, default=1e-3)
    lm.add_argument("--steps", type=_POSITIVE, default=100, help="optimisation steps")
    lm.add_argument("--seq-len", type=_POSITIVE, default=1024, help="tokens per training sequence")
    gates = tasks.add_parser("lm-gates", parents=[lm], help="train the SeerAttention gates of a saved causal LM")
    gates.add_argument("--out", metavar="FILE", help="gate file (default MODEL/seer_gates.safetensors)")
    gates.add_argument("--block-size", type=_POSITIVE, default=64, help="gate block size")
    bounds = tasks.add_parser("lm-boundaries", parents=[lm], help="train the DHSA chunk-boundary predictors of a saved causal LM")
    bounds.add_argument("--out", metavar="FILE", help="predictor file (default MODEL/dhsa_boundaries.safetensors)")
    bounds.add_argument("--batch-size", type=_POSITIVE, default=1, help="sequences per step")
    finetune = argparse.ArgumentParser(add_help=False)  # what the whole-model fine-tunes add
    finetune.add_argument("--out", required=True, metavar="DIR", help="output folder (last.pt, metrics.json, curves.png, model/)")
    finetune.add_argument("--batch-size", type=_POSITIVE, default=1, help="sequences per step")
    finetune.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (same settings)")
    finetune.add_argument("--ckpt-every", type=_NON_NEGATIVE, default=50, help="steps between checkpoints (0: at the end only)")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--stop-after", type=_NON_NEGATIVE, default=0, help=argparse.SUPPRESS)  # tests: simulate a kill
    mark = tasks.add_parser("lm-landmark", parents=[lm, finetune], help="fine-tune a saved causal LM for Landmark Attention")
    mark.add_argument("--block", type=_POSITIVE, default=50, help="regular tokens per landmark block")
    mark.set_defaults(lr=1e-4)
    dlm = tasks.add_parser("lm-diffusion", parents=[lm, finetune], help="convert a saved causal LM into a block-diffusion LM")
    dlm.add_argument("--block", type=_POSITIVE, default=32, help="diffusion block size in tokens")
    dlm.add_argument("--objective", default="fast-dllm", choices=["fast-dllm", "efficient-dlm"],
                     help="complementary masking with token shift, or position-dependent masking without")
    dlm.set_defaults(lr=1e-4)
    tr.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vzoo", description="vzoo: attention modules for vision and video")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="what the zoo holds and which backends run here").set_defaults(func=_list)
    bench = sub.add_parser("bench", help="benchmark vzoo ops against dense SDPA and compiled FlexAttention")
    bench.add_argument("--quick", action="store_true", help="only the headline case (S=8192, 6 of 64 blocks)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--repeats", type=_POSITIVE, default=5, help="timed repeats per measurement (median)")
    bench.add_argument("--plot", metavar="PNG", help="save a latency plot here")
    bench.add_argument("--strict", action="store_true", help="exit 1 when a bar is missed")
    bench.set_defaults(func=_bench)
    gen = sub.add_parser("generate", help="run a local diffusers video pipeline with sparse attention and save the video")
    gen.add_argument("--model", required=True, metavar="DIR", help="folder of a saved diffusers pipeline")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--method", default="vmoba", choices=["vmoba", "psa", "dense"])
    gen.add_argument("--frames", type=_POSITIVE, default=81)
    gen.add_argument("--height", type=_POSITIVE, default=480)
    gen.add_argument("--width", type=_POSITIVE, default=832)
    gen.add_argument("--steps", type=_POSITIVE, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--fps", type=_POSITIVE, default=16)
    gen.add_argument("--out", required=True, metavar="FILE", help=".mp4, .gif or .png (animated, lossless)")
    gen.add_argument("--ulysses", type=_POSITIVE, default=1, metavar="N",
                     help="context parallelism over N processes (under torchrun --nproc_per_node N; rank 0 writes the video)")
    gen.set_defaults(func=_generate)
    _add_train_parsers(sub)
    rs = sub.add_parser("reid-search", help="train re-ID models with attention blocks at different stages; speed vs mAP")
    rs.add_argument("--model", required=True)
    rs.add_argument("--data", required=True, metavar="DIR")
    rs.add_argument("--placements", nargs="+", default=["none", "lite:4", "lite:3,4", "lite:1,2,3,4", "se:1,2,3,4", "cbam:1,2,3,4", "nonlocal:3"])
    rs.add_argument("--epochs", type=_POSITIVE, default=10)
    rs.add_argument("--batch-size", type=_POSITIVE, default=32)
    rs.add_argument("--lr", type=float, default=3.5e-4)
    rs.add_argument("--image-size", type=_POSITIVE, nargs=2, metavar=("H", "W"), default=[256, 128])
    rs.add_argument("--out", required=True, metavar="DIR")
    rs.set_defaults(func=_reid_search)
    an = sub.add_parser("analyze", help="look inside a causal LM's attention")
    kinds = an.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    rh = kinds.add_parser("rhythm", help="preplan-and-anchor rhythm: WAAD / FAI curves (PNG) and tokens (JSON)")
    rh.add_argument("--model", required=True, metavar="DIR", help="saved transformers model folder")
    rh.add_argument("--gguf-file", metavar="NAME", help="a GGUF file inside DIR to load instead")
    rh.add_argument("--text", required=True, metavar="FILE", help="plain-text file to read")
    rh.add_argument("--out", required=True, metavar="DIR", help="output folder (rhythm.png, rhythm.json)")
    rh.add_argument("--prompt-tokens", type=_NON_NEGATIVE, default=0, help="leading tokens that are the prompt, not the response")
    rh.add_argument("--max-tokens", type=_POSITIVE, default=1024, help="tokens of the text to score")
    an.set_defaults(func=_analyze)
    ex = sub.add_parser("experiment", help="small research experiments with plots")
    exps = ex.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    icl = exps.add_parser("icl-linear", help="in-context linear regression with one-layer multi-head softmax attention")
    icl.add_argument("--out", required=True, metavar="DIR", help="output folder (metrics.json, training/heads/lengths PNGs)")
    icl.add_argument("--heads", type=_POSITIVE, default=4)
    icl.add_argument("--steps", type=_POSITIVE, default=10000)
    icl.add_argument("--seed", type=_NON_NEGATIVE, default=0)
    icl.add_argument("--d", type=_POSITIVE, default=4, help="covariate dimension")
    icl.add_argument("--context", type=_POSITIVE, default=32, help="context examples per task in training")
    icl.add_argument("--anisotropic", action="store_true", help="x ~ N(0, Sigma) with Sigma_ij = 0.5^|i-j|")
    ex.set_defaults(func=_experiment)
    ev = sub.add_parser("eval", help="evaluate a vzoo training checkpoint on the dataset it was trained on")
    ev.add_argument("task", choices=list(_TASKS))
    ev.add_argument("--checkpoint", required=True, metavar="FILE")
    ev.add_argument("--data", required=True, metavar="DIR")
    ev.add_argument("--batch-size", type=_POSITIVE, default=32)
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def entry(argv: Sequence[str] | None = None) -> int:
    """The ``vzoo`` console command: :func:`main`, with bad input reported as one line, not a traceback."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as err:  # an ImportError is a bug, not bad input: it keeps its traceback
        print("vzoo: error: " + " ".join(str(err).splitlines()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
