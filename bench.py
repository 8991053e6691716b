"""bench.py: what one collect+train iteration costs with each encoder, in one Markdown table.

  python bench.py                          # the full CPU table: cnn, dinov2/clip x frozen/partial/full @224 and @112
  python bench.py --device cuda --batch-size 16 --batch-length 64 --updates 10    # the agent's batch, on a GPU
  python bench.py --quick                  # smoke test: tiny random models, 32x32, seconds
  python bench.py --only cnn,dinov2-frozen --pvm-sizes 224 --updates 5 --device cuda
  python bench.py --only cnn,dinov2-frozen,clip-frozen --pvm-sizes 224 --num-envs 1,4,8   # parallel envs
  python bench.py --paper --device cuda    # on a GPU, once: the paper's configuration beside its env-steps/s

An iteration is what `train()` does per update at --train-ratio: collect B*T/ratio env steps (act, feature-cache
entry, replay.add), then one `train_step` (world model + actor-critic). Each row runs `--warmup` iterations,
then `--updates` timed ones. PVMs are the REAL architectures (dinov2-small, clip-vit-base-patch32) with RANDOM
weights (--pvm-random-init): speed and memory do not depend on the weights. Rows marked "off" run with
--no-feature-cache, so the cache's gain is visible.
With N envs (--num-envs, one process each for N > 1, as in train()) an iteration collects V steps of all N envs
and runs the U updates they owe (V = ceil(B*T/ratio / N), U = V*N / (B*T/ratio)); "s/update" is per update.
"encoder ms/frame" is the encoder's time during collection (the PVM's frozen prefix for the feature cache plus
the trained part, or the CNN) over the frames collected: batching N frames into one call is what cuts it.
Memory: each row runs in its own process, forked from this one after the imports and before anything is
built, so its peak RSS (ru_maxrss) is that row's alone on top of the same imported libraries. On CUDA (or with
--spawn) rows run in spawned processes instead (CUDA cannot be re-initialised in a forked child); their RSS
then includes the imports.
Time: wall clock (env-steps/s, updates/s, s/update) and the row process's CPU time (user+sys, all threads). On
a shared CPU the wall clock also counts everyone else's work, so "x CNN" is computed from CPU time there.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import resource
import sys
import time
import weakref

import torch

import pvm_dreamer as pd
import runtime

# The comparison configuration of NM512's dreamerv3-torch (its defaults, a dense GRU). Not one of [D3]'s presets,
# so not among the agent's --size choices: the row that times it adds it to pd.SIZES in its own (forked) process.
NM512 = dict(deter=256, hidden=512, stoch=32, classes=32, depth=32, units=512, blocks=1)
NM512_MEASURED = "8.2 s / 4.8 GB"  # NM512 dreamerv3-torch, one update at this configuration, measured earlier on this CPU
ENCODERS = [pd.encoder_label(p, m) for p in pd.PVMS for m in pd.MODES if p != "none" or m == "full"]  # cnn first
PAPER_ENCODERS = [e for e in ENCODERS if e.split("-")[0] in ("cnn", "dinov2", "clip")]  # the default table
# --paper: the paper's throughput on manipulation (env steps/s, its GPU, size200m), per row of the table
PAPER_ROWS = "cnn,dinov2-frozen,dinov2-partial,dinov2-full"
PAPER_STEPS_S = {"cnn": 26.5, "dinov2-frozen": 15.0, "dinov2-partial": 11.3, "dinov2-full": 11.3}


def run_row(spec: dict) -> dict:
    """Build the agent of one row and time warmup + `updates` collect+train iterations."""
    if spec["args"]["size"] == "nm512":
        pd.SIZES["nm512"] = NM512  # this row's process only (see run_fresh)
    args = pd.Args(**spec["args"])
    device = runtime.resolve_device(args.device)
    if spec.get("count_ops") and args.compile:  # before compiling: each C++ kernel inductor writes gets a profiler
        import torch._inductor.config  # event, so that count_ops sees the fused kernels of a CPU run
        torch._inductor.config.cpp.enable_kernel_profile = True
    runtime.seed_everything(0, False)
    env = pd.make_train_envs(args)
    action_dim = env.action_space.shape[0]
    agent = pd.Dreamer(pd.make_encoder(args), action_dim, args).to(device)
    opt = pd.make_optimizers(agent, args)
    replay = pd.Replay(args.replay_size, env.observation_space.shape, action_dim, 0,
                       pd.feature_cache_shape(agent.wm.encoder, args), streams=args.num_envs)
    collector = pd.Collector(agent, env, replay)  # the train() loop's env side
    collector.reset(seed=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    enc, t_enc, collecting = agent.wm.encoder, [0.0], [False]
    # time the encoder's calls (instance attributes shadow them); --compile fuses them into acting's graphs
    for name in ("forward", "prefix", "from_prefix") if not args.compile else ():
        if hasattr(enc, name):
            def timed(*a, _f=getattr(enc, name), **kw):
                if not collecting[0]:  # an update's encoder calls are the update's, not collection's
                    return _f(*a, **kw)
                sync(); t = time.perf_counter()
                out = _f(*a, **kw)
                sync(); t_enc[0] += time.perf_counter() - t
                return out
            setattr(enc, name, timed)

    def collect(n: int, policy: bool):
        collecting[0] = True
        for _ in range(n):
            collector.step(random_action=not policy)
        collecting[0] = False

    n_envs, steps = args.num_envs, spec["steps_per_update"]
    vec_steps = -(-steps // n_envs)  # V: steps of all N envs per iteration
    updates = max(1, round(vec_steps * n_envs / steps))  # U: the updates they owe at --train-ratio
    collect(args.batch_length, policy=False)  # random prefill: a window in every stream, as learning_starts does
    t_collect = t_train = cpu0 = 0.0
    for i in range(spec["warmup"] + spec["updates"]):
        if i == spec["warmup"]:
            t_collect, t_train, cpu0, t_enc[0] = 0.0, 0.0, time.process_time(), 0.0
        sync(); t0 = time.perf_counter()
        collect(vec_steps, policy=True)
        sync(); t1 = time.perf_counter()
        for _ in range(updates):
            pd.train_step(agent, opt, pd.to_torch(replay.sample(args.batch_size, args.batch_length), device))
        sync(); t2 = time.perf_counter()
        t_collect, t_train = t_collect + t1 - t0, t_train + t2 - t1
    ops = None
    if spec.get("count_ops"):  # one update, then one step of the N envs (acting on N frames, the cache's prefix)
        batch = lambda: pd.to_torch(replay.sample(args.batch_size, args.batch_length), device)  # noqa: E731
        ops = count_ops(lambda: pd.train_step(agent, opt, batch()), device)
        ops["act"] = count_ops(lambda: collect(1, policy=True), device)["compute"] / n_envs
    env.close()
    total, n, cpu = t_collect + t_train, spec["updates"] * updates, time.process_time() - cpu0
    frames = spec["updates"] * vec_steps * n_envs
    return dict(s_update=total / n, cpu_s_update=cpu / n, updates_s=n / total, env_steps_s=frames / total,
                collect_frac=t_collect / total, enc_ms_frame=None if args.compile else 1e3 * t_enc[0] / frames,
                rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB; this process
                env_rss_gb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20 if n_envs > 1 else 0.0,
                cuda_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                cached="feat" in replay.data, ops=ops)


# aten ops that launch no kernel of their own: views, allocations, dtype/device dispatch, reads of a value
NO_KERNEL = {"as_strided", "view", "expand", "expand_as", "view_as", "transpose", "t", "t_", "permute", "movedim",
             "select", "slice", "narrow", "unsqueeze", "unsqueeze_", "squeeze", "squeeze_", "unflatten", "flatten",
             "reshape", "_reshape_alias", "_unsafe_view", "alias", "split", "split_with_sizes", "chunk", "unbind",
             "unfold", "detach", "lift_fresh", "resolve_conj", "resolve_neg", "numpy_T", "empty", "empty_like",
             "empty_strided", "set_", "contiguous", "to", "_to_copy", "result_type", "item", "_local_scalar_dense"}


def count_ops(update, device) -> dict:
    """One update under torch.profiler. aten: how many aten op calls it makes (every call, nested ones included).
    compute: the calls that do the work, i.e. kernels: an aten op outside NO_KERNEL with no such op below it
    (aten::linear -> addmm counts once), plus each kernel inductor generated (--compile). That is the
    device-agnostic measure of how launch-bound an update is: at the NM512 configuration, eager, 3de97af, the
    CPU's count is 12,410 and the H200 launched 12,228 kernels. reads: reads of a tensor's value (.item()), each
    a wait for the device on a GPU (on a CPU, CPU-only kernels make some: fused Adam's, one_hot's range check).
    On CUDA also the kernels it launched."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        update()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    below = {}  # id -> whether an aten op below this one computes

    def computes_below(e):
        if id(e) not in below:
            below[id(e)] = any(c.name[6:] not in NO_KERNEL or computes_below(c)
                               for c in e.cpu_children if c.name.startswith("aten::"))
        return below[id(e)]

    leaves = sum(1 for e in aten if e.name[6:] not in NO_KERNEL and not computes_below(e))
    generated = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU and "cpp_fused" in e.name)
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA) if device.type == "cuda" else None
    reads = sum(1 for e in aten if e.name == "aten::_local_scalar_dense")  # .item(): on a GPU, a wait for it
    return dict(aten=len(aten), compute=leaves + generated, kernels=kernels, reads=reads)


# ---------------------------------------------------------------------------------------------------------
# --memory: what an update holds for its backward passes, part by part (counted, not timed)
# ---------------------------------------------------------------------------------------------------------
# A saved tensor belongs to the part of the agent whose function is innermost on the stack when it is saved.
PARTS = {"CNNEncoder.forward": "encoder", "PVMEncoder.forward": "encoder", "PVMEncoder.from_prefix": "encoder",
         "PVMEncoder._head": "encoder head", "PVMEncoder.embed": "encoder head", "RSSM.observe": "RSSM scan",
         "RSSM.prior": "heads + losses", "Decoder.forward": "decoder", "WorldModel.loss": "heads + losses",
         "Dreamer.imagine": "rollout", "Dreamer.ac_loss": "critic + losses"}
WM_PARTS = ("encoder", "encoder head", "RSSM scan", "decoder", "heads + losses")
AC_PARTS = ("rollout", "critic + losses")


def held_for_backward(args: pd.Args, action_dim: int = 6, fake: bool = True) -> dict:
    """Bytes one update keeps for its two backward passes (world model; actor-critic), per part (PARTS), and the
    bytes of the states: weights, and for those that train their gradients and Adam's two moments. Counted on
    FAKE tensors (torch's FakeTensorMode: shapes, dtypes and the CPU's kernel choices, no data, no memory), so the
    paper's configuration takes seconds on any machine; fake=False counts the same on real CPU tensors (tests
    compare the two).

    Saved tensors are what autograd keeps from the forward pass until the backward pass frees them (counted once
    per storage with saved_tensors_hooks; parameters excluded): at the end of a forward pass they are the bulk of
    what an accelerator's memory holds beyond the states. "encoder" is the ViT (or the CNN), "encoder head" the
    final norm and the projection to the embedding after it. Not counted: the transient memory of the backward
    pass itself (gradients of activations; a checkpointed segment's recomputed inside: "recompute" gives the
    largest segment's saved bytes, with a nested segment's inside added to its parent's) and allocator slack.
    Under --precision bf16 the CPU's autocast runs, which casts as CUDA's does."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils import checkpoint as ckpt_mod

    agent = pd.Dreamer(pd.make_encoder(args), action_dim, args)
    nbytes = lambda ts, train: sum(t.numel() * t.element_size() for t in ts if t.requires_grad == train)  # noqa: E731
    # a trained weight has its gradient and Adam's two moments beside it; frozen weights and buffers only themselves
    states = 4 * nbytes(agent.parameters(), True) + nbytes(agent.parameters(), False) + nbytes(agent.buffers(), False)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    for m in agent.modules() if fake else ():  # the same modules, on fake tensors (real weights are not needed)
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(mode.from_tensor(p.data), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = mode.from_tensor(b)
    params = {p.untyped_storage()._cdata for p in agent.parameters()}
    saved, chains = [], [0]  # chains[-1]: the largest recompute below the segment being counted (its children's)

    def pack(t):
        f = sys._getframe(1)
        while f is not None and f.f_code.co_qualname not in PARTS:
            f = f.f_back
        saved.append((weakref.ref(t), PARTS[f.f_code.co_qualname] if f is not None else "other"))
        return t  # the graph holds t until its backward pass (or until the graph is dropped)

    def held():  # the storages of saved tensors still alive, once each, per part
        parts, counted_ = {}, set()
        for ref, part in saved:
            t = ref()
            storage = None if t is None else t.untyped_storage()
            if storage is not None and storage._cdata not in params and storage._cdata not in counted_:
                counted_.add(storage._cdata)
                parts[part] = parts.get(part, 0) + storage.nbytes()
        saved.clear()
        return parts

    plain = ckpt_mod.checkpoint

    def counted(fn, *a, **kw):  # a checkpointed segment's inside: saved again while its backward recomputes it
        inner = set()

        def pack_inner(t):
            inner.add((t.untyped_storage()._cdata, t.untyped_storage().nbytes()))
            return t

        chains.append(0)
        with torch.autograd.graph.saved_tensors_hooks(pack_inner, lambda t: t):
            fn(*a, **{k: v for k, v in kw.items() if k not in ("use_reentrant", "preserve_rng_state")})
        # nested (--grad-checkpoint nested): while a child segment recomputes, its parent's recomputed inside is
        # held too, so a segment's peak is its own inside plus its largest child's
        below = chains.pop()
        chains[-1] = max(chains[-1], sum(n for _, n in inner) + below)
        return plain(fn, *a, **kw)

    validate = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)  # its checks read values: fakes have none
    ckpt_mod.checkpoint = counted
    try:
        with mode:
            B, T, hw = args.batch_size, args.batch_length, args.image_size
            batch = dict(image=torch.zeros(B, T, hw, hw, 3, dtype=torch.uint8), action=torch.zeros(B, T, action_dim),
                         reward=torch.zeros(B, T), is_first=torch.zeros(B, T, dtype=torch.bool),
                         is_terminal=torch.zeros(B, T, dtype=torch.bool))
            shape = pd.feature_cache_shape(agent.wm.encoder, args)
            if args.feature_cache and shape is not None:
                batch["feat"] = torch.zeros(B, T, *shape, dtype=torch.float16)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), pd.autocast(agent):
                losses, (deter, stoch) = agent.wm.loss(batch)
            wm = held()  # while `losses` holds the graph, as train_step's backward() finds it
            del losses
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), pd.autocast(agent):
                losses, _ = agent.ac_loss(deter.detach().flatten(0, 1), stoch.detach().flatten(0, 1))
            ac = held()
    finally:
        ckpt_mod.checkpoint = plain
        torch.distributions.Distribution.set_default_validate_args(validate)
    return dict(wm=wm, ac=ac, recompute=chains[0], states=states)


GiB = 2**30


def peak_estimate(held: dict) -> float:
    """Bytes at the update's high-water mark, estimated from held_for_backward: the states, plus the largest of
    (a) all the world model holds at the end of its forward pass; (b) what the encoder holds while its backward
    pass recomputes a checkpointed segment (the parts after it in the graph, its head included, are freed by
    then), plus that segment's inside; (c) all the actor-critic pass holds."""
    wm, ac = sum(held["wm"].values()), sum(held["ac"].values())
    return held["states"] + max(wm, held["wm"].get("encoder", 0) + held["recompute"], ac)


def largest_batch(held: dict, batch_size: int, budget: float) -> int:
    """The largest B (same T) whose estimated peak stays within `budget` bytes: activations scale with B*T."""
    per_seq = (peak_estimate(held) - held["states"]) / batch_size
    return max(0, int((budget - held["states"]) // per_seq))


def memory_table(specs: list[dict], budgets=(12, 20)) -> list[str]:
    """--memory: one row per spec at fp32 / bf16, without / with --grad-checkpoint (on; nested where a ViT
    trains)."""
    head = ["encoder", "PVM res", "feature cache", "precision", "grad ckpt", "weights+grads+Adam"] \
        + [f"WM {p}" for p in WM_PARTS] + ["WM total"] + [f"imagination {p}" for p in AC_PARTS] \
        + ["largest recompute", "est. peak GiB"] + [f"largest B for {b} GiB" for b in budgets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print("\n".join(lines), flush=True)
    g = lambda b: f"{b / GiB:.2f}" if b == 0 or b >= GiB / 10 else f"{b / GiB:.2g}"  # noqa: E731 (tiny: 2 digits)
    for spec in specs:
        for precision in ("fp32", "bf16"):
            trains = spec["args"].get("pvm", "none") != "none" and spec["args"].get("mode") != "frozen"
            for ckpt in ("off", "on", "nested") if trains else ("off", "on"):
                args = pd.Args(**dict(spec["args"], precision=precision, grad_checkpoint=ckpt))
                h = held_for_backward(args)
                cache = "-" if args.pvm == "none" or args.mode == "full" else ("on" if args.feature_cache else "off")
                cells = [spec["name"], str(spec["res"] or "-"), cache, precision, ckpt] \
                    + [g(h["states"])] \
                    + [g(h["wm"].get(p, 0)) for p in WM_PARTS] + [g(sum(h["wm"].values()))] \
                    + [g(h["ac"].get(p, 0)) for p in AC_PARTS] + [g(h["recompute"]), f"**{g(peak_estimate(h))}**"] \
                    + [str(largest_batch(h, args.batch_size, b * GiB)) for b in budgets]
                lines.append("| " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    return lines


def _child(spec, conn):
    try:
        conn.send(run_row(spec))
    except Exception as e:  # report, so one broken row does not hide the others
        conn.send(dict(error=f"{type(e).__name__}: {e}"))


def run_fresh(spec: dict, start: str = "fork") -> dict:
    """run_row in a child process (fork: nothing built before it, so ru_maxrss is this row's own peak; spawn:
    a fresh interpreter, what CUDA needs)."""
    parent, child = mp.Pipe(duplex=False)
    proc = mp.get_context(start).Process(target=_child, args=(spec, child))
    proc.start()
    out = parent.recv() if parent.poll(None) else dict(error="no result")
    proc.join()
    return out


def make_specs(o) -> list[dict]:
    quick = o.quick
    base = dict(env=o.env, image_size=32 if quick else o.image_size, size="tiny" if quick else o.size,
                batch_size=o.batch_size, batch_length=o.batch_length, train_ratio=o.train_ratio, device=o.device,
                pvm_random_init=True, finetune_blocks=2 if quick else 4, torch_deterministic=False,
                grad_checkpoint=o.grad_checkpoint, precision=o.precision, compile=o.compile)
    nums = [int(n) for n in o.num_envs.split(",")]
    steps = max(1, round(o.batch_size * o.batch_length / o.train_ratio))
    # The replay holds every frame a row collects (with N envs: per stream).
    replay = lambda n: n * (o.batch_length + 2 + (o.warmup + o.updates) * (-(-steps // n) + 1) * 2)  # noqa: E731
    specs = []
    for enc in o.only.split(","):
        if enc not in ENCODERS:
            runtime.fail(f"--only {enc!r} is not one of {','.join(ENCODERS)}; fix the list")
        pvm, mode = ("none", "full") if enc == "cnn" else enc.split("-")
        patch = 1 if pvm == "none" else pd.PVM_ARCHS[pd.pvm_source(pvm)].get("patch_size", 14)  # sizes round down to its patch (DINOv2: 14)
        for res in ([None] if pvm == "none" else [32] if quick else [int(r) // patch * patch for r in o.pvm_sizes.split(",")]):
            for cache in ([True, False] if mode != "full" and pvm != "none" and not o.cache_on_only else [True]):
                for n in nums:
                    a = dict(base, pvm=pvm, mode=mode, replay_size=replay(n), feature_cache=cache, num_envs=n,
                             pvm_id="tiny" if quick else "", pvm_image_size=res or 224)
                    specs.append(dict(name=enc, res=res, args=a, steps_per_update=steps, warmup=o.warmup,
                                      updates=o.updates, count_ops=o.count_ops))
    return specs


def table_head(cuda: bool, ops: bool = False) -> str:
    head = ["encoder", "PVM res", "feature cache", "envs", "env-steps/s", "÷ CNN's", "updates/s", "s/update",
            "CPU s/update", "x CNN", "collect share", "encoder ms/frame", "peak RSS GB", "env workers GB"] \
        + (["CUDA max alloc GB"] if cuda else []) \
        + (["aten ops/update", "compute ops/update", "compute ops/env step", "value reads/update"] if ops else []) \
        + (["CUDA kernels/update"] if ops and cuda else [])
    return "| " + " | ".join(head) + " |\n|" + "---|" * len(head)


def table_row(s: dict, r: dict, cnn: dict | None, cuda: bool) -> str:
    """On a CPU the ratio to the CNN uses CPU seconds (process time): on a shared machine wall time also counts
    whatever else ran, CPU time only this row's work. On a GPU it uses wall time. "÷ CNN's": env-steps/s over
    the CNN row's with the same number of envs (wall clock). "env workers GB": the largest env process's peak
    RSS (N > 1; each of the N has about that)."""
    key = "s_update" if cuda else "cpu_s_update"
    cache = "-" if s["args"]["pvm"] == "none" or s["args"]["mode"] == "full" else ("on" if r.get("cached", s["args"]["feature_cache"]) else "off")
    if "error" in r:
        return f"| {s['name']} | {s['res'] or '-'} | {cache} | error: {r['error']} |"
    cells = [s["name"], s["res"] or "-", cache, s["args"]["num_envs"], f"{r['env_steps_s']:.2f}",
             f"{r['env_steps_s'] / cnn['env_steps_s']:.2f}" if cnn else "-", f"{r['updates_s']:.3f}",
             f"{r['s_update']:.3f}", f"{r['cpu_s_update']:.3f}", f"{r[key] / cnn[key]:.1f}" if cnn else "-",
             f"{r['collect_frac']:.0%}", "-" if r["enc_ms_frame"] is None else f"{r['enc_ms_frame']:.1f}",
             f"{r['rss_gb']:.2f}", f"{r['env_rss_gb']:.2f}" if r["env_rss_gb"] else "-"] \
        + ([f"{r['cuda_gb']:.2f}"] if cuda else [])
    if r.get("ops"):
        ops = r["ops"]
        cells += [ops["aten"], ops["compute"], f"{ops['act']:.0f}", ops["reads"]] + ([ops["kernels"]] if cuda else [])
    return "| " + " | ".join(map(str, cells)) + " |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random models at 32x32, 1+2 iterations: a smoke test")
    p.add_argument("--only", default=",".join(PAPER_ENCODERS),
                   help=f"comma list of rows from {','.join(ENCODERS)} (default: the paper's encoders)")
    p.add_argument("--pvm-sizes", default="224,112", help="comma list of --pvm-image-size values to time "
                   "(rounded down to the patch size: CLIP-B/32 at 112 runs at 96)")
    p.add_argument("--device", default="cpu", help="torch device: cpu | cuda | cuda:N | auto")
    p.add_argument("--env", default="pointmass", help="environment (a cheap one, so the encoders dominate)")
    p.add_argument("--image-size", type=int, default=64, help="env frames, CNN input and decoder output")
    p.add_argument("--size", default="small", help="model size preset of the world model and actor-critic")
    # differs from the agent's 16x64: a ViT-S at 224 encodes ~4 frames/s on a 2-core CPU; on a GPU pass 16 64
    p.add_argument("--batch-size", type=int, default=4, help="B sequences per update")
    p.add_argument("--batch-length", type=int, default=16, help="T steps per sequence")
    p.add_argument("--train-ratio", type=float, default=32.0, help="replayed steps per env step")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per row")
    p.add_argument("--updates", type=int, default=2, help="timed iterations (updates) per row")
    p.add_argument("--no-nm512", action="store_true", help="skip the NM512 comparison update")
    p.add_argument("--num-envs", default="1", help="comma list of --num-envs values to time (each a row)")
    p.add_argument("--cache-on-only", action="store_true", help="skip the --no-feature-cache rows")
    p.add_argument("--spawn", action="store_true", help="run rows in spawned processes (always on CUDA)")
    p.add_argument("--grad-checkpoint", default="auto", choices=["auto", "on", "off", "nested"],
                   help="the agent's --grad-checkpoint (auto: on where a ViT trains on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="the agent's --compile (torch.compile of the RSSM's and the policy's steps, and of acting)")
    p.add_argument("--count-ops", action="store_true", help="profile one more update and env step: aten ops, compute "
                   "ops (the kernels, counted on any device; see count_ops; per env step: acting's) and, on CUDA, the "
                   "kernels launched")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the agent's --precision (auto: bf16 on a CUDA GPU with bf16, else fp32)")
    p.add_argument("--memory", action="store_true", help="instead of timing: what each row's update holds for its "
                   "backward passes, per part, at fp32/bf16 without/with --grad-checkpoint (fake tensors: seconds, "
                   "no memory, the same on any machine), its estimated peak and the largest batch for 12 / 20 GiB")
    p.add_argument("--paper", action="store_true", help="the paper's configuration (size200m, B16xT64, ratio 32, "
                   "DINOv2-S at 224: cnn, frozen, partial, full), 10 timed updates, beside the paper's env-steps/s")
    o = p.parse_args(argv)
    if o.paper:
        o.only, o.pvm_sizes, o.size, o.batch_size, o.batch_length = PAPER_ROWS, "224", "size200m", 16, 64
        o.train_ratio, o.image_size, o.updates, o.cache_on_only, o.no_nm512 = 32.0, 64, 10, True, True
    if o.quick:
        o.batch_size, o.batch_length, o.train_ratio, o.warmup, o.updates = 2, 8, 4.0, 1, 2
    with runtime.one_line_errors():
        cuda = runtime.resolve_device(o.device).type == "cuda"
    if not cuda:
        runtime.keep_freed_memory()  # as train() does on a CPU; the forked rows inherit it
    specs = make_specs(o)
    if any(s["args"]["pvm"] != "none" for s in specs):  # imported once, before the forks: the same baseline RSS
        from transformers import CLIPVisionModel, Dinov2Model  # noqa: F401  for every row
    if o.memory:
        print(f"bench --memory: B={o.batch_size} T={o.batch_length}, env {o.env} {specs[0]['args']['image_size']}px, "
              f"size {specs[0]['args']['size']}, imagination H={pd.Args.imag_horizon} from B*T starts; GiB counted on "
              "fake tensors (shapes only), not measured on a device\n", flush=True)
        memory_table(specs)
        return specs
    print(f"bench: {len(specs)} rows, B={o.batch_size} T={o.batch_length} ratio={o.train_ratio} "
          f"({specs[0]['steps_per_update']} env steps/update), warm-up {o.warmup} + {o.updates} timed, "
          f"env {o.env} {specs[0]['args']['image_size']}px, size {specs[0]['args']['size']}, device {o.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, --precision {o.precision}, "
          f"--grad-checkpoint {o.grad_checkpoint} (auto: see pvm_dreamer.for_device); PVMs RANDOM-INIT", flush=True)
    print("\n" + table_head(cuda, o.count_ops), flush=True)
    rows, cnn = [], {}  # the CNN's row per number of envs
    start = "spawn" if cuda or o.spawn else "fork"
    for spec in specs:  # each row is printed as soon as it is measured
        rows.append((spec, run_fresh(spec, start)))
        n = spec["args"]["num_envs"]
        if spec["name"] == "cnn" and "error" not in rows[-1][1]:
            cnn[n] = rows[-1][1]
        print(table_row(*rows[-1], cnn.get(n), cuda), flush=True)
    if o.paper:
        print("\npaper (Jones et al. 2025, manipulation, their GPU, size200m), env-steps/s: "
              + ", ".join(f"{k} {v}" for k, v in PAPER_STEPS_S.items()) + " (partial and full: one figure, 11.3)")
    if not (o.quick or o.no_nm512):
        nm = dict(name="nm512", res=None, warmup=1, updates=o.updates, steps_per_update=32, count_ops=o.count_ops,
                  args=dict(env=o.env, image_size=64, size="nm512", batch_size=16, batch_length=64, train_ratio=32.0,
                            device=o.device, replay_size=64 + 2 + (1 + o.updates) * 33 * 2, torch_deterministic=False,
                            compile=o.compile, precision=o.precision))
        r = run_fresh(nm, start)
        print("\nour update at the NM512 comparison configuration (CNN, deter 256, 32x32 latents, depth 32, hidden/"
              "units 512, dense GRU, batch 16x64, 64x64, float32): "
              + (r["error"] if "error" in r else f"{r['s_update']:.2f} s/update ({r['cpu_s_update']:.2f} CPU s; "
                 f"incl. 32 env steps), peak RSS {r['rss_gb']:.2f} GB"
                 + (f", {r['ops']['aten']} aten ops/update ({r['ops']['compute']} compute)" if r.get("ops") else "")
                 + (f", {r['ops']['kernels']} CUDA kernels/update" if r.get("ops") and cuda else ""))
              + f"; NM512's dreamerv3-torch: {NM512_MEASURED} (measured earlier on this CPU)")
    return rows


if __name__ == "__main__":
    main()
