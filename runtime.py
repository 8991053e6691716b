"""runtime.py: the run machinery of pvm-dreamer, kept out of the method file (pvm_dreamer.py).

What a long run needs but a reader of the method does not: checkpoint files that survive a kill at any moment
(atomic writes with a sha256 trailer) and their lookup, the loop's counters, a lock so one process writes a run,
the TensorBoard + JSONL logger, stop signals, the divergence check, device / seed / allocator helpers, the
command-line parser and its one-line errors, and a quick test of whether the Hugging Face Hub is reachable.

It imports nothing from the project (it is handed dataclasses, dicts and paths), so every script may use it.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import math
import os
import random
import secrets
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


class UsageError(Exception):
    """A mistake in the command line or the files it names: printed as one line, exit code 2, no traceback."""


class CorruptCheckpoint(Exception):
    """A checkpoint file that is truncated, altered or unreadable; the message says which."""


class Diverged(Exception):
    """A non-finite loss or gradient norm: training stops before the poisoned weights reach a checkpoint."""


# ---------------------------------------------------------------------------------------------------------
# Command line: tyro's parser with its error boxes folded into one line, and one exit path for every script
# ---------------------------------------------------------------------------------------------------------
def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def one_line_errors():
    """Every script's `main` runs inside this: a UsageError becomes `error: ...` and exit 2, a divergence exit 1,
    a second Ctrl-C / SIGTERM exit 130. Anything else is a bug and keeps its traceback."""
    try:
        yield
    except UsageError as e:
        fail(str(e))
    except Diverged as e:
        fail(str(e), 1)
    except KeyboardInterrupt:
        fail("aborted; the newest checkpoint in checkpoints/ is the last complete one", 130)


def parse_cli(cls, argv=None, description: str = ""):
    """tyro.cli(cls), with its multi-line error boxes folded into one `error:` line (exit code 2)."""
    import tyro

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = tyro.cli(cls, args=argv, description=description)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        fail(f"{one_line(err.getvalue())} (see --help)")
    sys.stderr.write(err.getvalue())  # warnings, if tyro had any
    return args


def one_line(box: str) -> str:
    """The message of a tyro error box, plus its 'Perhaps you meant' flag. tyro draws either a unicode box with
    the title in its top border, or (when it thinks the terminal lacks unicode) a title line above a ---- rule."""
    sections, current = [], []
    for line in box.splitlines():
        line = line.strip(" │╭╮╰╯\t")
        if line.startswith("─") or set(line) == {"-"}:  # a rule, or the top border with the title in it
            sections.append(current)
            current = []
        elif line:
            current.append(line)
    sections.append(current)
    body = [s for s in sections[1:] if s] if sections[0] else [s for s in sections if s]  # drop an ASCII title
    if not body:
        return box.strip().replace("\n", " ") or "bad arguments"
    hint = next((s for s in body[1:] if s[0].startswith("Perhaps you meant") and len(s) > 1), None)
    return " ".join(body[0]) + (f"; perhaps you meant {hint[1].split()[0]}" if hint else "")


# ---------------------------------------------------------------------------------------------------------
# Device, seeds, memory, network
# ---------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} but torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
    try:
        device = torch.device(name)
        torch.zeros(1, device=device)  # a device torch knows by name but cannot use here fails now, in one line
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device {name} is not a device torch can use here ({str(e).splitlines()[0] if str(e) else ''}); "
                         "use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"--device {name} holds no real tensors; use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int, deterministic: bool):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic


def rng_states() -> dict:
    """The global generators (python, numpy, torch, CUDA), for a checkpoint."""
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(rng: dict):
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"][:torch.cuda.device_count()])


def keep_freed_memory():
    """CPU speed-up, no change to the maths: glibc hands every freed block above 32 MB back to the OS, so each
    op on a (B*T, C, H, W) activation page-faults fresh memory in again; that made elementwise ops ~3x and
    a whole update ~1.15x slower here. Serve big blocks from the heap and keep freed memory for reuse
    (RSS then stays at its peak instead of shrinking between updates)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: no mmap'd blocks
            libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: do not shrink the heap
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
            pass


def physical_memory() -> int:
    """Bytes of RAM of this machine (inf where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return math.inf


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect instead of huggingface_hub's ~20 s of retries when the machine is offline."""
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_pretrained(load, model_id: str, fix: str):
    """load(model_id, ...), a transformers `from_pretrained`, that fails in one line instead of a traceback or
    ~20 s of network retries. A local directory (an existing path, or one written as a path) loads from disk
    only; a Hub id loads from the Hugging Face cache without network, else from the Hub when it answers."""
    fix += f", or download it on a machine with internet (it is cached under HF_HOME, now " \
           f"{os.environ.get('HF_HOME', '~/.cache/huggingface')})"
    first_line = lambda e: str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__  # noqa: E731
    path = Path(model_id).expanduser()
    if path.is_dir() or model_id.startswith(("/", "./", "../", "~")):
        if not path.is_dir():
            raise UsageError(f"'{model_id}' is no directory: pass a Hugging Face id, or a directory that holds "
                             f"config.json and the weights; {fix}")
        try:
            return load(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load the model in {path} ({first_line(e)}): it must hold config.json and "
                             "the weights, as `huggingface-cli download ID --local-dir DIR` writes them") from None
    try:  # 1) the Hugging Face cache: instant, no network
        return load(model_id, local_files_only=True)
    except (OSError, ValueError):  # ValueError: huggingface_hub's HFValidationError, an id that cannot exist
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or not hub_reachable():
        raise UsageError(f"weights '{model_id}' are not cached and the Hugging Face Hub is unreachable: {fix}")
    try:  # 2) download
        return load(model_id)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load '{model_id}' ({first_line(e)}): check the id; {fix}") from None


# ---------------------------------------------------------------------------------------------------------
# Checkpoint files: RUN/checkpoints/ckpt_STEP.pt, the newest few of them, each verifiable on its own
# ---------------------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = 2  # 2: checkpoints/ckpt_STEP.pt with a sha256 trailer, loop counters and the env's RNG
# After torch's zip archive (whose reader ignores trailing bytes) comes this line with the sha256 of the archive.
# torch.load notices a truncated file but not a flipped byte inside a tensor; the checksum notices both.
TRAILER, TRAILER_LEN = b"\npvm-dreamer sha256 ", len(b"\npvm-dreamer sha256 ") + 64 + 1


class _HashingWriter:
    """Hashes what torch.save writes as it goes: the checksum costs no second pass over the file."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first (the step is zero-padded, so names sort by step)."""
    return sorted((Path(run_dir) / "checkpoints").glob("ckpt_*.pt"))


def save_checkpoint(run_dir: Path, state: dict, keep: int) -> Path:
    """Write atomically (tmp file, fsync, rename, fsync the directory), then delete all but the newest `keep`.
    A crash at any point leaves the previous checkpoints intact and at most a stale ckpt.tmp behind."""
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    path, tmp = ckpt_dir / f"ckpt_{state['step']:09d}.pt", ckpt_dir / "ckpt.tmp"
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        torch.save({"format": CHECKPOINT_FORMAT, **state}, writer)
        f.write(TRAILER + writer.sha.hexdigest().encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(ckpt_dir, os.O_RDONLY)  # the rename is durable only once the directory entry is on disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in checkpoint_paths(run_dir)[:-keep]:
        old.unlink()
    return path


def read_checkpoint(path: Path) -> dict:
    """torch.load, after checking the file's sha256 trailer; raises CorruptCheckpoint with the reason."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - TRAILER_LEN))
        tail = f.read()
        if len(tail) != TRAILER_LEN or not tail.startswith(TRAILER):
            raise CorruptCheckpoint("no checksum line at its end: truncated")
        f.seek(0)
        sha, left = hashlib.sha256(), size - TRAILER_LEN
        while left:
            chunk = f.read(min(left, 1 << 24))
            sha.update(chunk)
            left -= len(chunk)
    if sha.hexdigest().encode() != tail[len(TRAILER):-1]:
        raise CorruptCheckpoint("sha256 mismatch: its bytes changed after it was written")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CorruptCheckpoint(f"torch.load failed: {type(e).__name__}") from None


def run_dir_of(path: Path) -> Path:
    """The run directory of a checkpoint argument: itself, or the run that holds the checkpoint file."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def newest_intact(run_dir: Path, fix_corrupt: bool = False) -> tuple[Path, dict] | None:
    """The newest checkpoint of a run that reads back intact, as (path, state); None if the run has none.
    Newer corrupt ones are skipped, each reported in one line and, with fix_corrupt, renamed to *.corrupt
    (never deleted) so that pruning and later resumes pass them by."""
    corrupt = []
    for ckpt in reversed(checkpoint_paths(run_dir)):
        try:
            state = read_checkpoint(ckpt)
        except CorruptCheckpoint as e:
            corrupt.append((ckpt, e))
            continue
        for bad, e in corrupt:
            print(f"checkpoint {bad} is corrupt ({e}); using {ckpt.name}", file=sys.stderr)
            if fix_corrupt:
                bad.rename(bad.with_name(bad.name + ".corrupt"))
        return ckpt, state
    if corrupt:
        raise UsageError(f"every checkpoint in {run_dir}/checkpoints is corrupt (first: {corrupt[0][1]}); "
                         "start a new run")
    return None


def find_checkpoint(path: Path, fix_corrupt: bool = False) -> tuple[Path, dict]:
    """The one lookup behind --resume and every script that reads a run: PATH is a checkpoint file (read as
    named) or a run directory (its newest intact checkpoint). Returns (file, state); UsageError otherwise."""
    path = Path(path)
    try:
        path.stat()
    except FileNotFoundError:
        pass
    except OSError as e:  # a name too long, a loop of links, no permission...
        raise UsageError(f"{short(path)}: {e.strerror}; pass a run directory or checkpoint file") from None
    legacy = f"{run_dir_of(path)}/checkpoint.pt is a format-1 checkpoint of an older pvm-dreamer: continue " \
             "that run with the version that wrote it, or start a new run"
    if path.is_file():
        if path.name == "checkpoint.pt":
            raise UsageError(legacy)
        try:
            found = path, read_checkpoint(path)
        except CorruptCheckpoint as e:
            raise UsageError(f"checkpoint {path} is corrupt ({e}): pass its run directory to use the newest "
                             "intact one") from None
    elif not path.is_dir():
        raise UsageError(f"{path}: no such run directory or checkpoint file")
    else:
        found = newest_intact(path, fix_corrupt)
        if found is None and (path / "checkpoint.pt").is_file():
            raise UsageError(legacy)
        if found is None and not holds_run_data(path):
            raise UsageError(f"no checkpoint in {path} yet (a run stopped while starting leaves none, and nothing to "
                             f"keep): start it afresh with --logdir {path.parent} --run-name {path.name}")
        if found is None:
            raise UsageError(f"no checkpoint in {path} (no checkpoints/ckpt_*.pt): pass a run directory that has "
                             "one, or start a new run")
    ckpt, state = found
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"checkpoint {ckpt} is not a pvm-dreamer format-{CHECKPOINT_FORMAT} checkpoint: "
                         "continue it with the version that wrote it, or start a new run")
    return ckpt, state


@dataclass
class Progress:
    """The training loop's counters. Saved in every checkpoint, so a resumed run trains, logs, evaluates and
    checkpoints on the schedule the interrupted run would have kept."""
    step: int = 0  # agent steps taken
    updates: int = 0  # train_step calls
    updates_due: float = 0.0  # the fraction of an update owed at --train-ratio
    next_log: int = 0
    next_eval: int = 0
    next_ckpt: int = 0
    last_eval: int = -1  # step of the newest evaluation (the final one is skipped if it is this step)
    train_metrics: dict = field(default_factory=dict)  # losses of the updates since the last log row
    rows: int | None = 0  # rows of metrics.jsonl this checkpoint covers (None: a checkpoint from before it was kept)
    baselines: bool = False  # the step-0 evaluations (random policy, untrained agent) are logged

    # What a checkpoint written before a field existed meant by it: its run had logged the step-0 evaluations
    # before its first checkpoint, and its rows are those up to its step.
    LEGACY = dict(rows=None, baselines=True)

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        return cls(**{k: state[k] if k in state else cls.LEGACY[k] for k in cls.__dataclass_fields__})


def next_mark(step: int, every: int) -> int:
    return step // every * every + every


# ---------------------------------------------------------------------------------------------------------
# One writer per run, the logger, and what a run learned
# ---------------------------------------------------------------------------------------------------------
def holds_run_data(run_dir: Path) -> bool:
    """Whether a directory holds anything of a run. One killed before its first checkpoint was complete leaves
    at most RUN/.lock and checkpoints/ckpt.tmp: nothing to continue and nothing to lose, so a fresh start under
    the same name may reuse it (it still takes the lock, so a live run is never shared)."""
    run_dir = Path(run_dir)
    try:
        run_dir.stat()
    except FileNotFoundError:
        return False
    except OSError as e:  # e.g. a --run-name longer than the file system allows
        raise UsageError(f"{short(run_dir)}: {e.strerror}; pick another --run-name or --logdir") from None
    if not run_dir.is_dir():
        return True
    stale = {".lock", "checkpoints", "checkpoints/ckpt.tmp"}
    return any(p.relative_to(run_dir).as_posix() not in stale for p in run_dir.rglob("*"))


def check_writable(path: Path, flag: str):
    """UsageError unless `path` is, or can be made, a directory this process writes in (checked before a run
    builds anything; the first write still reports what the OS says, e.g. for a path under /proc)."""
    path = Path(path).expanduser().absolute()
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as e:  # e.g. a name longer than the file system allows
        raise UsageError(f"{flag} {short(path)}: {e.strerror}; pick another {flag}") from None
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a directory; pick another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: no permission to write in {existing}; pick another {flag}")


def short(path, width: int = 80) -> str:
    """A path for a one-line message, cut in the middle when it is very long."""
    text = str(path)
    return text if len(text) <= width else f"{text[:width // 2]}...{text[-width // 2:]}"


def make_run_dir(run_dir: Path, flag: str):
    """mkdir -p RUN; when that fails (a name too long for the file system, say), the parents it made are
    removed again, so that a failed start leaves no trace."""
    made = []
    try:
        made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        for p in made:  # deepest first; only the empty directories this call made
            with contextlib.suppress(OSError):
                p.rmdir()
        raise UsageError(f"cannot create the run directory {short(run_dir)} ({e.strerror}); pick another {flag}") from None


class RunLock:
    """An exclusive lock on RUN/.lock, held while a process trains into RUN. Two processes writing one run (a
    sweep launched twice, a --resume while the run still goes) would interleave checkpoints and log rows; the
    second stops with one line instead. The OS releases a flock when its holder exits, even on kill -9, so a
    crashed run never leaves a stale lock. (Unix only: without fcntl, e.g. on Windows, nothing is locked.)"""

    held: dict[str, int] = {}  # run dir -> lock fd, in this process

    def __init__(self, run_dir: Path):
        self.key, self.fd = str(run_dir.resolve()), None
        try:
            import fcntl
        except ImportError:
            return
        if self.key in RunLock.held:  # left behind by an earlier train() in this process that raised
            os.close(RunLock.held.pop(self.key))
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"another process is training in {run_dir} (it holds {run_dir / '.lock'}; "
                             f"`fuser -v {run_dir / '.lock'}` names it): let it finish, or stop it with SIGTERM "
                             "(it saves a checkpoint), then --resume") from None
        self.fd = RunLock.held[self.key] = fd

    def close(self):
        if self.fd is not None and RunLock.held.get(self.key) == self.fd:
            os.close(RunLock.held.pop(self.key))
        self.fd = None


class Logger:
    """TensorBoard (runs/<name>, as CleanRL) plus metrics.jsonl, one JSON row per logged step, and with `track`
    (a dict of wandb.init arguments: project, entity, config) the same rows on Weights & Biases.
    A resumed run passes the checkpoint's Progress: rows the interrupted run wrote after that checkpoint (and a
    half-written last line) are dropped, and the resumed run writes them again, so the file has no gap and no
    repeated row. `rows` counts the rows written, for the next checkpoint to record.
    W&B: the run id lives in RUN/wandb_id.txt, so a resumed run continues the same W&B run (resume="allow");
    rows go with explicit step=, and those at steps W&B already holds (online) are not sent twice: the
    resumed run computes the same values (resume is exact), and W&B refuses steps that go backwards.
    WANDB_MODE=offline writes RUN/wandb/offline-run-*; `wandb sync` uploads them later, in order."""

    def __init__(self, run_dir: Path, resume: Progress | None = None, track: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl, self.rows, purge = run_dir / "metrics.jsonl", 0, None
        if resume is not None:
            lines = self.jsonl.read_text().splitlines() if self.jsonl.exists() else []
            if resume.rows is None:  # an older checkpoint: its rows are those up to its step
                kept = [r for r in lines if _row_step(r) <= resume.step]
            else:
                kept = lines[:resume.rows]
            tmp = self.jsonl.with_suffix(".tmp")  # rewritten via a tmp file: a kill here loses nothing
            tmp.write_text("".join(r + "\n" for r in kept))
            os.replace(tmp, self.jsonl)
            self.rows = len(kept)
            # purge_step hides the TensorBoard events at steps >= it that the interrupted run logged after them.
            purge = _row_step(kept[-1]) + 1 if kept else 0
        self.wandb = start_wandb(run_dir, **track) if track is not None else None
        self.writer = SummaryWriter(str(run_dir), purge_step=purge)

    def log(self, step: int, metrics: dict, videos: dict | None = None):
        """One row; `videos` maps a tag to an mp4 file, sent to W&B only (TensorBoard and the JSONL keep scalars)."""
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.rows += 1
        if self.wandb is not None and step >= self.wandb.step:
            if videos:
                wandb = _import_wandb()  # already imported by start_wandb
                metrics = {**metrics, **{k: wandb.Video(str(v), format="mp4") for k, v in videos.items()}}
            self.wandb.log(metrics, step=step)

    def text(self, tag: str, text: str):
        self.writer.add_text(tag, text)

    def sync(self):
        """Put every row on disk before a checkpoint that claims them (else a power cut could lose rows)."""
        self.writer.flush()
        if self.jsonl.exists():
            with open(self.jsonl, "a") as f:
                os.fsync(f.fileno())

    def close(self):
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise UsageError("--track needs Weights & Biases: pip install wandb (or drop --track)") from None
    return wandb


def check_wandb():
    """Before a --track run writes anything: wandb is installed, and it has credentials unless it logs offline."""
    wandb = _import_wandb()
    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")
    if not offline and not wandb.login(prompt=False, verify=False):
        raise UsageError("--track: no W&B credentials; run `wandb login` (or set WANDB_API_KEY), or set "
                         "WANDB_MODE=offline to log locally and `wandb sync` later")


def start_wandb(run_dir: Path, project: str, entity: str = "", config: dict | None = None):
    """wandb.init for this run directory: the same W&B run id for every process that writes it (RUN/wandb_id.txt).
    wandb is imported here only, so a run without --track never needs it."""
    wandb = _import_wandb()
    id_file = run_dir / "wandb_id.txt"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B ids are short alphanumeric strings
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, id_file)
    try:  # mode read here, not at wandb's first import: WANDB_MODE=offline may be set after that
        return wandb.init(project=project, entity=entity or None, name=run_dir.name, id=run_id, resume="allow",
                          config=config, dir=str(run_dir), mode=os.environ.get("WANDB_MODE") or None)
    except Exception as e:  # no API key, no network, a bad entity: one line, and the run's files stay as they are
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--track: W&B did not start ({why}); run `wandb login`, or set WANDB_MODE=offline "
                         "to log locally and `wandb sync` later, or drop --track") from None


def _row_step(row: str) -> float:
    try:
        return json.loads(row)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line cut short by a kill


def summarize(run_dir: Path) -> str:
    """What a run learned, from its metrics.jsonl: evaluation returns vs the random policy, world-model loss."""
    path = run_dir / "metrics.jsonl"  # absent when no episode ended and nothing was evaluated
    rows = [json.loads(r) for r in path.read_text().splitlines() if r] if path.exists() else []
    pick = lambda key: [r for r in rows if key in r]  # noqa: E731
    lines = [f"eval return at step {r['step']}: {r['eval/return_mean']:.2f} +- {r['eval/return_std']:.2f}"
             for r in pick("eval/return_mean")]
    for r in pick("eval/random_return_mean")[:1]:
        lines.append(f"random policy: {r['eval/random_return_mean']:.2f} +- {r['eval/random_return_std']:.2f}")
    losses = pick("wm/loss")
    if losses:
        lines.append(f"world-model loss: {losses[0]['wm/loss']:.2f} (step {losses[0]['step']}) -> "
                     f"{losses[-1]['wm/loss']:.2f} (step {losses[-1]['step']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Stopping: signals, and non-finite losses
# ---------------------------------------------------------------------------------------------------------
class StopRequest:
    """SIGTERM (a cluster pre-empting the job) or Ctrl-C sets a flag, which the loop reads between agent steps,
    between updates and between evaluation steps: it then saves a checkpoint and exits cleanly, so a stop takes
    at most one update (or one env step) plus the checkpoint write. Installed first thing, before any model is
    built, so no window of a run's life ignores a signal.
    A Python-level handler runs only between bytecodes, never inside a long torch call, so the first signal also
    gives both signals back their default action: a second one ends the process at once, from the kernel
    (checkpoints are written atomically, so the older ones stay intact)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = ""

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __bool__(self):
        return bool(self.signal)

    def handle(self, signum, frame):
        for s in self.SIGNALS:  # the next signal kills, even mid-update or mid-save
            signal.signal(s, signal.SIG_DFL)
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: saving a checkpoint after this update, then stopping (again to abort at once)",
              file=sys.stderr, flush=True)


def check_finite(metrics: dict, p: Progress, last_ckpt: int):
    """One pass over ~20 Python floats (train_step already synced once to produce them): free."""
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise Diverged(f"{bad[0]} is {metrics[bad[0]]} at step {p.step} (update {p.updates + 1}); stopped without "
                       f"saving, so the checkpoint of step {last_ckpt} is intact: resume from it with lower "
                       "learning rates, or look for bad inputs")
